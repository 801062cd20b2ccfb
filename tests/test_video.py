"""Tests for lumos.video: mp4 / gif / png writing and reading, in-memory encoders, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lumos.video import (
    as_frames,
    decode_png,
    encode_png,
    make_grid,
    mp4_bytes,
    read_image,
    read_video,
    write_video,
)


def smooth_frames(t: int = 12, h: int = 32, w: int = 48) -> np.ndarray:
    """Smooth moving gradients ``uint8 [T, H, W, 3]`` (compress well, so errors stay small)."""
    y, x = np.mgrid[:h, :w]  # [H, W]
    frames = [
        np.stack([(x * 4 + i * 8) % 256, y * 6, np.full_like(x, 40 + i * 10)], axis=-1)
        for i in range(t)
    ]
    return np.stack(frames).astype(np.uint8)  # [T, H, W, 3]


def test_mp4_round_trip(tmp_path):
    frames = smooth_frames()
    path = write_video(tmp_path / "clip.mp4", frames, fps=8)
    back = read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - frames).mean() < 6


def test_mp4_odd_size_is_padded(tmp_path):
    frames = smooth_frames(4, 33, 47)
    back = read_video(write_video(tmp_path / "odd.mp4", frames, fps=8))
    assert back.shape == (4, 34, 48, 3)
    assert np.abs(back[:, :33, :47].astype(int) - frames).mean() < 8


def test_mp4_bytes_decodes(tmp_path):
    frames = smooth_frames(6)
    data = mp4_bytes(torch.from_numpy(frames), fps=8)  # tensors are accepted
    assert data[4:8] == b"ftyp"
    path = tmp_path / "mem.mp4"
    path.write_bytes(data)
    assert read_video(path).shape == frames.shape


def test_read_video_fps_size_and_max_frames(tmp_path):
    frames = smooth_frames(12)
    path = write_video(tmp_path / "clip.mp4", frames, fps=8)
    assert read_video(path, fps=4).shape[0] == 6  # 1.5 s at 4 fps
    assert read_video(path, fps=16).shape[0] == 24
    assert read_video(path, max_frames=5).shape[0] == 5
    small = read_video(path, size=16, fps=4, max_frames=3)
    assert small.shape == (3, 16, 16, 3)
    assert read_video(path, size=(8, 20)).shape == (12, 8, 20, 3)


def test_gif_round_trip_and_loop(tmp_path):
    frames = smooth_frames(6)
    path = write_video(tmp_path / "clip.gif", frames, fps=10)
    with Image.open(path) as im:
        assert im.info.get("loop") == 0 and im.n_frames == 6
    back = read_video(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames).mean() < 12


def test_gif_identical_frames_recovered_with_fps(tmp_path):
    frames = smooth_frames(3)
    frames[1] = frames[0]  # Pillow merges identical neighbours into one longer frame
    path = write_video(tmp_path / "dup.gif", frames, fps=10)
    assert read_video(path, fps=10).shape[0] == 3


def test_png_single_frame_and_grid(tmp_path):
    frames = smooth_frames(3)
    one = read_image(write_video(tmp_path / "one.png", frames[:1]))
    np.testing.assert_array_equal(one, frames[0])
    strip = read_image(write_video(tmp_path / "strip.png", frames))
    assert strip.shape == (32, 3 * 48, 3)
    np.testing.assert_array_equal(strip[:, 48:96], frames[1])
    grid = make_grid(smooth_frames(10, 4, 5))
    assert grid.shape == (2 * 4, 8 * 5, 3)  # rows of 8
    assert read_video(tmp_path / "one.png").shape == (1, 32, 48, 3)


def test_png_bytes_round_trip():
    frame = smooth_frames(1)[0]
    np.testing.assert_array_equal(decode_png(encode_png(frame)), frame)
    with pytest.raises(ValueError):
        decode_png(b"not a png")


def test_read_image_resize_center_crop(tmp_path):
    img = np.zeros((20, 40, 3), np.uint8)
    img[:, 10:30] = 255  # white centre square
    Image.fromarray(img).save(tmp_path / "im.png")
    out = read_image(tmp_path / "im.png", size=10)
    assert out.shape == (10, 10, 3)
    assert out.mean() > 240  # the centre crop is the white square


def test_errors(tmp_path):
    frames = smooth_frames(2)
    with pytest.raises(ValueError, match="unsupported video extension"):
        write_video(tmp_path / "clip.avi", frames)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "clip.mp4", frames.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        as_frames(np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match="channels"):
        as_frames(np.zeros((2, 4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "clip.gif", frames, fps=0)
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"junk")
    with pytest.raises(ValueError):
        read_video(tmp_path / "junk.mp4")


def test_decode_image_resizes_like_read_image(tmp_path):
    import io as _io

    from lumos.video import decode_image, read_image

    rng = np.random.default_rng(0)
    pic = Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))
    path = tmp_path / "pic.png"
    pic.save(path)
    buf = _io.BytesIO()
    pic.save(buf, format="PNG")
    got = decode_image(buf.getvalue(), (64, 64))
    assert got.shape == (64, 64, 3) and np.array_equal(got, read_image(path, size=(64, 64)))
    with pytest.raises(ValueError, match="could not be decoded"):
        decode_image(b"not an image", (64, 64))
    with pytest.raises(ValueError, match="non-empty bytes"):
        decode_image(b"", (64, 64))


def test_mp4_writer_streams_a_long_video_in_pieces(tmp_path):
    from lumos.video import Mp4Writer, make_grid, split_grid

    rng = np.random.default_rng(1)
    writer = Mp4Writer(fps=8, keyframe_every=8)
    chunks = [writer.add(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)) for _ in range(64)]
    assert sum(len(c) > 0 for c in chunks) >= 4  # bytes leave as the frames come, not at the end
    chunks.append(writer.close())
    data = b"".join(chunks)
    assert max(map(len, chunks)) < len(data) / 3  # no piece holds most of the file
    path = tmp_path / "s.mp4"
    path.write_bytes(data)
    assert read_video(path).shape == (64, 32, 48, 3)
    other = Mp4Writer()
    other.add(np.zeros((32, 48, 3), np.uint8))
    with pytest.raises(ValueError, match="differs"):
        other.add(np.zeros((16, 16, 3), np.uint8))
    strip = make_grid(rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8))
    assert [f.shape for f in split_grid(strip, 4)] == [(8, 8, 3)] * 4
    with pytest.raises(ValueError, match="at least one frame"):
        Mp4Writer().close()
