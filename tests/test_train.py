"""Training loop: exact resume, DDP under torchrun, overfitting, logs, data order, CLI."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lumos.checkpoint import load_model, read_config
from lumos.config import model_preset
from lumos.data import write_shards
from lumos.devices import cpu_has_fast_bf16
from lumos.train import (
    EMA,
    EMA_DIR,
    TRAIN_PRESETS,
    DataOrder,
    StepPlan,
    TrainConfig,
    build_parser,
    config_from_args,
    grow_depth,
    lr_factor,
    main,
    make_optimizer,
    model_flops_per_token,
    train,
    train_preset,
    weights_digest,
)

GRID = (3, 4)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine OpenMP barriers make 2 threads ~100x
    slower for these tiny matmuls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)  # latent h, w of the synthetic shards


def _encode_video(video: np.ndarray) -> np.ndarray:
    """Dummy tokenizer: codes [t, 3, 4] from a small alphabet, seeded by the clip's pixel value."""
    rng = np.random.default_rng(int(video[0, 0, 0, 0]))
    return rng.integers(0, 16, size=(video.shape[0], *GRID))


def _encode_text(caption: str) -> list[int]:
    return list(caption.encode())  # bytes < 256 = the tiny vocabulary's text ids


def _shards(folder: Path, n: int, frames: int, offset: int = 0) -> Path:
    clips = [
        (np.full((frames, 8 * GRID[0], 8 * GRID[1], 3), offset + i, np.uint8), f"clip {i}")
        for i in range(n)
    ]
    write_shards(
        clips, _encode_video, _encode_text, folder, shard_size=3, codebook_size=512,
        tokenizer_name="dummy",
    )  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return _shards(tmp_path_factory.mktemp("videos"), n=5, frames=3)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return _shards(tmp_path_factory.mktemp("images"), n=7, frames=1, offset=50)


def _tiny(**kw) -> TrainConfig:
    base = dict(batch_size=2, image_batch_size=3, log_every=1, ckpt_every=0, warmup_steps=2)
    return train_preset("tiny", **{**base, **kw})


def test_resume_gives_exactly_the_same_losses(videos, images, tmp_path):
    # the joint schedule and the lr decay both cross the resume
    cfg = _tiny(steps=5, image_steps=1, video_steps=2, decay="cosine", min_lr_ratio=0.2)
    straight = train(cfg, str(videos), str(images), str(tmp_path / "a"), device="cpu",
                     progress=False)  # fmt: skip
    first = train(cfg, str(videos), str(images), str(tmp_path / "b"), device="cpu",
                  max_steps=2, progress=False)  # fmt: skip
    assert first["step"] == 2 and first["losses"] == straight["losses"][:2]
    rest = train(cfg, str(videos), str(images), str(tmp_path / "b"), resume=True, device="cpu",
                 progress=False)  # fmt: skip
    assert rest["start_step"] == 2 and rest["steps"] == [3, 4, 5]
    assert rest["losses"] == straight["losses"][2:]  # bit-exact
    assert rest["weights_digest"] == straight["weights_digest"]
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]

    state = torch.load(tmp_path / "b" / "latest" / "trainer.pt", weights_only=False)
    assert state["step"] == 5
    # steps 0..4 with schedule 1:2 -> image steps 0, 3; video steps 1, 2, 4
    assert state["data"]["positions"] == {"video": 3 * 2, "image": 2 * 3}
    assert {"torch", "python", "numpy"} <= set(state["rng"][0])
    meta = read_config(tmp_path / "b" / "latest")
    assert meta["train"]["image_steps"] == 1 and meta["step"] == 5
    lay = meta["layout"]
    assert (lay["t"], lay["h"], lay["w"]) == (3, *GRID) and lay["vocab"] == "tiny"
    assert lay["compression"] == [1, 8, 8] and lay["tokenizer"] == "dummy"
    model, rep = load_model(tmp_path / "b" / "latest")
    assert not rep.missing and weights_digest(model) == straight["weights_digest"]
    # batches built in DataLoader worker processes are the same batches
    workers = train(cfg.replace(num_workers=1), str(videos), str(images), str(tmp_path / "c"),
                    device="cpu", max_steps=3, progress=False)  # fmt: skip
    assert workers["losses"] == straight["losses"][:3]


def test_overfits_one_shard_and_writes_logs(tmp_path):
    data = _shards(tmp_path / "one", n=2, frames=2)
    cfg = _tiny(steps=30, lr=3e-3, log_every=5, scheme="tube")
    res = train(cfg, str(data), None, str(tmp_path / "run"), device="cpu", progress=False)
    losses = res["losses"]
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 1.0, losses
    assert res["tokens_per_s"] > 0

    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10, 15, 20, 25, 30]
    for r in lines:
        assert {"loss", "per_frame_loss", "tokens_per_s", "lr"} <= set(r)
        assert len(r["per_frame_loss"]) == 2 and all(v > 0 for v in r["per_frame_loss"])
    assert lines[-1]["lr"] == pytest.approx(3e-3)  # constant after warm-up

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s"} <= tags
    assert {"frame_loss/frame_00", "frame_loss/frame_01"} <= tags
    assert len(acc.Scalars("train/loss")) == 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_under_torchrun(videos, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "lumos.train", "--preset", "tiny", "--data", str(videos), "--out", str(out),
        "--steps", "3", "--log-every", "1", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = re.findall(
        r"\[rank (\d)/2\] done step=3 loss=(\S+) .*?weights=([0-9a-f]{16})", proc.stdout
    )
    assert sorted(r for r, _, _ in done) == ["0", "1"], proc.stdout
    assert len({loss for _, loss, _ in done}) == 1  # the global loss, seen by both ranks
    digests = {d for _, _, d in done}
    assert len(digests) == 1  # both ranks hold the same weights
    model, _ = load_model(out / "latest")
    assert weights_digest(model) == digests.pop()
    state = torch.load(out / "latest" / "trainer.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["data"]["positions"]["video"] == 3 * 2 * 2  # 3 steps x 2 ranks x batch 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]  # rank 0 logs only
    # 2 ranks x batch 2 read the same global batches as 1 process x batch 4: same losses
    one = train(_tiny(steps=3, warmup_steps=5, batch_size=4), str(videos), None,
                str(tmp_path / "one"), device="cpu", progress=False)  # fmt: skip
    assert [r["loss"] for r in lines] == pytest.approx(one["losses"], rel=1e-5)


def test_lr_schedule_warmup_then_decay():
    cfg = train_preset("tiny", lr=1.0, warmup_steps=4, steps=104, min_lr_ratio=0.1)
    assert [lr_factor(cfg, s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(cfg, 50) == 1.0 and lr_factor(cfg, 500) == 1.0  # constant by default
    cos, lin = cfg.replace(decay="cosine"), cfg.replace(decay="linear")
    assert lr_factor(cos, 4) == pytest.approx(1.0) and lr_factor(lin, 4) == pytest.approx(1.0)
    assert lr_factor(cos, 54) == pytest.approx(0.55) and lr_factor(lin, 54) == pytest.approx(0.55)
    assert lr_factor(cos, 29) == pytest.approx(0.1 + 0.9 * (0.5 + 0.5 * math.cos(math.pi / 4)))
    assert lr_factor(cos, 104) == pytest.approx(0.1) and lr_factor(lin, 200) == pytest.approx(0.1)
    factors = [lr_factor(cos, s) for s in range(4, 105)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))  # monotone down
    model = torch.nn.Linear(2, 2)
    opt, sched = make_optimizer(model, cos)
    for _ in range(54):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.55)
    with pytest.raises(ValueError, match="decay"):
        train_preset("tiny", decay="step")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        train_preset("tiny", min_lr_ratio=1.5)


def test_bf16_autocast_on_amx_cpus_tracks_float32(videos, tmp_path):
    kw = dict(steps=3, batch_size=2)
    fp32 = train(_tiny(bf16=False, **kw), str(videos), None, str(tmp_path / "a"), device="cpu",
                 progress=False)  # fmt: skip
    bf16 = train(_tiny(bf16=True, **kw), str(videos), None, str(tmp_path / "b"), device="cpu",
                 progress=False)  # fmt: skip
    assert fp32["bf16"] is False and bf16["bf16"] is cpu_has_fast_bf16()
    assert all(math.isfinite(x) for x in bf16["losses"])
    assert bf16["losses"] == pytest.approx(fp32["losses"], rel=0.02)  # same data, same masks


def test_data_order_is_a_permutation_per_epoch_and_seeded():
    o = DataOrder(7, seed=3, stream=0)
    first, second = o.take(0, 7), o.take(7, 7)
    assert sorted(first) == list(range(7)) and sorted(second) == list(range(7))
    assert first != second
    assert DataOrder(7, seed=3, stream=0).take(0, 14) == first + second
    assert DataOrder(7, seed=4, stream=0).take(0, 7) != first


def test_step_plan_schedule_and_positions():
    plan = StepPlan(0, {"video": 0, "image": 0}, {"video": 2, "image": 12}, 6, 1)
    kinds = [plan.kind(s) for s in range(14)]
    assert kinds == (["image"] * 6 + ["video"]) * 2  # "6 images : 1 video" cycles
    assert plan.positions(14) == {"video": 4, "image": 12 * 12}
    later = StepPlan(9, plan.positions(9), {"video": 2, "image": 12}, 6, 1)
    assert later.positions(14) == plan.positions(14)  # resuming mid-cycle changes nothing
    videos_only = StepPlan(0, {"video": 0}, {"video": 4}, 0, 1)
    assert videos_only.kind(5) == "video" and videos_only.positions(5)["video"] == 20


def test_presets_and_config_round_trip():
    assert set(TRAIN_PRESETS) >= {"tiny", "fmnist", "1b", "3b"}
    for name, cfg in TRAIN_PRESETS.items():
        assert cfg.grad_clip == 4.0 and cfg.betas == (0.9, 0.95) and cfg.weight_decay == 0.1
        assert cfg.min_mask_ratio == 0.7 and cfg.text_dropout == 0.1, name
        assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert TRAIN_PRESETS["1b"].schedule == "1:1" and TRAIN_PRESETS["1b"].image_batch_size == 6
    with pytest.raises(ValueError, match="scheme"):
        TrainConfig(scheme="checkerboard")
    with pytest.raises(ValueError, match="rope"):
        TrainConfig(rope="2d")


def test_cli_flags_override_the_preset(tmp_path):
    args = build_parser().parse_args(
        ["--preset", "tiny", "--data", "d", "--out", str(tmp_path), "--lr", "0.01",
         "--batch-size", "3", "--rope", "1d", "--scheme", "random", "--seed", "7",
         "--steps", "9", "--schedule", "6:1", "--activation-checkpointing"]
    )  # fmt: skip
    cfg = config_from_args(args)
    tiny = TRAIN_PRESETS["tiny"]
    assert (cfg.lr, cfg.batch_size, cfg.rope, cfg.scheme, cfg.seed, cfg.steps) == (
        0.01, 3, "1d", "random", 7, 9
    )  # fmt: skip
    assert (cfg.image_steps, cfg.video_steps, cfg.activation_checkpointing) == (6, 1, True)
    assert cfg.replace(lr=tiny.lr, batch_size=2, rope="mm", scheme="tube", seed=0, steps=30,
                       image_steps=1, activation_checkpointing=False) == tiny  # fmt: skip


def test_cli_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    rc = main(["--preset", "tiny", "--data", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "nope" in err


def test_ema_of_the_weights_resumes_exactly_and_loads_as_a_model(videos, tmp_path):
    cfg = _tiny(steps=4, ema_decay=0.9)
    straight = train(cfg, str(videos), None, str(tmp_path / "a"), device="cpu", progress=False)
    train(cfg, str(videos), None, str(tmp_path / "b"), device="cpu", max_steps=2, progress=False)
    rest = train(cfg, str(videos), None, str(tmp_path / "b"), resume=True, device="cpu",
                 progress=False)  # fmt: skip
    assert rest["ema_digest"] == straight["ema_digest"]  # the average survives the resume
    assert straight["ema_digest"] != straight["weights_digest"]
    ema, rep = load_model(tmp_path / "a" / "latest" / EMA_DIR)  # a model folder like any other
    assert not rep.missing and weights_digest(ema) == straight["ema_digest"]
    state = torch.load(tmp_path / "a" / "latest" / "trainer.pt", weights_only=False)
    assert state["ema_updates"] == 4
    off = train(_tiny(steps=1), str(videos), None, str(tmp_path / "c"), device="cpu",
                progress=False)  # fmt: skip
    assert off["ema_digest"] is None  # off by default
    with pytest.raises(ValueError, match="ema_decay"):
        _tiny(ema_decay=1.0)


def test_ema_update_follows_its_warm_up_rule(tiny_model):
    ema = EMA(tiny_model, decay=0.99)
    target = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
    before = ema.model.lm_head.weight.clone()
    ema.update(target)  # first update: d = min(0.99, 1 / 10) = 0.1
    want = 0.1 * before + 0.9 * target.lm_head.weight
    assert torch.allclose(ema.model.lm_head.weight, want, atol=1e-6) and ema.updates == 1


def test_resume_without_checkpoint_is_a_clear_error(videos, tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(_tiny(steps=2), str(videos), None, str(tmp_path), resume=True, device="cpu")


def test_model_flops_per_token():
    cfg = model_preset("tiny")
    f0, f1 = model_flops_per_token(cfg, 0), model_flops_per_token(cfg, 100)
    layers = cfg.num_params() - 2 * cfg.vocab_size * cfg.dim - cfg.dim
    assert f0 == 6 * (layers + cfg.vocab_spec.codebook_size * cfg.dim)
    assert f1 - f0 == 12 * cfg.n_layers * cfg.dim * 100
    big = model_preset("1b")
    assert 6 * 1.0e9 < model_flops_per_token(big, 0) < 6 * 1.6e9


def test_cli_trains_and_resumes_with_the_saved_config(videos, tmp_path, capsys):
    common = ["--data", str(videos), "--out", str(tmp_path), "--device", "cpu", "--no-progress"]
    assert main(["--preset", "tiny", "--steps", "2", "--batch-size", "3", *common]) == 0
    assert "done step=2" in capsys.readouterr().out
    assert main(["--resume", "--steps", "3", *common]) == 0  # base: the checkpoint's config
    assert "done step=3" in capsys.readouterr().out
    meta = read_config(tmp_path / "latest")
    assert meta["train"]["batch_size"] == 3 and meta["train"]["steps"] == 3 and meta["step"] == 3


def test_activation_checkpointing_and_other_schemes(videos, tmp_path):
    cfg = _tiny(steps=2, rope="1d", scheme="independent")
    plain = train(cfg, str(videos), None, str(tmp_path / "a"), device="cpu", progress=False)
    ckpt = train(cfg.replace(activation_checkpointing=True), str(videos), None,
                 str(tmp_path / "b"), device="cpu", progress=False)  # fmt: skip
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-6)
    assert read_config(tmp_path / "b" / "latest")["model"]["rope"] == "1d"
    rnd = train(cfg.replace(scheme="random", rope="3d"), str(videos), None, str(tmp_path / "c"),
                device="cpu", progress=False)  # fmt: skip
    assert all(np.isfinite(rnd["losses"]))


def test_grow_depth_keeps_the_function_then_trains(videos, tmp_path):
    from lumos.model import build_model

    small = build_model(model_preset("tiny"), seed=3).eval()  # 2 layers
    tokens = torch.randint(0, 300, (2, 20))  # [B, L]
    positions = torch.randint(0, 6, (2, 3, 20))  # [B, 3, L]
    for n in (2, 3, 5):
        big = grow_depth(small, n).eval()
        assert big.cfg.n_layers == n and len(big.layers) == n
        with torch.no_grad():
            torch.testing.assert_close(big(tokens, positions), small(tokens, positions))
    big = grow_depth(small, 4)  # old layers at 0 and 2; new ones copy them, outputs zeroed
    assert torch.equal(big.layers[2].mlp.up_proj.weight, small.layers[1].mlp.up_proj.weight)
    q0, q1 = small.layers[0].self_attn.q_proj.weight, big.layers[1].self_attn.q_proj.weight
    assert torch.equal(q0, q1)
    assert not big.layers[1].self_attn.o_proj.weight.any()
    assert not big.layers[3].mlp.down_proj.weight.any()
    with pytest.raises(ValueError, match="cannot grow"):
        grow_depth(small, 1)
    with pytest.raises(ValueError, match="needs init_from"):
        _tiny(grow_layers=3)

    # `lumos train --init-from RUN --grow-layers 3`: the run starts at the same loss, then trains
    base = train(_tiny(steps=2), str(videos), None, str(tmp_path / "a"), device="cpu",
                 progress=False)  # fmt: skip
    same = _tiny(steps=1, lr=1e-9, warmup_steps=0, init_from=str(tmp_path / "a" / "latest"))
    ref = train(same, str(videos), None, str(tmp_path / "b"), device="cpu", progress=False)
    common = ["--data", str(videos), "--device", "cpu", "--no-progress", "--preset", "tiny"]
    rc = main([*common, "--out", str(tmp_path / "c"), "--steps", "1", "--lr", "1e-9",
               "--warmup", "0", "--init-from", str(tmp_path / "a" / "latest"),
               "--grow-layers", "3"])  # fmt: skip
    assert rc == 0 and base["step"] == 2
    grown, rep = load_model(tmp_path / "c" / "latest")
    assert grown.cfg.n_layers == 3 and not rep.missing
    first = json.loads((tmp_path / "c" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(ref["losses"][0], rel=1e-4)
