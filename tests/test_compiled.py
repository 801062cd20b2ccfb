"""Compiled frame steps (lumos.model.CompiledLayers): the same numbers as the eager model, only
where they apply, from several threads at once, and in the worker (compiled in the background)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from lumos.config import model_preset
from lumos.devices import has_cxx_compiler, resolve_compile
from lumos.kvcache import KVCache
from lumos.model import CompiledLayers, build_model, compile_steps
from lumos.sampler import RowThreads, block_forward

L = 12  # the block length the tiny model is compiled for

needs_cxx = pytest.mark.skipif(
    not has_cxx_compiler(),
    reason="inductor needs a C++ compiler for CPU kernels",
)


@pytest.fixture(scope="module")
def models():
    """(eager, compiled): the same tiny random weights, the second with compiled steps."""
    torch.manual_seed(0)
    cfg = model_preset("tiny")
    eager = build_model(cfg, seed=3).eval()
    fast = build_model(cfg, seed=3).eval()
    compile_steps(fast, L, batches=(1, 2))
    return eager, fast


def _cache(cfg, lengths: list[int]) -> KVCache:
    """A cache whose rows hold `lengths` random committed keys/values (the same every call)."""
    g = torch.Generator().manual_seed(1)
    c = KVCache.for_model(cfg, len(lengths), max(lengths) + L)
    c.k.copy_(torch.randn(c.k.shape, generator=g))
    c.v.copy_(torch.randn(c.v.shape, generator=g))
    c.lengths = list(lengths)
    return c


def _block(cfg, rows: int, n: int = L, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, cfg.vocab_size, (rows, n), generator=g)  # [R, n]
    pos = torch.randint(0, 40, (rows, 3, n), generator=g)  # [R, 3, n]
    return toks, pos


@needs_cxx
@pytest.mark.parametrize("lengths", [[30], [30, 30], [25, 41, 33]])
def test_compiled_steps_give_the_eager_hidden_states_and_cache_writes(models, lengths):
    eager, fast = models
    cfg = eager.cfg
    toks, pos = _block(cfg, len(lengths))
    c_eager, c_fast = _cache(cfg, lengths), _cache(cfg, lengths)
    with torch.inference_mode():
        assert fast.compiled.serves(fast.embed_tokens(toks))
        ref = eager(toks, pos, c_eager.key_mask(L), c_eager, output="hidden")  # [R, L, D]
        out = fast(toks, pos, c_fast.key_mask(L), c_fast, output="hidden")
        logits = fast(toks, pos, c_fast.key_mask(L), c_fast)  # [R, L, V]
        ref_logits = eager.lm_head(ref)
    assert out.shape == ref.shape == (len(lengths), L, cfg.dim)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(logits, ref_logits, atol=5e-4, rtol=5e-4)
    # the block's keys/values land where the eager forward writes them
    torch.testing.assert_close(c_fast.k, c_eager.k, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(c_fast.v, c_eager.v, atol=2e-4, rtol=2e-4)
    assert c_fast.lengths == c_eager.lengths == lengths  # written, not committed


@needs_cxx
def test_compiled_steps_apply_only_to_warm_shapes_without_autograd(models):
    eager, fast = models
    cfg = eager.cfg
    x = torch.zeros(2, L, cfg.dim)
    with torch.inference_mode():
        assert fast.compiled.serves(x)
        assert not fast.compiled.serves(torch.zeros(2, L + 1, cfg.dim))  # a prefill's length
        assert not fast.compiled.serves(x.to(torch.bfloat16))
    assert not fast.compiled.serves(x)  # autograd on: the eager path
    cold = CompiledLayers(build_model(cfg, seed=3).eval(), L)
    with torch.inference_mode():
        assert not cold.serves(x)  # nothing warm yet: forwards stay eager meanwhile
    # a prefill (another length) through the compiled model equals the eager one
    toks, pos = _block(cfg, 2, n=L + 5)
    a, b = _cache(cfg, [7, 7]), _cache(cfg, [7, 7])
    with torch.inference_mode():
        torch.testing.assert_close(
            fast(toks, pos, None, a, output="hidden"), eager(toks, pos, None, b, output="hidden")
        )


@needs_cxx
def test_compiled_steps_run_from_row_threads_at_once(models):
    """The worker splits a step's rows over threads that call the compiled graphs together."""
    eager, fast = models
    cfg = eager.cfg
    lengths = [30, 30, 44, 44]
    toks, pos = _block(cfg, len(lengths))
    threads = RowThreads(2)
    try:
        with torch.inference_mode():
            for _ in range(3):
                c_eager, c_fast = _cache(cfg, lengths), _cache(cfg, lengths)
                ref = block_forward(eager, toks, pos, c_eager)
                out = block_forward(fast, toks, pos, c_fast, threads)
                torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    finally:
        threads.close()


def test_resolve_compile_choices():
    assert resolve_compile("off", "cpu", torch.bfloat16) is False
    assert resolve_compile("auto", "cpu", torch.float32) is False  # measured: AMX + bf16 only
    assert resolve_compile("auto", "cuda", torch.bfloat16) is False
    with pytest.raises(ValueError, match="unknown compile choice 'fast'"):
        resolve_compile("fast", "cpu", torch.float32)
    if has_cxx_compiler():
        assert resolve_compile("on", "cpu", torch.float32) is True


def test_serve_config_names_a_bad_compile_choice():
    from lumos.cluster.runtime import ServeConfig

    with pytest.raises(ValueError, match="compile must be auto, on or off, got 'yes'"):
        ServeConfig(model="random:tiny", workers=0, compile="yes")


@needs_cxx
def test_worker_compiles_in_the_background_and_serves_meanwhile():
    from lumos.cluster.worker import Worker

    worker = Worker(model="random:tiny", threads=1, compile="on")
    try:
        info = asyncio.run(worker.info())
        assert info["compile"] in ("compiling", "ready")
        deadline = time.monotonic() + 300
        while worker.compile_state == "compiling" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert worker.compile_state == "ready", worker.compile_state
        fast = worker.pipe.model.compiled
        assert fast is not None and fast.length == worker.pipe.layout.block_len
        x = torch.zeros(2, fast.length, worker.pipe.model.cfg.dim)
        with torch.inference_mode():
            assert fast.serves(x)
        codes = worker.pipe.generate_codes("a red bag", 2, seed=0)  # through the compiled steps
        assert codes.shape[0] == 2 and int(codes.min()) >= 0
    finally:
        asyncio.run(worker.stop())
