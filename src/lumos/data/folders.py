"""Users' training data: a folder of captioned videos, or a CSV of ``path,caption`` rows."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from lumos.data.render import Clip
from lumos.video import VIDEO_EXTENSIONS, read_video


class VideoFolderDataset(Dataset):
    """Users' captioned videos, read with :func:`lumos.video.read_video`.

    ``root`` is either a folder (searched recursively) of video files, each with a caption in
    a sidecar ``.txt`` file of the same stem (``clip1.mp4`` + ``clip1.txt``), or a ``.csv``
    file with columns ``path,caption`` (paths relative to the CSV's folder). Each item is a
    :class:`Clip` (``items`` empty, ``split="user"``) with ``video`` ``uint8 [T, size, size,
    3]``: resampled to ``fps`` (None: source rate), the first ``frames`` frames, padded by
    repeating the last frame when the video is shorter (``frames=None``: all frames).
    Missing files or captions raise ``FileNotFoundError`` at construction.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int | tuple[int, int] = 64,
        frames: int | None = 16,
        fps: float | None = None,
        extensions: Sequence[str] = VIDEO_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        self.size = size
        self.frames = frames
        self.fps = fps
        if frames is not None and frames < 1:
            raise ValueError(f"frames must be >= 1 or None, got {frames}")
        exts = tuple(e.lower() for e in extensions)
        if self.root.is_file() and self.root.suffix.lower() == ".csv":
            self.samples = self._from_csv(self.root)
        elif self.root.is_dir():
            self.samples = self._from_folder(self.root, exts)
        elif not self.root.exists():
            raise FileNotFoundError(f"video folder / CSV not found: {self.root}")
        else:
            raise ValueError(f"{self.root} is neither a folder nor a .csv file")
        if not self.samples:
            raise ValueError(f"no videos with extensions {exts} found in {self.root}")

    @staticmethod
    def _from_folder(root: Path, exts: tuple[str, ...]) -> list[tuple[Path, str]]:
        videos = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        samples, missing = [], []
        for p in videos:
            txt = p.with_suffix(".txt")
            if not txt.is_file():
                missing.append(str(txt))
                continue
            caption = txt.read_text(encoding="utf-8").strip()
            if not caption:
                raise ValueError(f"empty caption file {txt}")
            samples.append((p, caption))
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise FileNotFoundError(
                f"missing caption file(s) {missing[:5]}{more}: every video needs a sidecar "
                ".txt of the same stem holding its caption"
            )
        return samples

    @staticmethod
    def _from_csv(csv_path: Path) -> list[tuple[Path, str]]:
        base = csv_path.parent
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in reader.fieldnames or []]
            if "path" not in fields or "caption" not in fields:
                raise ValueError(f"{csv_path} needs columns 'path' and 'caption', got {fields}")
            reader.fieldnames = fields
            samples, missing = [], []
            for line, row in enumerate(reader, start=2):
                rel, caption = (row.get("path") or "").strip(), (row.get("caption") or "").strip()
                if not rel or not caption:
                    raise ValueError(f"{csv_path}:{line}: empty path or caption")
                p = Path(rel) if Path(rel).is_absolute() else base / rel
                if not p.is_file():
                    missing.append(str(p))
                samples.append((p, caption))
        if missing:
            raise FileNotFoundError(f"{csv_path}: video file(s) not found: {missing[:5]}")
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Clip:
        path, caption = self.samples[index]
        video = read_video(path, size=self.size, fps=self.fps, max_frames=self.frames)
        if self.frames is not None and video.shape[0] < self.frames:
            pad = np.repeat(video[-1:], self.frames - video.shape[0], axis=0)  # [P, H, W, 3]
            video = np.concatenate([video, pad])  # [frames, H, W, 3]
        return Clip(video=video, caption=caption, items=[], split="user")
