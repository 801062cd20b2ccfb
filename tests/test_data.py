"""Tests for lumos.data: Fashion-MNIST, Moving Fashion-MNIST clips, folders and shards."""

from __future__ import annotations

import itertools
import json
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lumos.data import (
    CLASSES,
    COLOURS,
    DIRECTION_VECTORS,
    DIRECTIONS,
    HELD_OUT,
    SPEEDS,
    ItemSpec,
    MovingFashionConfig,
    MovingFashionDataset,
    ShardDataset,
    VideoFolderDataset,
    build_caption,
    collate_clips,
    eval_prompts,
    load_fashion_mnist,
    make_clip,
    parse_caption,
    parse_caption_items,
    write_shards,
)
from lumos.video import write_video

CFG = MovingFashionConfig()


# --------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_shapes():
    xtr, ytr = load_fashion_mnist("train")
    xte, yte = load_fashion_mnist("test")
    assert xtr.shape == (60_000, 28, 28) and xte.shape == (10_000, 28, 28)
    assert xtr.dtype == np.uint8 and ytr.dtype == np.int64
    assert len(xtr) + len(xte) == 70_000 == len(ytr) + len(yte)
    assert set(np.unique(ytr)) == set(range(10))
    assert np.bincount(yte).tolist() == [1000] * 10


def test_fashion_mnist_missing(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    monkeypatch.setenv("LUMOS_FMNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("test")
    with pytest.raises(ValueError):
        load_fashion_mnist("valid")


# --------------------------------------------------------------------------- vocabulary


def test_vocabulary_and_held_out_coverage():
    assert len(CLASSES) == 10 and len(set(COLOURS.values())) == len(COLOURS) >= 6
    assert len(HELD_OUT) == 32  # 10% of 10 * 8 * 4
    seen = {t for t in itertools.product(CLASSES, COLOURS, DIRECTIONS) if t not in HELD_OUT}
    # Every pair of attributes still occurs among the seen (training) triples.
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        pairs = {(t[a], t[b]) for t in seen}
        full = {(t[a], t[b]) for t in itertools.product(CLASSES, COLOURS, DIRECTIONS)}
        assert pairs == full


def test_caption_build_parse_all_triples():
    for cls, col, d in itertools.product(CLASSES, COLOURS, DIRECTIONS):
        for speed in SPEEDS:
            cap = build_caption([(cls, col, d, speed)])
            assert parse_caption_items(cap) == [ItemSpec(cls, col, d, speed)]
        assert parse_caption(build_caption([(cls, col, d)])) == [(cls, col, d)]
        assert parse_caption(build_caption([(cls, col)])) == [(cls, col, None)]
    cap = build_caption([("sneaker", "red", "left", "quickly"), ("bag", "orange", "down")])
    assert cap == "a red sneaker moves left quickly while an orange bag falls"
    assert parse_caption("A red sneaker moves left while a blue bag falls.") == [
        ("sneaker", "red", "left"),
        ("bag", "blue", "down"),
    ]
    assert parse_caption("a red ankle boot and a white t-shirt") == [
        ("ankle boot", "red", None),
        ("t-shirt", "white", None),
    ]
    for bad in ["", "a purple sneaker moves left", "a red sneaker jumps", "red sneaker"]:
        with pytest.raises(ValueError):
            parse_caption(bad)


# --------------------------------------------------------------------------- clips


def test_clips_deterministic_by_seed():
    a = MovingFashionDataset(CFG, "train", length=20, seed=3)
    b = MovingFashionDataset(CFG, "train", length=20, seed=3)
    c = MovingFashionDataset(CFG, "train", length=20, seed=4)
    for i in (0, 7, 19):
        ca, cb = a[i], b[i]
        assert ca.caption == cb.caption
        np.testing.assert_array_equal(ca.video, cb.video)
        np.testing.assert_array_equal(ca.video, a[i].video)
    assert any(a[i].caption != c[i].caption for i in range(20))
    assert a[-1].caption == a[19].caption
    with pytest.raises(IndexError):
        a[20]
    clip = make_clip(np.random.default_rng(5), CFG)
    assert clip.video.shape == (16, 64, 64, 3) and clip.video.dtype == np.uint8
    assert clip.caption == make_clip(5, CFG).caption


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_captions_parse_back_to_items(split):
    ds = MovingFashionDataset(CFG, split, length=60, seed=1)
    for clip in ds:
        specs = parse_caption_items(clip.caption)
        assert specs == [it.spec for it in clip.items]
        assert 1 <= len(clip.items) <= CFG.max_items
        assert len({it.colour for it in clip.items}) == len(clip.items)  # distinct colours


def test_held_out_split_rules():
    for clip in MovingFashionDataset(CFG, "train", length=400, seed=0):
        assert all(it.triple not in HELD_OUT for it in clip.items)
    for clip in MovingFashionDataset(CFG, "test", length=100, seed=0):
        assert all(it.triple not in HELD_OUT for it in clip.items)
    triples = set()
    for clip in MovingFashionDataset(CFG, "heldout", length=200, seed=0):
        assert all(it.triple in HELD_OUT for it in clip.items)
        triples.update(it.triple for it in clip.items)
    assert len(triples) > 20  # the split actually covers the held-out set
    held = sorted(HELD_OUT)[0]
    with pytest.raises(ValueError, match="held out"):
        make_clip(0, CFG, "train", spec=[held])
    with pytest.raises(ValueError, match="not a held-out"):
        make_clip(0, CFG, "heldout", spec=[("bag", "red", "left")])


def test_items_bounce_and_render():
    room = CFG.size - CFG.item_size
    bounced = 0
    images, _ = load_fashion_mnist("train")
    for clip in MovingFashionDataset(CFG, "train", length=80, seed=2):
        covered = np.zeros(clip.video.shape[:3], bool)  # [T, H, W]
        for it in clip.items:
            pos = it.positions  # [T, 2] (y, x)
            assert pos.shape == (CFG.frames, 2)
            assert pos.min() >= 0 and pos.max() <= room  # always fully inside the frame
            step = np.diff(pos, axis=0)  # [T-1, 2]
            dist = np.abs(step).sum(axis=1)  # [T-1] (a bounce reflects, so it can be less)
            assert (dist <= it.speed_px).all() and (dist == it.speed_px).mean() > 0.8
            moving_axis = 0 if it.direction in ("up", "down") else 1
            assert (step[:, 1 - moving_axis] == 0).all()
            assert it.speed_px == CFG.speeds[it.speed]
            unit = np.array(DIRECTION_VECTORS[it.direction]) * it.speed_px
            half = (CFG.frames - 1) // 2
            assert (step[:half] == unit).all()  # captioned direction first
            bounced += int((step != unit).any())
            for f, (y, x) in enumerate(pos):
                covered[f, y : y + 28, x : x + 28] = True
        assert not clip.video[~covered].any()  # black outside the items
        if len(clip.items) == 1:  # the pixels are the FMNIST image times the colour
            it = clip.items[0]
            y, x = it.positions[0]
            patch = clip.video[0, y : y + 28, x : x + 28].astype(int)  # [28, 28, 3]
            rgb = np.array(COLOURS[it.colour])
            expect = (images[it.image_index][..., None].astype(int) * rgb + 127) // 255
            np.testing.assert_array_equal(patch, expect)
    assert bounced > 5


def test_late_windows_start_anywhere_in_either_sign():
    late = MovingFashionConfig(late=1.0)
    room = late.size - late.item_size
    signs, near_wall = set(), 0
    for clip in MovingFashionDataset(late, "train", length=120, seed=2):
        assert clip.context == late.late_context == 8
        for it in clip.items:
            unit = np.array(DIRECTION_VECTORS[it.direction])  # captioned (first) direction
            step = np.diff(it.positions, axis=0)  # [T-1, 2]
            assert (np.abs(step).sum(axis=1) <= it.speed_px).all()  # the same bouncing physics
            assert it.positions.min() >= 0 and it.positions.max() <= room
            signs.add(int(np.sign(step[0] @ unit)))
            axis = 0 if unit[0] else 1
            ahead = (
                it.positions[0, axis]
                if (unit @ step[0]) * unit[axis] < 0
                else room - it.positions[0, axis]
            )
            near_wall += int(ahead < it.speed_px * 7)  # a fresh clip never bounces this early
    assert signs == {-1, 1} and near_wall > 10
    mixed = [c.context for c in MovingFashionDataset(MovingFashionConfig(late=0.3), length=200)]
    assert set(mixed) == {0, 8} and 30 < mixed.count(8) < 90
    # late == 0 draws nothing extra: the clips of every existing dataset are unchanged
    a, b = make_clip(9, CFG), make_clip(9, MovingFashionConfig(late=0.0))
    np.testing.assert_array_equal(a.video, b.video)
    assert a.context == 0 and make_clip(9, late, images=True).context == 0
    with pytest.raises(ValueError, match="late must be"):
        MovingFashionConfig(late=1.5)
    with pytest.raises(ValueError, match="late_context"):
        MovingFashionConfig(late=0.5, late_context=16)


def test_image_clips_and_forced_spec():
    ds = MovingFashionDataset(CFG, "train", length=10, seed=0, images=True)
    clip = ds[0]
    assert clip.video.shape == (1, 64, 64, 3)
    assert all(it.direction is None for it in clip.items)
    assert parse_caption(clip.caption) == [(it.cls, it.colour, None) for it in clip.items]
    assert " while " not in clip.caption
    spec = [("sneaker", "red", "left", "quickly"), ("bag", "blue", "down")]
    clip = make_clip(1, CFG, "test", spec=spec)
    assert parse_caption(clip.caption) == [("sneaker", "red", "left"), ("bag", "blue", "down")]
    assert clip.items[0].speed == "quickly" and clip.items[1].speed in SPEEDS
    no_speed = MovingFashionConfig(caption_speed=False, max_items=1, frames=4, item_size=20)
    clip = make_clip(2, no_speed, "train")
    assert clip.video.shape == (4, 64, 64, 3)
    assert not any(w in clip.caption for w in SPEEDS)
    assert MovingFashionConfig.from_dict(json.loads(json.dumps(CFG.to_dict()))) == CFG


def test_eval_prompts():
    held = eval_prompts("heldout")
    seen = eval_prompts("seen")
    assert len(held) == len(seen) == 48
    assert {tuple(s[0].triple) for _, s in held[:32]} == HELD_OUT
    for caption, specs in held:
        assert all(s.triple in HELD_OUT for s in specs)
        assert parse_caption_items(caption) == specs
    for caption, specs in seen:
        assert all(s.triple not in HELD_OUT for s in specs)
        assert parse_caption(caption) == [s.triple for s in specs]
    assert eval_prompts("heldout") == held  # fixed
    caption, specs = held[-1]
    clip = make_clip(0, CFG, "heldout", spec=specs)
    assert clip.caption == caption
    images = eval_prompts("seen", images=True)
    assert all(" while " not in c for c, _ in images)


def test_collate_with_dataloader():
    ds = MovingFashionDataset(CFG, "train", length=4, seed=0)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_clips)))
    assert batch["video"].shape == (4, 16, 64, 64, 3) and batch["video"].dtype == torch.uint8
    assert batch["caption"] == [ds[i].caption for i in range(4)]


# --------------------------------------------------------------------------- users' folders


def _write_folder(root, n=2):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        frames = rng.integers(0, 255, (6 + i * 6, 40, 56, 3), dtype=np.uint8)  # [T, H, W, 3]
        write_video(root / f"clip{i}.mp4", frames, fps=8)
        (root / f"clip{i}.txt").write_text(f"caption number {i}\n")


def test_video_folder_dataset(tmp_path):
    _write_folder(tmp_path / "vids")
    ds = VideoFolderDataset(tmp_path / "vids", size=32, frames=8, fps=8)
    assert len(ds) == 2
    short, long = ds[0], ds[1]
    assert short.video.shape == long.video.shape == (8, 32, 32, 3)
    assert short.caption == "caption number 0"
    np.testing.assert_array_equal(short.video[5], short.video[7])  # padded with the last frame
    # CSV form, paths relative to the CSV.
    (tmp_path / "list.csv").write_text("path,caption\nvids/clip1.mp4,a csv caption\n")
    ds = VideoFolderDataset(tmp_path / "list.csv", size=16, frames=None)
    assert len(ds) == 1 and ds[0].caption == "a csv caption"
    assert ds[0].video.shape == (12, 16, 16, 3)


def test_video_folder_errors(tmp_path):
    _write_folder(tmp_path / "vids")
    (tmp_path / "vids" / "clip1.txt").unlink()
    with pytest.raises(FileNotFoundError, match="clip1.txt"):
        VideoFolderDataset(tmp_path / "vids")
    (tmp_path / "bad.csv").write_text("file,text\nx.mp4,hi\n")
    with pytest.raises(ValueError, match="'path' and 'caption'"):
        VideoFolderDataset(tmp_path / "bad.csv")
    (tmp_path / "gone.csv").write_text("path,caption\nnope.mp4,hi\n")
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        VideoFolderDataset(tmp_path / "gone.csv")
    with pytest.raises(FileNotFoundError):
        VideoFolderDataset(tmp_path / "missing")


# --------------------------------------------------------------------------- shards


def pool_codes(video: np.ndarray, levels: int = 256) -> torch.Tensor:
    """Dummy tokenizer: 4x temporal, 8x8 spatial average pool of the gray level."""
    x = torch.from_numpy(video).float().mean(-1)  # [T, H, W]
    kt = min(4, x.shape[0])  # 1-frame clips pool only spatially
    x = torch.nn.functional.avg_pool3d(x[None, None], (kt, 8, 8))[0, 0]  # [T/kt, H/8, W/8]
    return (x / 256 * levels).long().clamp_(0, levels - 1)


def encode_text(caption: str) -> list[int]:
    return list(caption.encode("utf-8"))


def test_shards_round_trip(tmp_path):
    ds = MovingFashionDataset(CFG, "train", length=7, seed=0)
    manifest = write_shards(
        ds, pool_codes, encode_text, tmp_path / "sh", shard_size=3, codebook_size=256,
        tokenizer_name="bytes",
    )  # fmt: skip
    assert manifest["num_samples"] == 7 and manifest["num_shards"] == 3
    assert manifest["grid"] == [4, 8, 8] and manifest["codebook_size"] == 256
    on_disk = json.loads((tmp_path / "sh" / "manifest.json").read_text())
    assert on_disk["tokenizer"] == "bytes" and on_disk["shards"][0]["codes_dtype"] == "uint16"
    codes_file = np.load(tmp_path / "sh" / "shard_00000.codes.npy", mmap_mode="r")
    assert isinstance(codes_file, np.memmap) and codes_file.dtype == np.uint16
    assert codes_file.ndim == 1 and codes_file.size == 3 * 4 * 8 * 8

    sh = ShardDataset(tmp_path / "sh")
    assert len(sh) == 7 and sh.grid == [4, 8, 8] and sh.tokenizer == "bytes"
    for i in range(7):
        codes, ids = sh[i]
        assert codes.dtype == torch.long and codes.shape == (4, 8, 8)
        assert torch.equal(codes, pool_codes(ds[i].video))
        assert ids == encode_text(ds[i].caption) and sh.caption(i) == ds[i].caption
    assert isinstance(sh._arrays(2)[0], np.memmap)  # read through memory maps
    assert torch.equal(sh[-1][0], sh[6][0])
    with pytest.raises(IndexError):
        sh[7]
    clone = pickle.loads(pickle.dumps(sh))  # DataLoader workers
    assert clone._open == {} and torch.equal(clone[4][0], sh[4][0])
    with pytest.raises(FileExistsError):
        write_shards(ds, pool_codes, encode_text, tmp_path / "sh")


def test_shards_keep_each_clips_context(tmp_path):
    ds = MovingFashionDataset(MovingFashionConfig(late=0.5), "train", length=12, seed=1)
    write_shards(ds, pool_codes, encode_text, tmp_path / "sh", shard_size=5, codebook_size=256)
    sh = ShardDataset(tmp_path / "sh")
    # pool_codes makes 4 latent frames of 16: 8 history frames are 2 latent frames
    assert [sh.context(i) for i in range(12)] == [ds[i].context // 4 for i in range(12)]
    assert {sh.context(i) for i in range(12)} == {0, 2}
    # a version-1 shard (six index columns, written before contexts existed) reads as context 0
    index = tmp_path / "sh" / "shard_00000.index.npy"
    np.save(index, np.load(index)[:, :6])
    old = ShardDataset(tmp_path / "sh")
    assert old.context(0) == 0 and torch.equal(old[0][0], sh[0][0])
    with pytest.raises(ValueError, match="context 16 must be in"):
        write_shards([(ds[0].video, "x", 16)], pool_codes, encode_text, tmp_path / "bad")


def test_shards_large_codebook_and_mixed_grids(tmp_path):
    def big_codes(video: np.ndarray) -> torch.Tensor:
        return pool_codes(video) + 70_000  # codes beyond uint16

    clips = [make_clip(i, CFG, "test") for i in range(2)]
    clips.append(make_clip(9, CFG, "test", images=True))  # a 1-frame clip: grid [1, 8, 8]
    pairs = [(c.video, c.caption) for c in clips]
    manifest = write_shards(pairs, big_codes, encode_text, tmp_path / "sh", shard_size=10)
    assert manifest["shards"][0]["codes_dtype"] == "int32" and manifest["grid"] is None
    sh = ShardDataset(tmp_path / "sh")
    assert sh[2][0].shape == (1, 8, 8) and sh.shape(0) == (4, 8, 8)
    assert torch.equal(sh[1][0], big_codes(clips[1].video))
    with pytest.raises(ValueError, match="codebook_size"):
        write_shards(pairs, big_codes, encode_text, tmp_path / "x", codebook_size=1000)


def test_package_reexports_every_public_name():
    import importlib

    import lumos.data as pkg

    for name in pkg.__all__:
        assert getattr(pkg, name) is not None, name
    # each public name of a submodule is the same object through the package
    for mod in ("vocab", "fmnist", "captions", "render", "prompts", "folders", "shards"):
        m = importlib.import_module(f"lumos.data.{mod}")
        assert m.__doc__, mod
        for name in (n for n in pkg.__all__ if hasattr(m, n)):
            assert getattr(m, name) is getattr(pkg, name), (mod, name)
