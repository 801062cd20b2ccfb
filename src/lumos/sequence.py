"""Vocabulary spec, token layout, 3-D positions and frame spans (method.md sections 1 and 3).

Every special id lives in one `VocabSpec`; no literal id appears anywhere else. A `Layout` fixes
the latent grid (h rows x w columns) and the tokenizer compression, and builds the token ids, the
per-token kind, the absolute 1-D index, the three MM-RoPE axis positions and the frame spans of
any sequence the model sees: training samples, inference prefixes, one frame block at a time.
All position arithmetic is vectorised.

One frame block (latent frame k, starting at absolute index `start`):

    frame_start, num(H/32), num(W/32), [w codes, newline] x h, frame_end

Content tokens (codes, MASK and new-lines) get axis positions
    t = p0 + s_t * k,   h = p0 + s_h * row,   w = p0 + s_w * col   (new-line: col = w)
with p0 the absolute index of the first content token of the sequence's first frame. Every other
token (text, specials, headers, frame end) gets its raw absolute index on all three axes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor


@dataclass(frozen=True)
class VocabSpec:
    """One flat vocabulary: text ids, special ids, number tokens and visual codes."""

    name: str
    n_text: int  # text ids live in [0, n_text)
    bos: int
    pad: int
    frame_start: int
    frame_end: int
    newline: int
    video_start: int
    video_end: int
    mask: int
    sep: int  # end of turn / separator
    number_base: int  # id of the number token for 0
    max_number: int  # largest n with a number token
    visual_offset: int  # id of visual code 0
    codebook_size: int
    size: int  # total vocabulary size

    def number(self, n: int) -> int:
        if not 0 <= n <= self.max_number:
            raise ValueError(f"no number token for {n} (0..{self.max_number})")
        return self.number_base + n

    def visual(self, codes: Tensor) -> Tensor:
        """Tokenizer indices -> vocabulary ids."""
        return codes.long() + self.visual_offset

    def code(self, ids: Tensor) -> Tensor:
        """Vocabulary ids -> tokenizer indices (ids must be visual)."""
        return ids.long() - self.visual_offset

    def is_visual(self, ids: Tensor) -> Tensor:
        return (ids >= self.visual_offset) & (ids < self.visual_offset + self.codebook_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def official_vocab() -> VocabSpec:
    """The released Lumos-1 layout (Chameleon BPE + 64,000 Cosmos codes)."""
    return VocabSpec(
        name="official",
        n_text=65536,
        bos=0,
        pad=0,
        frame_start=8197,
        frame_end=8196,
        newline=8803,
        video_start=9004,
        video_end=9005,
        mask=9003,
        sep=8710,
        number_base=8804,
        max_number=198,  # 8804 + 198 = 9002, the id below MASK
        visual_offset=65536,
        codebook_size=64000,
        size=129536,
    )


def compact_vocab(n_text: int, codebook_size: int, max_number: int = 63) -> VocabSpec:
    """Small models: text ids [0, n_text) (0 = BOS/pad), 7 specials, numbers, then codes."""
    if n_text < 2 or codebook_size < 2:
        raise ValueError("compact vocabulary needs n_text >= 2 and codebook_size >= 2")
    s = n_text
    visual_offset = s + 7 + max_number + 1
    return VocabSpec(
        name=f"compact:{n_text}:{codebook_size}",
        n_text=n_text,
        bos=0,
        pad=0,
        frame_start=s,
        frame_end=s + 1,
        newline=s + 2,
        video_start=s + 3,
        video_end=s + 4,
        mask=s + 5,
        sep=s + 6,
        number_base=s + 7,
        max_number=max_number,
        visual_offset=visual_offset,
        codebook_size=codebook_size,
        size=visual_offset + codebook_size,
    )


VOCAB_ALIASES = {"tiny": "compact:256:512", "fmnist": "compact:1024:1000"}


def vocab_spec(name: str) -> VocabSpec:
    """'official', an alias ('tiny', 'fmnist') or 'compact:<n_text>:<codebook_size>'."""
    name = VOCAB_ALIASES.get(name, name)
    if name == "official":
        return official_vocab()
    if name.startswith("compact:"):
        try:
            _, n_text, n_codes = name.split(":")
            return compact_vocab(int(n_text), int(n_codes))
        except ValueError as e:
            raise ValueError(f"bad compact vocabulary name {name!r}: {e}") from None
    raise ValueError(
        f"unknown vocabulary {name!r}; use 'official', 'compact:<n_text>:<codes>' "
        f"or one of {sorted(VOCAB_ALIASES)}"
    )


class Kind(IntEnum):
    TEXT = 0
    SPECIAL = 1
    CONTENT = 2


@dataclass(frozen=True)
class FrameSpan:
    """Frame block [start, end) in a sequence; content is [start + 3, end - 1)."""

    start: int
    end: int

    @property
    def content_start(self) -> int:
        return self.start + 3


@dataclass
class Sequence:
    """One token sequence and everything the model and the objective need to know about it."""

    tokens: Tensor  # [L] long
    kind: Tensor  # [L] uint8 (Kind)
    index: Tensor  # [L] long, absolute 1-D position
    pos3: Tensor  # [3, L] long, MM-RoPE axis positions (t, h, w)
    frame: Tensor  # [L] long, latent frame number inside a frame block (header..end), else -1
    is_code: Tensor  # [L] bool, visual-code slots (content minus new-lines)
    spans: list[FrameSpan]

    def __len__(self) -> int:
        return self.tokens.numel()

    def positions(self, rope: str) -> Tensor:
        """[3, L] positions for the model's RoPE kind: 1-D RoPE sees the absolute index."""
        if rope == "1d":
            return self.index.unsqueeze(0).expand(3, -1)
        return self.pos3

    def with_tokens(self, tokens: Tensor) -> Sequence:
        """The same layout with other token ids (e.g. MASK at some slots)."""
        return dataclasses.replace(self, tokens=tokens)

    def __add__(self, other: Sequence) -> Sequence:
        n = len(self)
        return Sequence(
            tokens=torch.cat([self.tokens, other.tokens]),
            kind=torch.cat([self.kind, other.kind]),
            index=torch.cat([self.index, other.index]),
            pos3=torch.cat([self.pos3, other.pos3], dim=1),
            frame=torch.cat([self.frame, other.frame]),
            is_code=torch.cat([self.is_code, other.is_code]),
            spans=self.spans + [FrameSpan(s.start + n, s.end + n) for s in other.spans],
        )


def _plain(tokens: list[int] | Tensor, kinds: Tensor, start: int) -> Sequence:
    t = torch.as_tensor(tokens, dtype=torch.long)
    idx = torch.arange(start, start + t.numel())
    return Sequence(
        tokens=t,
        kind=kinds,
        index=idx,
        pos3=idx.unsqueeze(0).repeat(3, 1),
        frame=torch.full_like(t, -1),
        is_code=torch.zeros_like(t, dtype=torch.bool),
        spans=[],
    )


def prompt_text(caption: str, width: int, height: int, n_frames: int, fps: int) -> str:
    """The released text template; F (`n_frames`) per the folder's rule (lumos.settings)."""
    return (
        f"Generate a video with a resolution of {width}x{height}, consisting of {n_frames} "
        f"frames at {fps} frames per second, according to the following prompt:\n {caption}"
    )


class Layout:
    """Token layout of videos on an h x w latent grid for one vocabulary and tokenizer."""

    def __init__(self, vocab: VocabSpec, h: int, w: int, scales: tuple[int, int, int]) -> None:
        if h < 1 or w < 1:
            raise ValueError(f"latent grid must be positive, got {h}x{w}")
        self.vocab, self.h, self.w = vocab, h, w
        self.scales = tuple(int(s) for s in scales)
        self.height_px, self.width_px = h * self.scales[1], w * self.scales[2]
        self.content_len = h * (w + 1)  # L_f: codes plus one new-line per row
        self.block_len = self.content_len + 4
        self.n_codes = h * w
        # offsets inside a block: content slot i -> (row, col)
        i = torch.arange(self.content_len)
        self._row, self._col = i // (w + 1), i % (w + 1)
        self._content_is_code = self._col < w  # [L_f]
        self.code_offsets = torch.nonzero(self._content_is_code).squeeze(1) + 3  # [h*w]

    # -- building blocks ------------------------------------------------------------------------
    def prefix(
        self, text_ids: list[int] | None, duration: int, fps: int, start: int = 0
    ) -> Sequence:
        """BOS, text, sep, video_start, dur, fps (text_ids=None: the unconditional prefix)."""
        v = self.vocab
        tail = [v.video_start, v.number(duration), v.number(fps)]
        if text_ids is None:
            return _plain(tail, torch.full((3,), Kind.SPECIAL, dtype=torch.uint8), start)
        text_ids = list(text_ids)
        if any(not 0 <= t < v.n_text for t in text_ids):
            raise ValueError(f"text ids must be in [0, {v.n_text})")
        toks = [v.bos, *text_ids, v.sep, *tail]
        kinds = torch.full((len(toks),), Kind.SPECIAL, dtype=torch.uint8)
        kinds[1 : 1 + len(text_ids)] = Kind.TEXT
        return _plain(toks, kinds, start)

    def frame_block(self, k: int, start: int, p0: int, codes: Tensor | None = None) -> Sequence:
        """Latent frame k at absolute index `start`; codes [h, w] (None: all MASK)."""
        v = self.vocab
        st, sh, sw = self.scales
        lf = self.content_len
        content = torch.full((self.h, self.w + 1), v.newline, dtype=torch.long)  # [h, w+1]
        if codes is None:
            content[:, : self.w] = v.mask
        else:
            if tuple(codes.shape) != (self.h, self.w):
                raise ValueError(
                    f"frame codes must be [{self.h}, {self.w}], got {tuple(codes.shape)}"
                )
            content[:, : self.w] = v.visual(codes)
        head = torch.tensor(
            [v.frame_start, v.number(self.height_px // 32), v.number(self.width_px // 32)]
        )
        tokens = torch.cat([head, content.reshape(-1), torch.tensor([v.frame_end])])  # [B_f]
        index = torch.arange(start, start + self.block_len)
        pos3 = index.unsqueeze(0).repeat(3, 1)  # [3, B_f]
        pos3[0, 3 : 3 + lf] = p0 + st * k
        pos3[1, 3 : 3 + lf] = p0 + sh * self._row
        pos3[2, 3 : 3 + lf] = p0 + sw * self._col
        kind = torch.full((self.block_len,), Kind.SPECIAL, dtype=torch.uint8)
        kind[3 : 3 + lf] = Kind.CONTENT
        is_code = torch.zeros(self.block_len, dtype=torch.bool)
        is_code[self.code_offsets] = True
        return Sequence(
            tokens=tokens,
            kind=kind,
            index=index,
            pos3=pos3,
            frame=torch.full((self.block_len,), k, dtype=torch.long),
            is_code=is_code,
            spans=[FrameSpan(0, self.block_len)],
        )

    def frames(self, codes: Tensor | None, n: int, k0: int, start: int, p0: int) -> Sequence:
        """n consecutive frame blocks (latent frames k0..k0+n-1), vectorised.

        codes: [n, h, w] or None (all MASK).
        """
        if n == 0:
            return _plain([], torch.zeros(0, dtype=torch.uint8), start)
        one = self.frame_block(0, 0, 0, None if codes is None else codes[0])
        bl = self.block_len
        tokens = one.tokens.repeat(n)  # [n*B_f]
        if codes is not None:
            if tuple(codes.shape) != (n, self.h, self.w):
                raise ValueError(
                    f"codes must be [{n}, {self.h}, {self.w}], got {tuple(codes.shape)}"
                )
            tokens.view(n, bl)[:, self.code_offsets] = self.vocab.visual(codes.reshape(n, -1))
        index = torch.arange(start, start + n * bl)
        pos3 = index.unsqueeze(0).repeat(3, 1).view(3, n, bl)  # [3, n, B_f]
        ks = torch.arange(k0, k0 + n)
        sl = slice(3, 3 + self.content_len)
        st, sh, sw = self.scales
        pos3[0, :, sl] = (p0 + st * ks).unsqueeze(1)
        pos3[1, :, sl] = p0 + sh * self._row
        pos3[2, :, sl] = p0 + sw * self._col
        return Sequence(
            tokens=tokens,
            kind=one.kind.repeat(n),
            index=index,
            pos3=pos3.reshape(3, -1),
            frame=ks.repeat_interleave(bl),
            is_code=one.is_code.repeat(n),
            spans=[FrameSpan(i * bl, (i + 1) * bl) for i in range(n)],
        )

    def closing(self, start: int) -> Sequence:
        v = self.vocab
        return _plain(
            [v.video_end, v.sep], torch.full((2,), Kind.SPECIAL, dtype=torch.uint8), start
        )

    # -- whole sequences --------------------------------------------------------------------------
    def video(
        self,
        text_ids: list[int] | None,
        codes: Tensor | None,
        duration: int,
        fps: int,
        n_frames: int | None = None,
        close: bool = False,
    ) -> Sequence:
        """Prefix + frames (codes [t, h, w], or n_frames MASK frames) [+ video_end, sep].

        text_ids=None gives the unconditional sequence (starts at video_start, positions from 0).
        """
        pre = self.prefix(text_ids, duration, fps)
        n = codes.shape[0] if codes is not None else int(n_frames or 0)
        seq = pre + self.frames(codes, n, 0, len(pre), self.p0(len(pre)))
        if close:
            seq = seq + self.closing(len(seq))
        return seq

    @staticmethod
    def p0(prefix_len: int) -> int:
        """Absolute index of the first content token of the first frame after a prefix."""
        return prefix_len + 3


def pad_batch(seqs: list[Sequence], rope: str, pad_id: int) -> dict[str, Tensor]:
    """Right-pad sequences into a batch: tokens [B, L], positions [B, 3, L], frame [B, L], valid."""
    n = max(len(s) for s in seqs)
    b = len(seqs)
    tokens = torch.full((b, n), pad_id, dtype=torch.long)
    positions = torch.zeros((b, 3, n), dtype=torch.long)
    frame = torch.full((b, n), -1, dtype=torch.long)
    valid = torch.zeros((b, n), dtype=torch.bool)
    for i, s in enumerate(seqs):
        m = len(s)
        tokens[i, :m] = s.tokens
        positions[i, :, :m] = s.positions(rope)
        frame[i, :m] = s.frame
        valid[i, :m] = True
    return {"tokens": tokens, "positions": positions, "frame": frame, "valid": valid}
