"""A generation pipeline loaded from a folder: model + visual tokenizer + text tokenizer.

Folder layouts:
- ours (the bundled model, `lumos train` outputs): `pipeline.json`, `model/` (config.json +
  model.safetensors), `tokenizer/` (our FSQ video tokenizer) and `text_tokenizer.json`;
- official: a Chameleon-format checkpoint folder (config.json + *.safetensors +
  text_tokenizer.json) and a Cosmos-Tokenizer-DV4x8x8 folder (inside it, beside it, or given).

Calls: text_to_image, text_to_video, image_to_video and extend (continue a video), each with
frames (RGB), steps, cfg and seed; `on_frame` receives every latent frame as it is committed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from lumos.checkpoint import load_model, read_config
from lumos.config import SamplerConfig
from lumos.devices import resolve_compile, resolve_dtype
from lumos.sampler import VideoRequest, generate
from lumos.sequence import Layout, prompt_text
from lumos.settings import Conditioning, PipelineSettings
from lumos.tokenizers import TextTokenizer, VisualTokenizer, load_visual_tokenizer

__all__ = ["BUNDLED", "COSMOS_DIR", "Conditioning", "Pipeline", "PipelineSettings"]

BUNDLED = Path(__file__).parent / "assets" / "fmnist"
COSMOS_DIR = "Cosmos-Tokenizer-DV4x8x8"


class Pipeline:
    """Model, tokenizers and layout of one folder, with the four generation calls."""

    def __init__(
        self,
        model,
        visual: VisualTokenizer,
        text: TextTokenizer,
        settings: PipelineSettings,
    ) -> None:
        self.model, self.visual, self.text, self.settings = model, visual, text, settings
        self.vocab = model.cfg.vocab_spec
        s = visual.spatial
        if settings.height % s or settings.width % s:
            raise ValueError(f"resolution must be a multiple of the tokenizer's {s}x compression")
        self.layout = Layout(
            self.vocab, settings.height // s, settings.width // s, model.cfg.rope_scales
        )
        self.device = next(model.parameters()).device

    # -- loading ----------------------------------------------------------------------------------
    @classmethod
    def from_folder(
        cls,
        folder: str | Path | None = None,
        device: str | None = None,
        tokenizer: str | Path | None = None,
        dtype: torch.dtype | str | None = None,
        resolution: str | None = None,
        compile: str = "off",
    ) -> Pipeline:
        """Load ours (default: the bundled model) or an official checkpoint folder. dtype None or
        "auto": bfloat16 on CUDA and on CPUs with hardware bf16 (AVX512-BF16 or AMX), else float32
        (`resolve_dtype`). "random" / "random:<preset>" (random weights, for tests) stay float32
        unless a dtype is named. The visual tokenizer runs on the model's device. `resolution`
        ("WIDTHxHEIGHT") overrides the folder's (official: 448x256 unless given). `compile`
        ("off", "on", "auto": `resolve_compile`) compiles the frame steps before returning
        (`compile_steps`: ~30-60 s on 2 cores, worth it for long or many videos)."""
        if str(folder).startswith("random"):  # "random" or "random:<preset>"
            preset = str(folder).partition(":")[2] or "fmnist"
            pipe = cls.random(preset, device=device or "cpu")
            if dtype not in (None, "auto"):
                pipe.model.to(resolve_dtype(dtype, device or "cpu"))
            pipe = pipe.at_resolution(resolution) if resolution else pipe
            return pipe.compiled(compile)
        folder = Path(folder) if folder is not None else BUNDLED
        if not folder.is_dir():
            hint = (
                " (the bundled model is missing: see docs/MODEL_CARD.md)"
                if folder == BUNDLED
                else ""
            )
            raise FileNotFoundError(f"model folder {folder} does not exist{hint}")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but this PyTorch build sees no GPU")
        if (folder / "pipeline.json").is_file():
            settings = PipelineSettings.from_dict(
                json.loads((folder / "pipeline.json").read_text())
            )
            dtype = _inference_dtype(dtype, device, folder / "model", settings)
            model, _ = load_model(folder / "model", device=device, dtype=dtype)
            visual = load_visual_tokenizer(tokenizer or folder / "tokenizer", device=device)
            text = TextTokenizer.from_file(folder / "text_tokenizer.json")
        else:  # official: config.json (a clear error if absent) + text_tokenizer.json + Cosmos
            read_config(folder)
            text_file = folder / "text_tokenizer.json"
            if not text_file.is_file():
                raise FileNotFoundError(f"no text_tokenizer.json in {folder}")
            tok_dir = Path(tokenizer) if tokenizer else _find_cosmos(folder)
            settings = PipelineSettings.official()
            dtype = _inference_dtype(dtype, device, folder, settings)
            model, _ = load_model(folder, device=device, dtype=dtype)
            visual = load_visual_tokenizer(tok_dir, device=device)
            text = TextTokenizer.from_file(text_file)
        pipe = cls(model, visual, text, settings)
        pipe = pipe.at_resolution(resolution) if resolution else pipe
        return pipe.compiled(compile)

    def compiled(self, choice: str = "on") -> Pipeline:
        """This pipeline with its frame steps compiled when `choice` resolves to on
        (`resolve_compile`; blocks while compiling), for this resolution's frame block."""
        if resolve_compile(choice, str(self.device), next(self.model.parameters()).dtype):
            self.compile_steps()
        return self

    def compile_steps(self, batches: tuple[int, ...] = (1, 2)) -> None:
        """Compile and warm the model's frame steps for these batch sizes (`compile_steps`;
        blocking: call it in a thread to keep generating eagerly meanwhile)."""
        from lumos.model import compile_steps

        compile_steps(self.model, self.layout.block_len, batches)

    def at_resolution(self, resolution: str) -> Pipeline:
        """The same model and tokenizers at another "WIDTHxHEIGHT" (a multiple of the latent
        cell; official layouts also need multiples of 32 for their size tokens)."""
        multiple = self.visual.spatial
        if self.settings.template:  # size number tokens are H/32 and W/32
            multiple = max(multiple, 32)
        settings = self.settings.with_resolution(resolution, multiple)
        return Pipeline(self.model, self.visual, self.text, settings)

    @classmethod
    def random(cls, preset: str = "fmnist", device: str = "cpu", seed: int = 0) -> Pipeline:
        """Random weights and an untrained tokenizer: a smoke test of the whole path, no model."""
        from lumos.config import model_preset
        from lumos.data import build_caption, eval_prompts
        from lumos.model import build_model
        from lumos.tokenizers import FSQVideoTokenizer, train_bpe

        torch.manual_seed(seed)
        visual = FSQVideoTokenizer("fmnist64").eval()
        vocab = f"compact:320:{visual.codebook_size}"
        model = build_model(model_preset(preset, vocab=vocab), device=device, seed=seed).eval()
        caps = [build_caption(specs) for _, specs in eval_prompts("seen")]
        text = train_bpe(caps, 300)
        return cls(model, visual, text, PipelineSettings(steps=8))

    # -- helpers ----------------------------------------------------------------------------------
    def text_ids(self, prompt: str | None, text_frames: int, fps: int) -> list[int] | None:
        """Token ids of a caption (wrapped in the official template, which states `text_frames`
        and `fps`, when the folder says so); None for no prompt."""
        if prompt is None:
            return None
        s = self.settings
        text = prompt_text(prompt, s.width, s.height, text_frames, fps) if s.template else prompt
        ids = self.text.encode(text)
        bad = [i for i in ids if not 0 <= i < self.vocab.n_text]
        if bad:
            raise ValueError(
                f"text tokenizer produced ids outside the model's text range: {bad[:4]}"
            )
        return ids

    def conditioning(self, rgb_frames: int, image: bool = False) -> Conditioning:
        """(F, duration, fps) of the prompt prefix: the folder's one rule (lumos.settings)."""
        return self.settings.conditioning(rgb_frames, image)

    def sampler_config(
        self, steps: int | None = None, cfg: float | None = None, image: bool = False
    ) -> SamplerConfig:
        """The folder's sampling defaults (pipeline.json) with steps / cfg overridden."""
        s = self.settings
        g = cfg if cfg is not None else (s.cfg_image if image else s.cfg_video)
        return SamplerConfig(
            steps=s.steps if steps is None else steps,
            cfg=g,
            tau0=s.tau0,
            history_mask_ratio=s.history_mask,
            top_p=s.top_p,
            top_k=s.top_k,
            temperature=s.temperature,
            window=self.context_window(),
            window_stride=s.window_stride or min(8, self.context_window()),
            guidance_steps=s.guidance_steps,
        )

    def context_window(self) -> int:
        """Latent frames the KV cache holds besides the prompt (pipeline.json `window`; default:
        the folder's default clip in latent frames minus one)."""
        s = self.settings
        return s.window if s.window is not None else max(1, self.visual.latent_frames(s.frames) - 1)

    def set_sampling(self, **overrides: float | int | None) -> None:
        """Override the folder's `temperature` / `top_p` / `top_k` / `tau0` / `history_mask` /
        `window` / `window_stride` / `guidance_steps` (None keeps a value); ValueError names a
        bad value, and then nothing is changed."""
        names = {
            "temperature",
            "top_p",
            "top_k",
            "tau0",
            "history_mask",
            "window",
            "window_stride",
            "guidance_steps",
        }
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"not sampling settings: {sorted(unknown)}")
        new = replace(self.settings, **{k: v for k, v in overrides.items() if v is not None})
        old, self.settings = self.settings, new
        try:
            self.sampler_config()
        except ValueError:
            self.settings = old
            raise

    def latent_frames(self, rgb_frames: int) -> int:
        cap = self.settings.max_frames
        if rgb_frames < 1 or (cap is not None and rgb_frames > cap):
            raise ValueError(f"frames must be in [1, {cap or 'any'}] RGB frames, got {rgb_frames}")
        return self.visual.latent_frames(rgb_frames)

    def encode_image(self, image: Tensor) -> Tensor:
        """uint8 [H, W, 3] (resized to the model's resolution by the caller) -> codes [1, h, w]."""
        s = self.settings
        if tuple(image.shape) != (s.height, s.width, 3):
            raise ValueError(
                f"image must be [{s.height}, {s.width}, 3] uint8, got {tuple(image.shape)}"
            )
        return self.visual.encode(image.unsqueeze(0))

    def decode(self, codes: Tensor) -> Tensor:
        """codes [t, h, w] -> uint8 video [T, H, W, 3]."""
        return self.visual.decode(codes.cpu())

    # -- generation -------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate_codes(
        self,
        prompt: str | None,
        n_latent: int,
        given: Tensor | None = None,
        steps: int | None = None,
        cfg: float | None = None,
        seed: int = 0,
        image: bool = False,
        rgb_frames: int | None = None,
        on_frame: Callable[[int, Tensor], None] | None = None,
    ) -> Tensor:
        """Latent codes [t0 + n_latent, h, w] (t0 = given frames); `rgb_frames`: the RGB length
        of the whole clip (default: the folder's), which the prompt prefix states."""
        cond = self.conditioning(rgb_frames or self.settings.frames, image)
        text = self.text_ids(prompt, cond.text_frames, cond.fps)
        g = torch.Generator(device=self.device).manual_seed(seed)
        req = VideoRequest(
            text, n_latent, given=given, duration=cond.duration, fps=cond.fps, generator=g
        )
        sc = self.sampler_config(steps, cfg, image)
        return generate(self.model, self.layout, [req], sc, on_frame=on_frame)[0]

    def text_to_image(self, prompt: str, **kw) -> Tensor:
        """uint8 [1, H, W, 3]."""
        return self.decode(self.generate_codes(prompt, 1, image=True, rgb_frames=1, **kw))

    def text_to_video(self, prompt: str, frames: int | None = None, **kw) -> Tensor:
        """uint8 [T, H, W, 3] with T = frames (rounded up to the tokenizer's temporal step)."""
        frames = frames or self.settings.frames
        codes = self.generate_codes(prompt, self.latent_frames(frames), rgb_frames=frames, **kw)
        return self.decode(codes)[:frames]

    def image_to_video(self, image: Tensor, prompt: str, frames: int | None = None, **kw) -> Tensor:
        """The given image is frame 0; uint8 [T, H, W, 3] with T = frames, as text_to_video."""
        frames = frames or self.settings.frames
        first = self.encode_image(image)
        n = self.latent_frames(frames) - 1
        codes = self.generate_codes(prompt, n, given=first, rgb_frames=frames, **kw)
        return self.decode(codes)[:frames]

    def extend(self, codes: Tensor, prompt: str | None, frames: int, **kw) -> Tensor:
        """Continue a video given by its codes [t, h, w] by `frames` RGB frames -> all codes."""
        n = max(1, -(-frames // self.visual.temporal))
        total = self.visual.rgb_frames(codes.shape[0] + n)
        return self.generate_codes(prompt, n, given=codes, rgb_frames=total, **kw)


def _inference_dtype(
    dtype: torch.dtype | str | None, device: str, model_dir: Path, settings: PipelineSettings
) -> torch.dtype:
    """resolve_dtype at the model's per-step matmul shape: the frame block's rows for both CFG
    streams through the MLP's first projection."""
    raw = read_config(model_dir)
    m = raw.get("model", raw)  # ours nests the ModelConfig; Chameleon's is flat
    dim = int(m.get("dim", m.get("hidden_size", 0)) or 0)
    ffn = int(m.get("ffn_dim", m.get("intermediate_size", 0)) or 0)
    if not dim or not ffn:
        return resolve_dtype(dtype, device)
    h, w = settings.height // 8, settings.width // 8  # the latent grid (8x tokenizers)
    rows = 2 * (h * (w + 1) + 4)  # one frame block per CFG stream
    return resolve_dtype(dtype, device, (rows, dim, ffn))


def _find_cosmos(folder: Path) -> Path:
    for cand in (folder / COSMOS_DIR, folder.parent / COSMOS_DIR):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(
        f"no {COSMOS_DIR} folder in or beside {folder}; pass the tokenizer folder explicitly"
    )
