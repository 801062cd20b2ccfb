"""Guidance distillation: twins, the guided targets, the KL loss, a run that resumes exactly and
an export that samples with the conditional row alone."""

from __future__ import annotations

import json

import pytest
import torch

from lumos.config import DiffusionConfig
from lumos.diffusion import collate, make_sample, masked_hidden, masked_visual_loss
from lumos.masks import frame_causal
from lumos.sampler import combine_cfg
from lumos.train import train
from lumos.train.distill import guided_targets
from test_train import _one_thread, _tiny, videos  # noqa: F401, F811 (fixtures)

DCFG = DiffusionConfig("tube", 0.5, 0.0, 4096)


def _codes(seed: int, t: int = 3) -> torch.Tensor:
    return torch.randint(0, 16, (t, 3, 4), generator=torch.Generator().manual_seed(seed))


def _batch(layout, rope, seeds, dcfg=DCFG):
    samples = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        text = [5 + s, 6, 7][: 1 + s % 3]
        samples.append(make_sample(layout, _codes(s), text, dcfg, 2, 12, g, twin=True))
    return samples, collate(samples, rope, layout.vocab.pad)


def test_twins_mask_the_same_codes_without_the_text(layout, tiny_cfg):
    samples, batch = _batch(layout, tiny_cfg.rope, [0, 1, 2])
    for s in samples:
        u = s.uncond
        assert u is not None and len(u.seq) < len(s.seq)  # the text is gone
        assert torch.equal(s.inputs[s.loss_mask], u.inputs[u.loss_mask])  # MASK at both
        assert torch.equal(s.seq.tokens[s.loss_mask], u.seq.tokens[u.loss_mask])  # same codes
    assert batch["loss_mask"].sum() == batch["uncond_loss_mask"].sum()
    plain = {"inputs", "targets", "positions", "frame", "valid", "loss_mask"}
    assert set(batch) == plain | {f"uncond_{k}" for k in plain}
    # a text-dropped sample is its own twin
    g = torch.Generator().manual_seed(0)
    dropped = make_sample(layout, _codes(0), [5], DiffusionConfig("tube", 0.5, 1.0, 4096), 2, 12,
                          g, twin=True)  # fmt: skip
    assert torch.equal(dropped.inputs, dropped.uncond.inputs)


def test_guided_targets_are_the_samplers_cfg_distribution(tiny_model, layout, tiny_cfg):
    """The targets equal softmax(combine_cfg) of one unpadded forward per row: the distribution
    a MaskGIT step samples from with CFG."""
    scale = 3.0
    samples, batch = _batch(layout, tiny_cfg.rope, [0, 1])
    p = guided_targets(tiny_model, batch, scale)  # [N, V]
    assert p.shape == (int(batch["loss_mask"].sum()), layout.vocab.codebook_size)
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[0]))
    # the same numbers from one unpadded forward per row and the sampler's CFG rule
    want = []
    for s in samples:
        with torch.no_grad():
            rows = []
            for x in (s, s.uncond):
                pos = x.seq.positions(tiny_cfg.rope).unsqueeze(0)
                mask = frame_causal(x.seq.frame.unsqueeze(0), torch.ones(1, len(x.seq), dtype=bool),
                                    tiny_cfg.attn_backend, "cpu")  # fmt: skip
                h = tiny_model(x.inputs.unsqueeze(0), pos, mask, output="hidden")[0]
                rows.append(tiny_model.project(h[x.loss_mask], tiny_model.visual_rows()))
            guided = combine_cfg(torch.stack(rows).float(), 1, scale, True)[0]
        want.append(guided.softmax(-1))
    torch.testing.assert_close(p, torch.cat(want), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="twin"):
        guided_targets(tiny_model, {k: v for k, v in batch.items() if "uncond" not in k}, scale)


def test_kl_loss_is_zero_for_the_teacher_itself_and_pulls_towards_guidance(
    tiny_model, layout, tiny_cfg
):
    _, batch = _batch(layout, tiny_cfg.rope, [0, 1, 2])
    args = (batch["targets"], batch["loss_mask"], batch["frame"])
    with torch.no_grad():
        hidden = masked_hidden(tiny_model, batch)
        # scale 1 = the conditional distribution: the teacher matches it exactly
        same = masked_visual_loss(
            tiny_model, hidden, *args, soft=guided_targets(tiny_model, batch, 1.0)
        )
        assert abs(float(same["loss"])) < 1e-5
        far = masked_visual_loss(
            tiny_model, hidden, *args, soft=guided_targets(tiny_model, batch, 4.0)
        )
        assert float(far["loss"]) > 1e-3 and (far["per_token"] >= -1e-5).all()  # KL >= 0
        assert far["frame_sum"].sum() == pytest.approx(float(far["per_token"].sum()), rel=1e-5)
    with pytest.raises(ValueError, match="soft targets"):
        masked_visual_loss(
            tiny_model, hidden, *args, soft=torch.zeros(3, layout.vocab.codebook_size)
        )


def test_a_distillation_run_resumes_exactly_and_exports_cfg_1(videos, tmp_path):  # noqa: F811
    teacher = tmp_path / "teacher"
    train(_tiny(steps=4), str(videos), None, str(teacher), device="cpu", progress=False)
    cfg = _tiny(steps=6, lr=3e-3, warmup_steps=1, init_from=str(teacher / "latest"),
                distill_cfg=3.0)  # fmt: skip
    straight = train(cfg, str(videos), None, str(tmp_path / "a"), device="cpu", progress=False)
    losses = straight["losses"]
    assert all(x >= 0 for x in losses)  # KL to the guided targets
    train(cfg, str(videos), None, str(tmp_path / "b"), device="cpu", max_steps=3, progress=False)
    rest = train(cfg, str(videos), None, str(tmp_path / "b"), resume=True, device="cpu",
                 progress=False)  # fmt: skip
    assert rest["losses"] == losses[3:] and rest["weights_digest"] == straight["weights_digest"]
    saved = json.loads((tmp_path / "b" / "latest" / "config.json").read_text())["train"]
    assert saved["distill_cfg"] == 3.0

    from lumos.prepare import export_bundle

    data = tmp_path / "data"
    (data / "tokenizer").mkdir(parents=True)
    (data / "tokenizer" / "config.json").write_text("{}")
    (data / "text_tokenizer.json").write_text("{}")
    out = export_bundle(tmp_path / "b", data, tmp_path / "bundle")
    settings = json.loads((out / "pipeline.json").read_text())
    assert settings["cfg_video"] == 1.0 and settings["cfg_image"] == 1.0
    out = export_bundle(tmp_path / "b", data, tmp_path / "bundle", overrides={"cfg_video": 2.0})
    assert json.loads((out / "pipeline.json").read_text())["cfg_video"] == 2.0


def test_the_objective_moves_the_conditional_row_towards_guidance(tiny_model, layout, tiny_cfg):
    import copy

    from lumos.train.loop import ARDFObjective

    teacher = copy.deepcopy(tiny_model)
    with torch.no_grad():  # a teacher whose prompt matters: sharper logits, a real CFG gap
        teacher.lm_head.weight.mul_(10.0)
        teacher.embed_tokens.weight.mul_(3.0)
    student = copy.deepcopy(teacher).train()
    objective = ARDFObjective(student, 4096, teacher.eval(), 3.0)
    assert [n for n, _ in objective.named_parameters()] == [
        f"model.{n}" for n, _ in student.named_parameters()
    ]  # the teacher is neither trained nor saved
    _, batch = _batch(layout, tiny_cfg.rope, [0, 1, 2])
    opt = torch.optim.SGD(student.parameters(), lr=1e-3)
    kls = []
    for _ in range(8):
        res = objective(batch)
        kls.append(float(res["loss"].detach()))
        opt.zero_grad()
        res["loss"].backward()
        opt.step()
    assert kls[0] > 5e-2 and kls[-1] < 0.4 * kls[0], kls


def test_distill_cfg_needs_a_teacher_and_a_scale_above_1():
    with pytest.raises(ValueError, match="needs init_from"):
        _tiny(distill_cfg=3.0)
    with pytest.raises(ValueError, match="must be > 1"):
        _tiny(distill_cfg=0.5, init_from="x")
    assert _tiny().distill_cfg == 0.0
