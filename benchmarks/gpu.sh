#!/usr/bin/env bash
# One prepared run that measures everything GPU-bound (issue: official checkpoints, GPU path).
# Run it from the repository root on a CUDA machine; results land in ${OUT:-gpu-results}/.
#
#   OUT=gpu-results bash benchmarks/gpu.sh         # about 5-8 minutes on one H100/H200
#   DEVICE=cpu LAYERS=1 STEPS=1 CONTEXT=1 G448=4x8 G672=4x8 bash benchmarks/gpu.sh  # CPU dry run
#
# It needs PyTorch with CUDA plus numpy, safetensors, tokenizers, pillow and av (no Ray, no
# network): the source tree is used in place (PYTHONPATH=src), nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
DEVICE=${DEVICE:-cuda}
LAYERS=${LAYERS:-}           # empty: the presets' full depth
STEPS=${STEPS:-8}; CONTEXT=${CONTEXT:-6}
G448=${G448:-32x56}; G672=${G672:-48x84}  # latent grids of 448x256 and 672x384
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}; [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
layers=(); [ -n "$LAYERS" ] && layers=(--layers "$LAYERS")
status=0
step() {  # step NAME CMD...: run one measurement, keep going when it fails
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/log.txt"
  if ! "$@" >"$OUT/$name.txt" 2>&1; then echo "   FAILED (see $OUT/$name.txt)" | tee -a "$OUT/log.txt"; status=1; fi
  tail -n 40 "$OUT/$name.txt"
}
$PY - <<'PY' | tee "$OUT/env.txt"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for m in ("numpy", "safetensors", "tokenizers", "PIL", "av", "triton"):
    try:
        importlib.import_module(m); print("ok     ", m)
    except Exception as e:  # a missing wheel: carry it, see docs/OFFICIAL.md
        print("MISSING", m, e)
PY
# the engine at the released 448x256 (latent 32x56), 1B: ms/frame, tokens/s, step MFU vs bf16 peak
step engine_1b "$PY" benchmarks/engine.py --preset 1b --grid "$G448" --context "$CONTEXT" \
  --steps "$STEPS" --device "$DEVICE" "${layers[@]}" --no-recompute --json "$OUT/engine_1b.json"
# the same for 3B (memory per session is in the JSON: peak_mem_bytes)
step engine_3b "$PY" benchmarks/engine.py --preset 3b --grid "$G448" --context "$CONTEXT" \
  --steps "$STEPS" --device "$DEVICE" "${layers[@]}" --no-recompute --json "$OUT/engine_3b.json"
# 672x384 (latent 48x84) for 1B
step engine_1b_384p "$PY" benchmarks/engine.py --preset 1b --grid "$G672" --context "$CONTEXT" \
  --steps "$STEPS" --device "$DEVICE" "${layers[@]}" --no-recompute --json "$OUT/engine_1b_384p.json"
# continuous batching: aggregate frames/s at 8 sessions vs 1 (target >= 6x on a GPU)
step serve_engine "$PY" benchmarks/serve.py --engine-only --device "$DEVICE" --sessions 1,8 \
  --batching on --json "$OUT/serve_engine.json"
# memory table of the official sizes (analytic, from the presets)
step memory "$PY" benchmarks/official_memory.py --check --json "$OUT/memory.json"
# the GPU-marked tests (each has a CPU reference test beside it)
if "$PY" -c "import pytest" 2>/dev/null; then
  step gpu_tests "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_official.py
fi
echo "results in $OUT/ (exit $status)"
exit $status
