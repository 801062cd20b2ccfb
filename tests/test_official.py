"""Official Lumos-1 folders as released: loading, refusals, the prompt rule, every entry point.

The release is the tiny fixture of `official_fixture` (random weights, bfloat16, [1, head_dim]
q/k norms, Chameleon's extra keys, a TorchScript Cosmos pair beside it). Generation runs at
64x64 (an 8x8 latent grid) with 2 steps so that the 64,000-way code softmax stays cheap on CPU.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lumos.checkpoint import load_model
from lumos.cli import main
from lumos.pipeline import Pipeline
from lumos.settings import PipelineSettings
from lumos.video import read_video
from official_fixture import HF_CONFIG, make_release, release_state, write_checkpoint

torch.set_num_threads(1)
PROMPT = "a red sneaker moves left"


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_release(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def pipe(release):
    return Pipeline.from_folder(release[0], device="cpu", dtype="float32", resolution="64x64")


# -- the loader ------------------------------------------------------------------------------------
def test_release_loads_and_mp_norms_repeat_over_heads(release, tmp_path):
    model, rep = load_model(release[0])
    assert rep.missing == [] and rep.unexpected == []
    assert any(k.startswith("model.vqmodel.") for k in rep.ignored)
    assert any(k.startswith("model.vocabulary_mapping.") for k in rep.ignored)
    assert model.cfg.rope == "mm" and model.cfg.n_kv_heads == 1 and model.cfg.vocab == "official"
    state = load_file(str(release[0] / "model.safetensors"))
    stored = state["model.layers.1.self_attn.q_norm.weight"].float()  # [1, head_dim]
    assert stored.shape == (1, 32)
    q = model.layers[1].self_attn.q_norm.weight  # [heads, head_dim]
    assert q.shape == (2, 32) and torch.equal(q, stored.expand(2, 32))
    # the same weights with the norms written out per head (the HF layout) give the same logits
    per_head = {
        k: (v.expand(2 if "q_norm" in k else 1, -1).contiguous() if "_norm." in k else v)
        for k, v in state.items()
    }
    hf = tmp_path / "per-head"
    hf.mkdir()
    save_file(per_head, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps(HF_CONFIG))
    other, _ = load_model(hf)
    toks = torch.randint(0, 8000, (1, 9))
    pos = torch.arange(9).view(1, 1, 9).expand(1, 3, 9)
    with torch.no_grad():
        assert torch.equal(model(toks, pos), other(toks, pos))


def test_model_parallel_rows_go_to_their_ranks_heads(tmp_path):
    cfg = {**HF_CONFIG, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 128}
    state = release_state(cfg, mp=2)  # q/k norms [2, 32]: one row per model-parallel rank
    write_checkpoint(tmp_path, cfg, state)
    model, _ = load_model(tmp_path)
    rows = state["model.layers.0.self_attn.q_norm.weight"].float()
    q = model.layers[0].self_attn.q_norm.weight  # 4 heads: ranks own heads {0, 1} and {2, 3}
    assert torch.equal(q, rows[[0, 0, 1, 1]])
    k_rows = state["model.layers.0.self_attn.k_norm.bias"].float()
    assert torch.equal(model.layers[0].self_attn.k_norm.bias, k_rows[[0, 1]])  # 2 KV heads


def test_a_norm_that_fits_no_head_count_is_refused(tmp_path):
    state = release_state(HF_CONFIG, mp=3)  # 3 rows for 2 query heads
    write_checkpoint(tmp_path, HF_CONFIG, state)
    with pytest.raises(ValueError, match="8 tensors do not fit") as info:
        load_model(tmp_path)  # q/k norm weight and bias of both layers, all named at once
    assert "model.layers.1.self_attn.q_norm.weight: checkpoint shape (3, 32) != model (2, 32)" in (
        str(info.value)
    )


@pytest.mark.parametrize(
    "key, value",
    [
        ("swin_norm", True),
        ("attention_bias", True),
        ("mlp_bias", True),
        ("hidden_act", "gelu"),
        ("tie_word_embeddings", True),
        ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ],
)
def test_unimplemented_config_values_are_refused_by_name(tmp_path, key, value):
    (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIG, key: value}))
    with pytest.raises(ValueError, match=f"unsupported Chameleon config.json: {key}="):
        load_model(tmp_path)


def test_every_refused_value_is_reported_at_once(tmp_path):
    bad = {**HF_CONFIG, "swin_norm": True, "mlp_bias": True}
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="swin_norm=true .*; mlp_bias=true"):
        load_model(tmp_path)


def test_unexpected_and_missing_keys_are_errors_reported_together(tmp_path):
    state = release_state(HF_CONFIG)
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)  # a bias we do not have
    state["model.extra_head.weight"] = torch.zeros(2, 2)
    del state["model.norm.weight"]
    write_checkpoint(tmp_path, HF_CONFIG, state)
    with pytest.raises(ValueError) as info:
        load_model(tmp_path)
    msg = str(info.value)
    assert "1 missing keys: norm.weight" in msg
    assert "model.layers.0.self_attn.q_proj.bias" in msg and "model.extra_head.weight" in msg
    _, rep = load_model(tmp_path, strict=False)  # the report, for inspection
    assert rep.missing == ["norm.weight"] and len(rep.unexpected) == 2


# -- the released defaults and the prompt rule -------------------------------------------------
def test_official_defaults_come_from_one_place(release):
    p = Pipeline.from_folder(release[0], device="cpu", dtype="float32")
    assert p.settings == PipelineSettings.official("448x256")
    s = p.settings
    assert (s.width, s.height, s.frames, s.fps, s.steps) == (448, 256, 25, 12, 50)
    assert (s.cfg_video, s.cfg_image) == (15.0, 16.0)
    assert (p.layout.h, p.layout.w, p.layout.block_len) == (32, 56, 1828)  # method.md section 1
    sc = p.sampler_config()
    assert (sc.steps, sc.cfg) == (50, 15.0) and p.sampler_config(image=True).cfg == 16.0
    big = p.at_resolution("672x384")
    assert (big.layout.h, big.layout.w, big.layout.block_len) == (48, 84, 4084)


def test_official_prompt_states_fps_times_duration(pipe):
    cond = pipe.conditioning(25)  # the default clip: 25 RGB frames at 12 fps
    assert (cond.text_frames, cond.duration, cond.fps) == (24, 2, 12)
    assert tuple(pipe.conditioning(1, image=True)) == (1, 1, 1)
    text = pipe.text.decode(pipe.text_ids("a cat", cond.text_frames, cond.fps))
    assert "consisting of 24 frames at 12 frames per second" in text and text.endswith("a cat")
    # our models keep the RGB count (one rule per folder)
    assert PipelineSettings(fps=8).conditioning(16).text_frames == 16
    # a video longer than the default clip keeps the trained duration (no number-token overflow)
    assert tuple(pipe.conditioning(10_001)) == (24, 2, 12)
    assert PipelineSettings(fps=8, frames=16).conditioning(5_000).duration == 2


def test_bad_resolutions_are_refused(release):
    p = Pipeline.from_folder(release[0], device="cpu", dtype="float32")
    for bad, why in (("448x250", "multiples of 32"), ("448", "WIDTHxHEIGHT"), ("0x64", "positive")):
        with pytest.raises(ValueError, match=why):
            p.at_resolution(bad)
    with pytest.raises(ValueError, match="released resolutions"):
        PipelineSettings.official("640x480")


def test_tokenizer_runs_on_the_models_device(pipe):
    assert pipe.visual.device == pipe.device == torch.device("cpu")


@pytest.mark.gpu
def test_tokenizer_runs_on_the_models_device_gpu(release):
    p = Pipeline.from_folder(release[0], device="cuda", resolution="64x64")
    assert p.visual.device.type == "cuda" and p.device.type == "cuda"
    assert p.visual.dtype == torch.bfloat16 and next(p.model.parameters()).dtype == torch.bfloat16
    video = p.text_to_video(PROMPT, frames=5, steps=2)
    assert video.shape == (5, 64, 64, 3) and video.device.type == "cpu"


# -- every generation mode, from Python and from the CLI ----------------------------------------
def test_t2i_t2v_i2v_and_continuation_in_python(pipe):
    image = pipe.text_to_image(PROMPT, steps=2)
    assert image.shape == (1, 64, 64, 3) and image.dtype == torch.uint8
    video = pipe.text_to_video(PROMPT, frames=5, steps=2, seed=1)
    assert video.shape == (5, 64, 64, 3)
    i2v = pipe.image_to_video(video[0], "a blue bag falls", frames=5, steps=2)
    assert i2v.shape == (5, 64, 64, 3)
    first = pipe.encode_image(video[0])[0]
    assert torch.equal(pipe.visual.encode(i2v[:1])[0], first)  # the given frame stays frame 0
    codes = pipe.generate_codes(PROMPT, 2, steps=2, rgb_frames=5)
    more = pipe.extend(codes, "a red sneaker moves up", frames=4, steps=2)
    assert more.shape == (3, 8, 8) and torch.equal(more[:2], codes)


def _cli(release, *args) -> None:
    model, cosmos = release
    base = ["generate", "--model", str(model), "--tokenizer", str(cosmos), "--resolution", "64x64"]
    assert main([*base, "--steps", "2", "--dtype", "float32", "-q", *map(str, args)]) == 0


def test_cli_runs_every_mode(release, tmp_path, capsys):
    t2v = tmp_path / "t2v.mp4"
    _cli(release, PROMPT, "--frames", "9", "-o", str(t2v))
    assert read_video(t2v).shape == (9, 64, 64, 3)
    t2i = tmp_path / "t2i.png"
    _cli(release, "a blue bag", "-o", str(t2i))
    assert np.asarray(Image.open(t2i)).shape == (64, 64, 3)
    first = tmp_path / "first.png"
    Image.fromarray(read_video(t2v)[0]).save(first)
    i2v = tmp_path / "i2v.mp4"
    _cli(release, "a blue bag falls", "--image", str(first), "--frames", "5", "-o", str(i2v))
    assert read_video(i2v).shape == (5, 64, 64, 3)
    longer = tmp_path / "longer.mp4"
    _cli(release, "a red sneaker moves up", "--extend", str(t2v), "--frames", "4", "-o", longer)
    assert read_video(longer).shape == (13, 64, 64, 3)  # 9 given + 4 more
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--resolution", "100x64"], "multiples of 32"),
        (["--steps", "0"], "steps must be >= 1"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--cfg", "-1"], "GPU|cfg"),
    ],
)
def test_cli_refuses_bad_flags_by_name(release, tmp_path, args, message):
    model, cosmos = release
    argv = ["generate", PROMPT, "--model", str(model), "-o", str(tmp_path / "x.mp4"), *args]
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_cli_refuses_an_empty_prompt_and_a_missing_tokenizer(release, tmp_path):
    with pytest.raises(SystemExit, match="prompt is empty"):
        main(["generate", "  ", "--model", str(release[0]), "-o", str(tmp_path / "x.mp4")])
    lone = write_checkpoint(tmp_path / "alone", HF_CONFIG, release_state(HF_CONFIG))
    with pytest.raises(SystemExit, match="no Cosmos-Tokenizer-DV4x8x8 folder"):
        main(["generate", PROMPT, "--model", str(lone), "-o", str(tmp_path / "x.mp4")])


def test_auto_dtype_is_decided_by_measurement_on_cpu():
    from lumos.devices import bf16_is_faster, cpu_has_fast_bf16, resolve_dtype

    shape = (16, 32, 32)
    auto = resolve_dtype("auto", "cpu", shape)
    if not cpu_has_fast_bf16():  # emulated bf16 is never chosen
        assert auto == torch.float32
    else:  # hardware bf16: chosen only where it measured faster at the model's shape
        assert auto == (torch.bfloat16 if bf16_is_faster(*shape) else torch.float32)
    assert resolve_dtype("auto", "cuda", shape) == torch.bfloat16
    assert resolve_dtype("float32", "cpu", shape) == torch.float32
    assert isinstance(bf16_is_faster(8, 16, 16, rounds=1, calls=1), bool)
