"""Video and image file I/O for Lumos.

Every function here speaks one array convention: frames are ``uint8`` arrays of shape
``[T, H, W, 3]`` (RGB, channels last) and single images are ``uint8`` ``[H, W, 3]``.
Torch tensors are accepted wherever an array is (they are moved to the CPU first).

* :func:`write_video` picks the format from the file extension:

  - ``.mp4`` (also ``.m4v``): PyAV, H.264 (``libx264``, ``yuv420p``) when the encoder is
    available, else MPEG-4 part 2 (``mpeg4``). Odd heights/widths are padded to even sizes
    by repeating the last row/column (``yuv420p`` needs even sizes), so the file may be one
    pixel larger than the input.
  - ``.gif``: Pillow, looping forever. Pillow merges consecutive *identical* frames into one
    longer frame, so read such GIFs back with ``fps=`` to recover the frame count.
  - ``.png``: one frame is saved as is; several frames become a grid (see :func:`make_grid`:
    a horizontal strip for up to 8 frames, rows of 8 beyond that).

* :func:`read_video` decodes with PyAV, optionally resampling to a frame rate (by picking
  the most recent source frame for each output time) and resizing + centre-cropping with
  Pillow. :func:`read_image` does the same for a still image.
* :func:`encode_png` / :func:`decode_png` and :func:`mp4_bytes` work in memory (HTTP).
"""

from __future__ import annotations

import io
import math
import numbers
import os
from collections.abc import Iterator
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

__all__ = [
    "VIDEO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "WRITE_EXTENSIONS",
    "as_frames",
    "make_grid",
    "write_video",
    "read_video",
    "read_image",
    "encode_png",
    "decode_png",
    "mp4_bytes",
    "mp4_codec",
]

#: Container extensions :func:`read_video` hands to PyAV.
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".gif", ".mpg", ".mpeg")
#: Still-image extensions :func:`read_video` / :func:`read_image` read with Pillow.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
#: Extensions :func:`write_video` can write.
WRITE_EXTENSIONS = (".mp4", ".m4v", ".gif", ".png")

Size = int | tuple[int, int]


# --------------------------------------------------------------------------- array checks


def _to_numpy(array: Any) -> np.ndarray:
    """Torch tensor / array-like -> numpy array (no copy when possible)."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # torch.Tensor, without importing
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def as_frames(frames: Any) -> np.ndarray:
    """Validate and normalise frames to a C-contiguous ``uint8`` array ``[T, H, W, 3]``.

    Accepts ``[T, H, W, 3]``, a single image ``[H, W, 3]`` (becomes ``T == 1``), grayscale
    ``[T, H, W, 1]`` (repeated to RGB) or RGBA ``[T, H, W, 4]`` (alpha dropped). Raises
    ``ValueError`` for any other shape, for a non-``uint8`` dtype or for an empty array.
    """
    arr = _to_numpy(frames)
    if arr.dtype != np.uint8:
        raise ValueError(
            f"frames must be uint8 (0..255), got dtype {arr.dtype}; "
            "convert with (x.clip(0, 1) * 255).round().astype(np.uint8) first"
        )
    if arr.ndim == 3:
        arr = arr[None]  # [H, W, C] -> [1, H, W, C]
    if arr.ndim != 4:
        raise ValueError(f"frames must have shape [T, H, W, 3], got {tuple(arr.shape)}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)  # [T, H, W, 1] -> [T, H, W, 3]
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]  # drop alpha
    if arr.shape[-1] != 3:
        raise ValueError(f"frames must have 3 channels (RGB, last axis), got {tuple(arr.shape)}")
    if min(arr.shape[:3]) == 0:
        raise ValueError(f"frames must be non-empty, got shape {tuple(arr.shape)}")
    return np.ascontiguousarray(arr)


def _as_image(frame: Any) -> np.ndarray:
    """Validate one image -> ``uint8 [H, W, 3]`` (a ``[1, H, W, 3]`` clip is accepted)."""
    arr = as_frames(frame)  # [T, H, W, 3]
    if arr.shape[0] != 1:
        raise ValueError(f"expected a single image [H, W, 3], got {arr.shape[0]} frames")
    return arr[0]


def _check_fps(fps: float) -> Fraction:
    if not isinstance(fps, numbers.Real) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    return Fraction(float(fps)).limit_denominator(1001)


def _suffix(path: str | os.PathLike) -> str:
    return Path(path).suffix.lower()


# --------------------------------------------------------------------------- grids


def make_grid(frames: Any, cols: int | None = None, pad: int = 0, pad_value: int = 0) -> np.ndarray:
    """Tile frames ``[T, H, W, 3]`` into one image ``[rows*H + gaps, cols*W + gaps, 3]``.

    ``cols`` defaults to ``T`` (a horizontal strip) for ``T <= 8`` and to 8 otherwise;
    frames fill rows left to right, unused cells are ``pad_value``. ``pad`` pixels of
    ``pad_value`` separate the cells (none by default, so a strip can be sliced back).
    """
    arr = as_frames(frames)  # [T, H, W, 3]
    t, h, w, _ = arr.shape
    if cols is None:
        cols = t if t <= 8 else 8
    if cols < 1 or pad < 0:
        raise ValueError(f"need cols >= 1 and pad >= 0, got cols={cols}, pad={pad}")
    cols = min(cols, t)
    rows = math.ceil(t / cols)
    out = np.full(
        (rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, 3), pad_value, np.uint8
    )  # [rows*H + gaps, cols*W + gaps, 3]
    for i in range(t):
        r, c = divmod(i, cols)
        y, x = r * (h + pad), c * (w + pad)
        out[y : y + h, x : x + w] = arr[i]
    return out


# --------------------------------------------------------------------------- writing


@lru_cache(maxsize=1)
def mp4_codec() -> str:
    """The video encoder used for mp4: ``"libx264"`` when PyAV has it, else ``"mpeg4"``."""
    import av

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return "mpeg4"


def _pad_even(arr: np.ndarray) -> np.ndarray:
    """Pad ``[T, H, W, 3]`` to even ``H`` and ``W`` by repeating the last row/column."""
    _, h, w, _ = arr.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        arr = np.pad(arr, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    return arr


def _add_mp4_stream(container: Any, rate: Fraction, w: int, h: int) -> Any:
    """The H.264 (or MPEG-4) video stream of our mp4 files, w x h at `rate` fps."""
    codec = mp4_codec()
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height = w, h
    stream.pix_fmt = "yuv420p"
    stream.codec_context.time_base = 1 / rate
    if codec == "libx264":
        stream.options = {"crf": "17", "preset": "medium"}
    else:
        stream.bit_rate = max(2_000_000, int(w * h * float(rate) * 2))
        stream.options = {"qscale": "2"}
    return stream


def _encode_mp4(target: str | os.PathLike | BinaryIO, frames: np.ndarray, fps: float) -> None:
    """Encode ``uint8 [T, H, W, 3]`` into an mp4 at ``target`` (a path or binary file)."""
    import av

    rate = _check_fps(fps)
    arr = _pad_even(frames)  # [T, H', W', 3], H' and W' even
    _, h, w, _ = arr.shape
    is_path = isinstance(target, str | os.PathLike)
    target_arg = os.fspath(target) if is_path else target
    # "faststart" (index before data, for progressive playback) needs a re-openable file.
    options = {"movflags": "faststart"} if is_path else {}
    with av.open(target_arg, mode="w", format="mp4", options=options) as container:
        stream = _add_mp4_stream(container, rate, w, h)
        for i, frame_arr in enumerate(arr):
            frame = av.VideoFrame.from_ndarray(frame_arr, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):  # flush
            container.mux(packet)


class _Sink:
    """A write-only file for PyAV that hands back what was written since the last take()."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


class Mp4Writer:
    """An mp4 written piece by piece, for streaming a long video without holding it: `add`
    frames ``uint8 [H, W, 3]`` (or ``[T, H, W, 3]``) and send the bytes each call returns, then
    the bytes of `close`. A fragmented mp4 (moov first, then a fragment per keyframe interval),
    which players and browsers play like any mp4; memory stays at about one fragment."""

    def __init__(self, fps: float = 8, keyframe_every: int = 32) -> None:
        self.rate = _check_fps(fps)
        self.keyframe_every = int(keyframe_every)
        self._sink = _Sink()
        self._container: Any = None
        self._stream: Any = None
        self._size: tuple[int, int] | None = None
        self.frames = 0

    def _open(self, h: int, w: int) -> None:
        import av

        options = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}
        self._container = av.open(self._sink, mode="w", format="mp4", options=options)
        self._stream = _add_mp4_stream(self._container, self.rate, w, h)
        self._stream.codec_context.gop_size = self.keyframe_every
        self._size = (h, w)

    def add(self, frames: Any) -> bytes:
        """Encode frames of the video's size (the first frame fixes it); returns new bytes."""
        import av

        arr = _pad_even(as_frames(frames))  # [T, H', W', 3]
        if self._container is None:
            self._open(arr.shape[1], arr.shape[2])
        elif arr.shape[1:3] != self._size:
            raise ValueError(f"frame size {arr.shape[1:3]} differs from the video's {self._size}")
        for frame_arr in arr:
            frame = av.VideoFrame.from_ndarray(frame_arr, format="rgb24")
            frame.pts = self.frames
            self.frames += 1
            for packet in self._stream.encode(frame):
                self._container.mux(packet)
        return self._sink.take()

    def close(self) -> bytes:
        """Flush the encoder and end the file; returns the last bytes."""
        if self._container is None:
            raise ValueError("an mp4 needs at least one frame")
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._container = None
        return self._sink.take()


def split_grid(image: np.ndarray, n: int) -> list[np.ndarray]:
    """The n frames of an image tiled by :func:`make_grid` with its default layout (no pad)."""
    if n <= 1:
        return [image]
    cols = n if n <= 8 else 8
    rows = -(-n // cols)
    h, w = image.shape[0] // rows, image.shape[1] // cols
    return [image[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w]
            for i in range(n)]  # fmt: skip


def _write_gif(target: str | os.PathLike | BinaryIO, frames: np.ndarray, fps: float) -> None:
    """Save ``uint8 [T, H, W, 3]`` as a looping GIF."""
    rate = _check_fps(fps)
    images = [Image.fromarray(f, mode="RGB") for f in frames]
    duration = max(20, round(1000 / float(rate)))  # ms per frame; browsers clamp < 20 ms
    images[0].save(
        target,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=duration,
        loop=0,
    )


def write_video(path: str | os.PathLike, frames: Any, fps: float = 8) -> Path:
    """Write frames ``uint8 [T, H, W, 3]`` to ``path``; the extension picks the format.

    ``.mp4``/``.m4v`` (PyAV), ``.gif`` (Pillow, looping) or ``.png`` (one frame, or a grid
    of frames, see :func:`make_grid`). Parent folders are created. Returns the path.
    Raises ``ValueError`` for another extension or invalid frames.
    """
    path = Path(path)
    ext = _suffix(path)
    if ext not in WRITE_EXTENSIONS:
        raise ValueError(
            f"unsupported video extension {ext!r} for {path}; use one of {WRITE_EXTENSIONS}"
        )
    arr = as_frames(frames)  # [T, H, W, 3]
    path.parent.mkdir(parents=True, exist_ok=True)
    if ext in (".mp4", ".m4v"):
        _encode_mp4(path, arr, fps)
    elif ext == ".gif":
        _write_gif(path, arr, fps)
    else:
        image = arr[0] if arr.shape[0] == 1 else make_grid(arr)  # [H', W', 3]
        Image.fromarray(image, mode="RGB").save(path, format="PNG")
    return path


def mp4_bytes(frames: Any, fps: float = 8) -> bytes:
    """Encode frames ``uint8 [T, H, W, 3]`` as an in-memory mp4 (e.g. for an HTTP response)."""
    arr = as_frames(frames)  # [T, H, W, 3]
    buf = io.BytesIO()
    _encode_mp4(buf, arr, fps)
    return buf.getvalue()


def encode_png(frame: Any) -> bytes:
    """Encode one image ``uint8 [H, W, 3]`` as PNG bytes (several frames become a grid)."""
    arr = as_frames(frame)  # [T, H, W, 3]
    image = arr[0] if arr.shape[0] == 1 else make_grid(arr)  # [H', W', 3]
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNG (or any Pillow-readable image) bytes to ``uint8 [H, W, 3]``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"decode_png expects bytes, got {type(data).__name__}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()  # [H, W, 3]
    except Image.UnidentifiedImageError as e:
        raise ValueError("data is not a decodable image") from e


# --------------------------------------------------------------------------- reading


def _norm_size(size: Size | None) -> tuple[int, int] | None:
    """``int`` -> square ``(size, size)``; ``(h, w)`` kept; validated."""
    if size is None:
        return None
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, int | np.integer) and v > 0 for v in hw):
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    return int(hw[0]), int(hw[1])


def _resize_center_crop(image: Image.Image, hw: tuple[int, int] | None) -> np.ndarray:
    """Resize so the image covers ``(h, w)`` (aspect kept), centre-crop -> ``uint8 [h, w, 3]``."""
    image = image.convert("RGB")
    if hw is not None:
        th, tw = hw
        iw, ih = image.size
        if (ih, iw) != (th, tw):
            scale = max(th / ih, tw / iw)
            nw, nh = max(tw, round(iw * scale)), max(th, round(ih * scale))
            if (nw, nh) != (iw, ih):
                image = image.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
            left, top = (nw - tw) // 2, (nh - th) // 2
            image = image.crop((left, top, left + tw, top + th))
    return np.asarray(image, dtype=np.uint8)  # [h, w, 3]


def read_image(path: str | os.PathLike, size: Size | None = None) -> np.ndarray:
    """Read an image file as ``uint8 [H, W, 3]``; ``size`` (int or ``(h, w)``) resizes + crops."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    hw = _norm_size(size)
    try:
        with Image.open(path) as im:
            return _resize_center_crop(im, hw).copy()
    except Image.UnidentifiedImageError as e:
        raise ValueError(f"cannot decode image {path}") from e


def decode_image(data: bytes, size: Size | None = None) -> np.ndarray:
    """PNG/JPEG/... bytes -> ``uint8 [H, W, 3]``, resized and centre-cropped like
    :func:`read_image`: the one resize rule for an image-to-video first frame (CLI, API and
    workers give the same pixels, hence the same codes, for the same picture)."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or not data:
        raise ValueError("image data must be non-empty bytes")
    hw = _norm_size(size)
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            return _resize_center_crop(im, hw).copy()
    except (Image.UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"image could not be decoded: {e}") from None


def _decoded_frames(path: Path) -> Iterator[tuple[float, float | None, Any]]:
    """Yield ``(time_s, duration_s or None, av.VideoFrame)`` for the first video stream."""
    import av

    try:
        container = av.open(os.fspath(path))
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot open video {path}: {e}") from e
    with container:
        if not container.streams.video:
            raise ValueError(f"no video stream in {path}")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or 25
        first: float | None = None
        for i, frame in enumerate(container.decode(stream)):
            t = frame.time
            if t is None:
                t = i / float(rate)
            if first is None:
                first = t
            dur = getattr(frame, "duration", None)
            tb = frame.time_base
            dur_s = float(dur * tb) if dur and tb else None
            yield t - first, dur_s, frame


def read_video(
    path: str | os.PathLike,
    size: Size | None = None,
    fps: float | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """Decode a video file to ``uint8 [T, H, W, 3]``.

    ``fps``: resample to this rate by picking, for each output time ``k / fps``, the most
    recent source frame (drops frames when slower than the source, repeats them when
    faster); ``None`` keeps every decoded frame. ``size`` (int or ``(h, w)``): resize so the
    frame covers the size, then centre-crop. ``max_frames`` stops decoding early. Still
    images (``.png``, ``.jpg``, ...) are returned as one frame.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    hw = _norm_size(size)
    if _suffix(path) in IMAGE_EXTENSIONS:
        return read_image(path, hw)[None]  # [1, H, W, 3]
    step = float(_check_fps(fps)) ** -1 if fps is not None else None

    out: list[np.ndarray] = []  # each [H, W, 3]

    def full() -> bool:
        return max_frames is not None and len(out) >= max_frames

    if step is None:
        for _, _, frame in _decoded_frames(path):
            out.append(_resize_center_crop(frame.to_image(), hw))
            if full():
                break
    else:
        # Emit the previous source frame for every output time before the current frame's.
        k = 0  # next output index, at time k * step
        prev: tuple[float, Any] | None = None
        prev_arr: np.ndarray | None = None
        last_dt = step
        for t, dur, frame in _decoded_frames(path):
            if prev is not None:
                last_dt = max(t - prev[0], 1e-6)
                while k * step < t - 1e-9 and not full():
                    if prev_arr is None:
                        prev_arr = _resize_center_crop(prev[1].to_image(), hw)
                    out.append(prev_arr)
                    k += 1
            if full():
                break
            prev, prev_arr = (t, frame), None
            if dur is not None:
                last_dt = dur
        if prev is not None and not full():
            # The last frame lasts its own duration, else about as long as the gap before it.
            while k * step < prev[0] + last_dt - 1e-9 and not full():
                if prev_arr is None:
                    prev_arr = _resize_center_crop(prev[1].to_image(), hw)
                out.append(prev_arr)
                k += 1
    if not out:
        raise ValueError(f"no frames decoded from {path}")
    return np.stack(out)  # [T, H, W, 3]
