"""Generation defaults of a model folder (`pipeline.json`) and the one prompt-conditioning rule.

Torch-free, so the API and cluster processes use the same rule as the pipeline and the worker.

The prompt prefix of a video names its length twice (method.md section 1): the text template's
"consisting of F frames" and the duration/fps number tokens. `PipelineSettings.conditioning` is
the only place that derives them from the RGB frame count of a request:
- duration = the folder's `duration` when set (the value the model was trained with), else the
  clip length rounded to whole seconds (at least 1, at most the default clip's: a longer video
  is made through the rolling window, and its prefix keeps the trained duration); fps = the
  folder's fps;
- F = fps x duration for the official checkpoints (`prompt_frames: "fps_x_duration"`: 24 for
  12 fps x 2 s, what they were trained with), else the RGB frame count (`"rgb"`, our models);
- an image (text-to-image: a clip of one RGB frame) is a one-frame video with duration = fps = 1,
  sampled with `cfg_image`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

PromptFrames = Literal["rgb", "fps_x_duration"]

# the released inference defaults (method.md sections 1, 2, 7): 448x256 or 672x384 (width x
# height), 25 RGB frames at 12 fps (2 s), 50 steps, CFG 15 for video and 16 for images
OFFICIAL_RESOLUTIONS: dict[str, tuple[int, int]] = {"448x256": (256, 448), "672x384": (384, 672)}


class Conditioning(NamedTuple):
    """What the prompt prefix says about a clip's length."""

    text_frames: int  # F of the text template
    duration: int  # the duration number token (seconds)
    fps: int  # the fps number token


def parse_resolution(text: str, multiple: int = 1) -> tuple[int, int]:
    """ "WIDTHxHEIGHT" -> (height, width), both positive multiples of `multiple`."""
    w, sep, h = str(text).lower().partition("x")
    if not (sep and w.isascii() and h.isascii() and w.isdigit() and h.isdigit()):
        raise ValueError(f"resolution must be WIDTHxHEIGHT (e.g. 448x256), got {text!r}")
    height, width = int(h), int(w)
    if height < 1 or width < 1 or height % multiple or width % multiple:
        raise ValueError(
            f"resolution {text!r}: width and height must be positive multiples of {multiple}"
        )
    return height, width


@dataclass
class PipelineSettings:
    """Defaults of one model folder (pipeline.json). `frames` counts RGB frames."""

    height: int = 64  # pixels
    width: int = 64
    frames: int = 16  # RGB frames of a default video
    fps: int = 8
    steps: int = 50
    cfg_video: float = 15.0
    cfg_image: float = 16.0
    top_p: float | None = None  # nucleus sampling of the codes (None: the full distribution)
    top_k: int | None = None  # sample among the k likeliest codes (None: all)
    temperature: float = 1.0  # of the guided code distribution
    tau0: float = 1.0  # Gumbel temperature of the MaskGIT confidence (decays within a frame)
    history_mask: float = 0.7  # AR-DF inference masking of committed frames (rho_inf)
    template: bool = False  # wrap captions in the official text template
    prompt_frames: PromptFrames = "rgb"  # what F of the template counts (see the module doc)
    duration: int | None = None  # the duration token trained with (None: from the length asked)
    max_frames: int | None = None  # RGB frames one call may ask for (None: no cap)
    # rolling context (docs/LONG_VIDEO.md): latent frames the KV cache holds besides the prompt
    # (None: the default clip's latent frames minus one, the length trained on) and how many
    # frames it slides at a time (each slide rebuilds the cache by one prefill; None: 8, at most
    # the window)
    window: int | None = None
    window_stride: int | None = None
    # classifier-free guidance on the first N steps of each frame only, then the conditional
    # row alone (None: every step)
    guidance_steps: int | None = None

    def __post_init__(self) -> None:
        if self.prompt_frames not in ("rgb", "fps_x_duration"):
            raise ValueError(
                f"prompt_frames must be 'rgb' or 'fps_x_duration', got {self.prompt_frames!r}"
            )
        optional = ("max_frames", "window", "window_stride", "guidance_steps")
        for name in ("height", "width", "frames", "fps", "steps", *optional):
            if name in optional and getattr(self, name) is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.duration is not None and (not isinstance(self.duration, int) or self.duration < 1):
            raise ValueError(f"duration must be a positive integer or null, got {self.duration!r}")

    @classmethod
    def from_dict(cls, d: dict) -> PipelineSettings:
        """From pipeline.json (unknown keys are ignored: folders may carry notes)."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @classmethod
    def official(cls, resolution: str = "448x256") -> PipelineSettings:
        """The released Lumos-1 inference defaults at one of OFFICIAL_RESOLUTIONS."""
        if resolution not in OFFICIAL_RESOLUTIONS:
            raise ValueError(
                f"released resolutions are {', '.join(OFFICIAL_RESOLUTIONS)}; got {resolution!r}"
            )
        height, width = OFFICIAL_RESOLUTIONS[resolution]
        return cls(
            height=height,
            width=width,
            frames=25,
            fps=12,
            steps=50,
            cfg_video=15.0,
            cfg_image=16.0,
            template=True,
            prompt_frames="fps_x_duration",
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_resolution(self, text: str, multiple: int) -> PipelineSettings:
        """The same defaults at "WIDTHxHEIGHT" (validated against `multiple`)."""
        height, width = parse_resolution(text, multiple)
        return replace(self, height=height, width=width)

    def conditioning(self, rgb_frames: int, image: bool = False) -> Conditioning:
        """(F, duration, fps) of the prompt prefix for a clip of `rgb_frames` RGB frames (one
        frame is an image)."""
        if rgb_frames < 1:
            raise ValueError(f"a clip has at least 1 RGB frame, got {rgb_frames}")
        if image or rgb_frames == 1:
            return Conditioning(1, 1, 1)
        # a clip longer than the default one (made through the rolling window) states the
        # default clip's duration: the longest the model was trained on
        duration = self.duration or max(1, round(min(rgb_frames, self.frames) / self.fps))
        text_frames = self.fps * duration if self.prompt_frames == "fps_x_duration" else rgb_frames
        return Conditioning(text_frames, duration, self.fps)


# the sampling settings a command line may override for one run (`Pipeline.set_sampling`)
SAMPLING_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("temperature", float, "code temperature"),
    ("top_p", float, "nucleus sampling"),
    ("top_k", int, "top-k sampling"),
    ("tau0", float, "MaskGIT confidence noise"),
    ("history_mask", float, "AR-DF inference masking of committed frames, in [0, 1)"),
    ("guidance_steps", int, "CFG on the first N steps of a frame only"),
)


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--temperature, --top-p, --top-k, --tau0, --history-mask (default: the model folder's)."""
    for name, kind, what in SAMPLING_FLAGS:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=kind, default=None, help=f"{what} (model's)")


def sampling_overrides(args: argparse.Namespace) -> dict:
    """The sampling flags of parsed args, for `Pipeline.set_sampling` (None keeps a value)."""
    return {name: getattr(args, name) for name, _, _ in SAMPLING_FLAGS}
