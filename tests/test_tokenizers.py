"""Tests of lumos.tokenizers: FSQ, the built-in FSQ video tokenizer, the Cosmos adapter (with fake
TorchScript modules), streaming decoding, reconstruction metrics and the text tokenizer."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lumos.tokenizers import (
    FSQ,
    CosmosTokenizer,
    FSQTokenizerConfig,
    FSQVideoTokenizer,
    StreamingDecoder,
    TextTokenizer,
    TokenizerLoadError,
    VisualTokenizer,
    check_codes,
    check_video,
    decode_streams,
    evaluate_reconstruction,
    load_visual_tokenizer,
    make_synthetic_videos,
    psnr,
    ssim,
    train_bpe,
    train_tokenizer,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions run much faster single-threaded (and on a busy machine 2 threads can be
    10x slower from OpenMP contention); restore the setting for other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = dict(channels=(8, 16, 16, 16), levels=(8, 5, 5, 5), spatial=8, image_size=32, norm_groups=4)


def tiny(temporal: int = 1, temporal_kernel: int = 1, seed: int = 0) -> FSQVideoTokenizer:
    torch.manual_seed(seed)
    cfg = FSQTokenizerConfig(**TINY, temporal=temporal, temporal_kernel=temporal_kernel)
    return FSQVideoTokenizer(cfg).eval()


def rand_video(t: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=g)


# --------------------------------------------------------------------------------------------------
# FSQ
# --------------------------------------------------------------------------------------------------


def test_fsq_cosmos_layout_exact_round_trip():
    fsq = FSQ((8, 8, 8, 5, 5, 5))
    assert fsq.codebook_size == 64_000 and fsq.dim == 6
    idx = torch.arange(64_000)
    codes = fsq.indices_to_codes(idx)  # [64000, 6]
    assert torch.equal(fsq.codes_to_indices(codes), idx)
    # every code is distinct and lies on the expected grid
    assert torch.unique(codes, dim=0).shape[0] == 64_000
    for i, level in enumerate(fsq.levels):
        vals = torch.unique(codes[:, i])
        half = level // 2
        expected = (torch.arange(level) - half).float() / half
        assert torch.allclose(vals, expected)


def test_fsq_first_level_is_least_significant():
    levels = (8, 8, 8, 5, 5, 5)
    fsq = FSQ(levels)
    basis = [1, 8, 64, 512, 2560, 12800]
    assert fsq._basis.tolist() == basis
    digits = fsq.indices_to_digits(torch.tensor([0, 1, 8, 64, 512, 2560, 12800, 63_999]))
    assert digits[1].tolist() == [1, 0, 0, 0, 0, 0]
    assert digits[2].tolist() == [0, 1, 0, 0, 0, 0]
    assert digits[6].tolist() == [0, 0, 0, 0, 0, 1]
    assert digits[7].tolist() == [7, 7, 7, 4, 4, 4]
    # brute-force mixed radix agrees
    for idx in (0, 1, 12345, 63_999):
        rest, ref = idx, []
        for level in levels:
            ref.append(rest % level)
            rest //= level
        assert fsq.indices_to_digits(torch.tensor(idx)).tolist() == ref


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (2, 3, 4, 7), (8, 8, 8, 5, 5, 5)])
def test_fsq_quantize_hits_every_level_and_round_trips(levels):
    fsq = FSQ(levels)
    z = torch.linspace(-12, 12, 4001).unsqueeze(-1).expand(-1, len(levels))  # [N, d]
    q, idx = fsq(z)
    for i, level in enumerate(levels):
        assert torch.unique(q[:, i]).numel() == level  # even levels: half-offset handled
    assert idx.min() >= 0 and idx.max() < fsq.codebook_size
    assert torch.equal(fsq.indices_to_codes(idx), q)
    assert torch.equal(fsq.codes_to_indices(q), idx)
    # quantize is idempotent on its own grid after re-indexing
    g = torch.Generator().manual_seed(0)
    r = torch.randn(64, 3, len(levels), generator=g) * 3
    qr, ir = fsq(r)
    assert ir.shape == (64, 3)
    assert torch.equal(fsq.codes_to_indices(fsq.indices_to_codes(ir)), ir)


def test_fsq_straight_through_gradient_and_errors():
    fsq = FSQ((8, 5, 5, 5))
    z = torch.randn(10, 4, requires_grad=True)
    q = fsq.quantize(z)
    q.sum().backward()
    assert z.grad is not None and (z.grad > 0).all()  # tanh' > 0 passes through round
    with pytest.raises(ValueError):
        fsq.quantize(torch.randn(3, 5))
    with pytest.raises(ValueError):
        FSQ((8, 1))
    with pytest.raises(ValueError):
        FSQ(())


# --------------------------------------------------------------------------------------------------
# Base protocol helpers
# --------------------------------------------------------------------------------------------------


def test_frame_arithmetic():
    tok = tiny(temporal=4, temporal_kernel=3)
    assert [tok.latent_frames(t) for t in (1, 2, 4, 5, 6, 9, 25)] == [1, 2, 2, 2, 3, 3, 7]
    assert [tok.rgb_frames(t) for t in (1, 2, 7)] == [1, 5, 25]
    assert tok.latent_shape(25, 256, 448) == (7, 32, 56)
    with pytest.raises(ValueError):
        tok.latent_frames(0)
    with pytest.raises(ValueError):
        tok.rgb_frames(0)


def test_check_video_errors():
    good = torch.zeros(2, 16, 24, 3, dtype=torch.uint8)
    check_video(good, 8)
    with pytest.raises(ValueError, match="uint8"):
        check_video(good.float(), 8)
    with pytest.raises(ValueError, match="rank"):
        check_video(good[0], 8)
    with pytest.raises(ValueError, match="RGB"):
        check_video(torch.zeros(2, 16, 16, 4, dtype=torch.uint8), 8)
    with pytest.raises(ValueError, match="multiples of 8"):
        check_video(torch.zeros(2, 12, 16, 3, dtype=torch.uint8), 8)
    with pytest.raises(ValueError, match="at least one frame"):
        check_video(torch.zeros(0, 16, 16, 3, dtype=torch.uint8), 8)
    with pytest.raises(TypeError):
        check_video([[1]], 8)
    check_codes(torch.zeros(1, 2, 2, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="range"):
        check_codes(torch.full((1, 2, 2), 10), 10)
    with pytest.raises(ValueError, match="integer"):
        check_codes(torch.zeros(1, 2, 2), 10)
    with pytest.raises(ValueError, match="rank 3"):
        check_codes(torch.zeros(2, 2, dtype=torch.long), 10)


# --------------------------------------------------------------------------------------------------
# FSQ video tokenizer
# --------------------------------------------------------------------------------------------------


def test_preset_fmnist64_is_small_and_shapes():
    tok = FSQVideoTokenizer("fmnist64")
    assert isinstance(tok, VisualTokenizer)
    assert tok.num_parameters() < 3_000_000
    assert (tok.codebook_size, tok.spatial, tok.temporal) == (1000, 8, 1)
    video = make_synthetic_videos(1, 2, 64)[0]  # [2, 64, 64, 3]
    codes = tok.encode(video)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 1000
    out = tok.decode(codes)
    assert out.shape == (2, 64, 64, 3) and out.dtype == torch.uint8


@pytest.mark.parametrize("temporal", [1, 2, 4])
def test_video_tokenizer_frame_counts(temporal):
    tok = tiny(temporal=temporal, temporal_kernel=1 if temporal == 1 else 3)
    for t in (1, 2, 5, 9):
        codes = tok.encode(rand_video(t, 32, 48))
        assert codes.shape == (tok.latent_frames(t), 4, 6)
        out = tok.decode(codes)
        assert out.shape == (tok.rgb_frames(codes.shape[0]), 32, 48, 3)
        assert out.shape[0] >= t


@pytest.mark.parametrize("temporal", [1, 4])
def test_video_tokenizer_is_causal(temporal):
    tok = tiny(temporal=temporal, temporal_kernel=3)
    a = rand_video(9, seed=1)
    b = a.clone()
    b[5:] = rand_video(4, seed=2)  # change only frames 5..8
    ca, cb = tok.encode(a), tok.encode(b)
    keep = tok.latent_frames(5)  # latents that only see frames 0..4
    assert torch.equal(ca[:keep], cb[:keep])
    # decoder: earlier frames do not depend on later latents
    codes = ca.clone()
    codes[-1] = (codes[-1] + 1) % tok.codebook_size
    da, db = tok.decode(ca), tok.decode(codes)
    n = tok.rgb_frames(codes.shape[0] - 1)
    assert torch.equal(da[:n], db[:n])
    assert not torch.equal(da[n:], db[n:])


@pytest.mark.parametrize("norm", ["none", "group", "channel"])
def test_norm_variants_run(norm):
    cfg = FSQTokenizerConfig(**{**TINY, "norm": norm}, temporal=2, temporal_kernel=3)
    tok = FSQVideoTokenizer(cfg)
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1  # [B, 3, T, H, W]
    recon, indices = tok(x)
    assert recon.shape == (2, 3, 5, 16, 16) and indices.shape == (2, 3, 2, 2)
    recon.square().mean().backward()
    assert all(p.grad is not None for p in tok.encoder.parameters())


def test_encode_decode_batch_matches_single():
    tok = tiny(temporal=2, temporal_kernel=3)
    videos = torch.stack([rand_video(5, seed=s) for s in range(3)])  # [3, 5, 32, 32, 3]
    codes = tok.encode_batch(videos)
    assert codes.shape == (3, 3, 4, 4)
    for i in range(3):
        assert torch.equal(codes[i], tok.encode(videos[i]))
    diff = tok.decode_batch(codes)[1].int() - tok.decode(codes[1]).int()
    assert diff.abs().max() <= 1  # float summation order may differ with the batch size


def test_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        FSQTokenizerConfig(channels=(8, 8, 8), spatial=6)
    with pytest.raises(ValueError, match="temporal"):
        FSQTokenizerConfig(temporal=3)
    with pytest.raises(ValueError, match="widths"):
        FSQTokenizerConfig(channels=(8, 8), spatial=8)
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        FSQTokenizerConfig.preset("nope")
    cfg = FSQTokenizerConfig.preset("fmnist64")
    assert FSQTokenizerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_save_load_round_trip(tmp_path):
    tok = tiny(temporal=2, temporal_kernel=3, seed=3)
    tok.save(tmp_path / "tok")
    assert (tmp_path / "tok" / "config.json").is_file()
    assert (tmp_path / "tok" / "model.safetensors").is_file()
    loaded = FSQVideoTokenizer.load(tmp_path / "tok")
    assert loaded.config == tok.config
    video = rand_video(5)
    codes = tok.encode(video)
    assert torch.equal(loaded.encode(video), codes)
    assert torch.equal(loaded.decode(codes), tok.decode(codes))
    via_factory = load_visual_tokenizer(tmp_path / "tok")
    assert isinstance(via_factory, FSQVideoTokenizer)
    assert torch.equal(via_factory.encode(video), codes)


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        FSQVideoTokenizer.load(tmp_path / "missing")
    tok = tiny()
    tok.save(tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").unlink()
    with pytest.raises(TokenizerLoadError, match="model.safetensors"):
        FSQVideoTokenizer.load(tmp_path / "a")
    with pytest.raises(TokenizerLoadError, match="model.safetensors"):
        load_visual_tokenizer(tmp_path / "a")
    tok.save(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text('{"format": "other"}')
    with pytest.raises(TokenizerLoadError, match="config.json"):
        FSQVideoTokenizer.load(tmp_path / "b")
    tok.save(tmp_path / "c")
    (tmp_path / "c" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(TokenizerLoadError, match="model.safetensors"):
        FSQVideoTokenizer.load(tmp_path / "c")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerLoadError, match="not a visual tokenizer folder"):
        load_visual_tokenizer(tmp_path / "empty")
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        load_visual_tokenizer(tmp_path / "nowhere")


def test_training_reduces_loss(tmp_path):
    cfg = FSQTokenizerConfig(**TINY)
    data = make_synthetic_videos(48, 1, 32, seed=5)  # [48, 1, 32, 32, 3]
    records = []
    metrics = train_tokenizer(
        cfg,
        data,
        steps=40,
        lr=3e-3,
        batch=8,
        log_every=10,
        out_dir=tmp_path / "run",
        log_fn=records.append,
    )
    assert metrics["steps"] == 40 and len(records) == 4
    losses = [loss for _, loss in metrics["loss_history"]]
    assert losses[-1] < 0.8 * losses[0]
    assert math.isfinite(metrics["train_psnr"])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 40
    tok = FSQVideoTokenizer.load(tmp_path / "run")
    res = evaluate_reconstruction(tok, data[:4])
    assert res["psnr"] > 12 and 0 < res["ssim"] <= 1


def test_training_from_iterables():
    tok = tiny()
    frames = make_synthetic_videos(6, 1, 32, seed=2)[:, 0]  # [6, 32, 32, 3]
    # an iterator of single frames runs out: training stops early with what it has
    metrics = train_tokenizer(tok.config, iter(list(frames)), steps=10, batch=4, model=tok)
    assert metrics["steps"] == 2  # one full batch of 4, then the remaining 2 frames
    # a re-iterable of frame batches is cycled
    metrics = train_tokenizer(tok.config, [frames[:3], frames[3:]], steps=5, batch=4, model=tok)
    assert metrics["steps"] == 5
    with pytest.raises(ValueError, match="uint8"):
        train_tokenizer(tok.config, frames.float(), steps=1, batch=2, model=tok)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


class IdentityTokenizer(VisualTokenizer):
    """Lossless toy tokenizer: one 'code' per 1x1 grey pixel, for metric and streaming tests."""

    codebook_size = 256
    spatial = 1
    temporal = 1

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return video[..., 0].long()

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.uint8).unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()


def test_metrics():
    grey = rand_video(3)
    grey = grey[..., :1].expand(-1, -1, -1, 3).contiguous()
    res = evaluate_reconstruction(IdentityTokenizer(), grey)
    assert res["psnr"] == pytest.approx(100.0) and res["ssim"] == pytest.approx(1.0)
    a = torch.full((2, 16, 16, 3), 100, dtype=torch.uint8)
    b = a + 10  # mse 100 -> 10 log10(255^2 / 100)
    assert torch.allclose(psnr(a, b), torch.tensor(10 * math.log10(255**2 / 100)).expand(2))
    s = ssim(a, b)
    assert s.shape == (2,) and (s < 1).all() and (s > 0.9).all()  # luminance shift only
    noisy = (a.int() + torch.randint(-60, 60, a.shape)).clamp(0, 255).to(torch.uint8)
    tex = rand_video(2, 16, 16)
    assert (ssim(tex, noisy) < 0.5).all()
    assert torch.allclose(ssim(tex, tex), torch.ones(2))


# --------------------------------------------------------------------------------------------------
# Streaming decoder
# --------------------------------------------------------------------------------------------------


def test_streaming_per_frame_tokenizer_matches_full_decode():
    tok = tiny()  # temporal = 1, frames independent: any window is exact
    codes = tok.encode(rand_video(4))
    stream = StreamingDecoder(tok, window=1)
    parts = [stream.push(c) for c in codes]
    assert [p.shape[0] for p in parts] == [1, 1, 1, 1]
    diff = torch.cat(parts).int() - tok.decode(codes).int()
    assert diff.abs().max() <= 1  # only float summation order differs with the batch size
    assert stream.frames_emitted == 4 and stream.latents_pushed == 4


def test_streaming_window_is_capped_by_the_tokenizers_context():
    tok = tiny()  # temporal 1, temporal kernel 1: no context needed
    assert tok.context_latents == 0 and StreamingDecoder(tok, window=4).window == 1
    deep = tiny(temporal=4, temporal_kernel=3)
    assert deep.context_latents is None and StreamingDecoder(deep, window=4).window == 4


def test_capped_window_decodes_only_what_it_needs():
    tok = tiny()  # a per-frame tokenizer: each latent decodes alone (review: the deque kept 2)
    stream = StreamingDecoder(tok, window=4)
    codes = tok.encode(rand_video(3))
    stream.push(codes[0])
    window, new = stream.stage(codes[1])
    assert window.shape[0] == 1 and new == 1  # one latent decoded per frame, not the uncapped 4


def test_batch_validation_checks_every_element():
    tok = tiny()
    codes = tok.encode(rand_video(2)).unsqueeze(0).repeat(2, 1, 1, 1)  # [2, t, h, w]
    codes[1, 0, 0, 0] = tok.codebook_size  # out of range in the SECOND element only
    with pytest.raises(ValueError, match="codes must lie in"):
        tok.decode_batch(codes)
    with pytest.raises(ValueError, match="B >= 1"):
        tok.decode_batch(codes[:0])
    with pytest.raises(ValueError, match="B >= 1"):
        tok.encode_batch(torch.zeros(0, 1, 16, 16, 3, dtype=torch.uint8))


def test_decode_streams_batches_many_sessions_like_push():
    tok = tiny(temporal=4, temporal_kernel=3)
    videos = [tok.encode(rand_video(13, seed=i)) for i in range(3)]  # 4 latents each
    one = [StreamingDecoder(tok, window=2) for _ in videos]
    many = [StreamingDecoder(tok, window=2) for _ in videos]
    many[2].push(videos[2][0])  # one session ahead: windows of different lengths in a batch
    one[2].push(videos[2][0])
    for k in range(3):
        codes = [v[min(k + (i == 2), 3)] for i, v in enumerate(videos)]
        want = [d.push(c) for d, c in zip(one, codes)]
        got = decode_streams(many, codes)
        assert [g.shape for g in got] == [w.shape for w in want]
        for g, w in zip(got, want):
            assert (g.int() - w.int()).abs().max() <= 1  # batch size changes float sums only
    assert [d.frames_emitted for d in many] == [d.frames_emitted for d in one]
    with pytest.raises(ValueError, match="2 decoders for 1"):
        decode_streams(many[:2], [videos[0][0]])


def test_streaming_prime_takes_stored_latents_as_context():
    tok = tiny(temporal=4, temporal_kernel=3)
    codes = tok.encode(rand_video(13))  # 4 latents -> 13 frames
    full = StreamingDecoder(tok, window=3)
    parts = [full.push(c) for c in codes]
    resumed = StreamingDecoder(tok, window=3)
    resumed.prime(codes[:3])  # a stored video of 3 latents, continued by one more
    assert resumed.latents_pushed == 3 and resumed.frames_emitted == 9
    assert torch.equal(resumed.push(codes[3]), parts[3])
    assert resumed.frames_emitted == 13
    with pytest.raises(ValueError, match="prime expects"):
        resumed.prime(codes[0])


def test_streaming_temporal_tokenizer():
    tok = tiny(temporal=4, temporal_kernel=3)
    codes = tok.encode(rand_video(13))  # 4 latents -> 13 frames
    full = tok.decode(codes)
    stream = StreamingDecoder(tok, window=8)  # window covers everything: exact
    parts = [stream.push(c) for c in codes]
    assert [p.shape[0] for p in parts] == [1, 4, 4, 4]
    assert torch.equal(torch.cat(parts), full)
    # bounded window: same frame counts, first frames exact
    stream = StreamingDecoder(tok, window=2)
    parts = [stream.push(c) for c in codes]
    assert [p.shape[0] for p in parts] == [1, 4, 4, 4]
    assert torch.equal(torch.cat(parts[:2]), full[:5])
    stream.reset()
    assert stream.push(codes[0]).shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="shape changed"):
        stream.push(codes[1, :2])
    with pytest.raises(ValueError):
        StreamingDecoder(tok, window=1)
    with pytest.raises(ValueError):
        stream.push(codes)


# --------------------------------------------------------------------------------------------------
# Cosmos adapter (fake TorchScript modules with the discrete DV4x8x8 call signature)
# --------------------------------------------------------------------------------------------------

BASE = 40  # 40^3 = 64,000 codes: one base-40 digit per RGB channel


class FakeCosmosEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))  # something for .to(dtype) to cast

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x [B, 3, T, H, W] in [-1, 1], T = 1 + 4k, in the dtype of the module
        if x.dtype != self.scale.dtype:
            raise RuntimeError("input dtype differs from the module dtype")
        x = x.float() * self.scale.float()
        first = F.avg_pool3d(x[:, :, :1], (1, 8, 8))  # [B, 3, 1, h, w]
        if x.shape[2] > 1:
            rest = F.avg_pool3d(x[:, :, 1:], (4, 8, 8))  # [B, 3, k, h, w]
            pooled = torch.cat([first, rest], dim=2)
        else:
            pooled = first
        q = ((pooled.clamp(-1, 1) + 1) / 2 * 39).round().long()  # base-40 digits
        indices = q[:, 0] + 40 * q[:, 1] + 1600 * q[:, 2]  # [B, t, h, w]
        return indices, pooled


class FakeCosmosDecoder(nn.Module):
    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        digits = torch.stack([indices % 40, (indices // 40) % 40, indices // 1600], dim=1)
        v = digits.float() / 39 * 2 - 1  # [B, 3, t, h, w]
        v = v.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)  # [B, 3, t, H, W]
        return torch.cat([v[:, :, :1], v[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)


@pytest.fixture(scope="module")
def cosmos_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cosmos")
    torch.jit.script(FakeCosmosEncoder()).save(str(folder / "encoder.jit"))
    torch.jit.script(FakeCosmosDecoder()).save(str(folder / "decoder.jit"))
    return folder


def blocky_video(t_latent: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A video that the fake Cosmos pair reconstructs exactly, and its codes."""
    g = torch.Generator().manual_seed(seed)
    digits = torch.randint(0, BASE, (t_latent, h, w, 3), generator=g)  # [t, h, w, 3]
    codes = digits[..., 0] + BASE * digits[..., 1] + BASE * BASE * digits[..., 2]
    pix = (digits.double() * 255 / (BASE - 1)).round().to(torch.uint8)
    pix = pix.repeat_interleave(8, 1).repeat_interleave(8, 2)  # [t, H, W, 3]
    video = torch.cat([pix[:1], pix[1:].repeat_interleave(4, 0)])  # [1 + 4(t-1), H, W, 3]
    return video, codes


def test_cosmos_adapter_round_trip(cosmos_folder):
    tok = CosmosTokenizer(cosmos_folder, dtype=torch.float32)
    assert isinstance(tok, VisualTokenizer)
    assert (tok.codebook_size, tok.spatial, tok.temporal) == (64_000, 8, 4)
    video, codes = blocky_video(3, 4, 6)  # 9 frames of 32x48
    got = tok.encode(video)
    assert got.dtype == torch.long and torch.equal(got, codes)
    out = tok.decode(got)
    assert out.dtype == torch.uint8 and torch.equal(out, video)
    # T - 1 not a multiple of 4: padded with the last frame, 7 frames -> 3 latents
    assert tok.encode(video[:7]).shape == (3, 4, 6)
    assert tok.encode(video[:1]).shape == (1, 4, 6)
    # batch API and streaming
    assert torch.equal(tok.decode_batch(codes[None])[0], video)
    stream = StreamingDecoder(tok, window=2)
    parts = [stream.push(c) for c in codes]
    assert [p.shape[0] for p in parts] == [1, 4, 4]
    assert torch.equal(torch.cat(parts), video)
    with pytest.raises(ValueError, match="multiples of 8"):
        tok.encode(video[:, :20])


def test_cosmos_bfloat16_and_factory(cosmos_folder):
    tok = CosmosTokenizer(cosmos_folder)  # bfloat16 default
    assert tok.dtype == torch.bfloat16
    video, codes = blocky_video(2, 2, 2, seed=1)
    assert torch.equal(tok.encode(video), codes)
    loaded = load_visual_tokenizer(cosmos_folder)
    assert isinstance(loaded, CosmosTokenizer) and loaded.dtype == torch.float32


def test_cosmos_errors(tmp_path, cosmos_folder):
    missing = tmp_path / "nope"
    with pytest.raises(TokenizerLoadError, match="nope"):
        CosmosTokenizer(missing)
    half = tmp_path / "half"
    half.mkdir()
    (half / "encoder.jit").write_bytes((cosmos_folder / "encoder.jit").read_bytes())
    with pytest.raises(TokenizerLoadError, match="decoder.jit") as err:
        CosmosTokenizer(half)
    assert "half" in str(err.value) and isinstance(err.value, RuntimeError)
    with pytest.raises(TokenizerLoadError, match="decoder.jit"):
        load_visual_tokenizer(half)
    (half / "decoder.jit").write_bytes(b"not a torchscript archive")
    with pytest.raises(TokenizerLoadError, match="cannot load decoder.jit") as err:
        CosmosTokenizer(half)
    assert err.value.__cause__ is not None


# --------------------------------------------------------------------------------------------------
# Text tokenizer
# --------------------------------------------------------------------------------------------------

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
ITEMS = ["sneaker", "bag", "shirt", "dress", "coat", "sandal", "trouser", "boot", "pullover"]
MOTIONS = ["moves left", "moves right", "falls", "rises", "spins", "stays still", "bounces"]


def captions(n: int) -> list[str]:
    out = []
    combos = itertools.product(COLOURS, ITEMS, MOTIONS, COLOURS, ITEMS, MOTIONS)
    for i, (c1, i1, m1, c2, i2, m2) in enumerate(combos):
        if i >= n:
            break
        if i % 7 == 0:
            continue
        out.append(f"a {c1} {i1} {m1} while a {c2} {i2} {m2}")
    return out


def test_text_bpe_train_round_trip_save_load(tmp_path):
    texts = captions(600)
    tok = train_bpe(texts, vocab_size=400)
    assert isinstance(tok, TextTokenizer)
    assert tok.pad_id == 0 and tok.id_to_token(0) == "<pad>"
    assert 256 < tok.vocab_size <= 400
    samples = [
        "a red sneaker moves left while a blue bag falls",
        "A Zebra-striped hat, 3 times! (naïve café ☃)",  # unseen words and non-ASCII bytes
        "",
    ]
    for text in samples:
        ids = tok.encode(text)
        assert all(1 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
    common = tok.encode(samples[0])
    assert len(common) < len(samples[0]) / 2  # merges were learned
    assert tok.decode([0, *common, 0]) == samples[0]  # pad/BOS dropped on decode
    path = tok.save(tmp_path / "sub" / "text_tokenizer.json")
    again = TextTokenizer.from_file(path)
    assert again.vocab_size == tok.vocab_size
    for text in samples:
        assert again.encode(text) == tok.encode(text)
    assert again.encode_batch(samples[:2]) == [tok.encode(s) for s in samples[:2]]


def test_text_chameleon_style_json_and_errors(tmp_path):
    # a plain BPE JSON with a <s> special at id 0, like Chameleon's text_tokenizer.json
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<s>": 0, "a": 1, "b": 2, "ab": 3, "Ġ": 4, "Ġa": 5}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("Ġ", "a")]))
    raw.add_special_tokens(["<s>"])
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.save(str(tmp_path / "text_tokenizer.json"))
    tok = TextTokenizer.from_file(tmp_path / "text_tokenizer.json")
    assert tok.vocab_size == 6
    assert tok.encode("ab a") == [3, 5]
    with pytest.raises(FileNotFoundError):
        TextTokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        TextTokenizer.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["x"], vocab_size=100)
