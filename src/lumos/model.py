"""The Lumos transformer: (tokens, positions, mask, kv cache) -> logits. Nothing else.

A Chameleon/Llama-style decoder (method.md section 6): token embedding -> N x [RMSNorm ->
attention (q/k LayerNorm over head_dim with a per-head weight and bias, then RoPE) -> residual ->
RMSNorm -> SwiGLU -> residual] -> RMSNorm -> untied lm_head. No biases in linear layers, GQA.
Module names follow the HF Chameleon keys (minus the "model." prefix) so official checkpoints
load by name.

The q/k norm parameters are stored per head ([heads, head_dim]) as in HF checkpoints: Chameleon
applies one LayerNorm over head_dim, and checkpoints trained with HF code hold a row per head.
"""

from __future__ import annotations

from types import FunctionType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lumos.config import ModelConfig
from lumos.kvcache import KVCache
from lumos.rope import Rotary, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one fused kernel (a frame step is mostly small ops)
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class HeadNorm(nn.Module):
    """LayerNorm over head_dim (statistics per head) with a [heads, head_dim] weight and bias."""

    def __init__(self, heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: Tensor) -> Tensor:  # x [B, L, H, d]
        x = F.layer_norm(x, x.shape[-1:], None, None, self.eps)
        return x * self.weight + self.bias


def _qk_norm(q: Tensor, k: Tensor, qn: HeadNorm, kn: HeadNorm) -> Tensor:
    """q [B, L, H, d], k [B, L, Hkv, d] -> both normed, as one tensor [B, L, H + Hkv, d].

    The same as qn(q) and kn(k) in half the kernels (a frame step's tensors are small, so its
    cost is mostly per-kernel overhead): one LayerNorm over head_dim for every head (both norms
    take the config's `qk_norm_eps`)."""
    x = F.layer_norm(torch.cat([q, k], dim=2), q.shape[-1:], None, None, qn.eps)
    return x * torch.cat([qn.weight, kn.weight]) + torch.cat([qn.bias, kn.bias])


def _attention(q: Tensor, k: Tensor, v: Tensor, mask) -> Tensor:
    """q [B, H, L, d], k/v [B, Hkv, T, d]; mask: None, bool [B, 1, L|1, T] or a BlockMask."""
    if mask is not None and not isinstance(mask, Tensor):
        from torch.nn.attention.flex_attention import flex_attention

        fn = flex_attention
        if q.is_cuda:
            fn = _compiled_flex()
        return fn(q, k, v, block_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]
    )


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.h, self.hkv, self.d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(cfg.dim, self.hkv * self.d, bias=False)
        self.v_proj = nn.Linear(cfg.dim, self.hkv * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, cfg.dim, bias=False)
        self.q_norm = HeadNorm(self.h, self.d, cfg.qk_norm_eps)
        self.k_norm = HeadNorm(self.hkv, self.d, cfg.qk_norm_eps)

    def project(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Normed input h [B, L, D] -> q [B, H, L, d], k and v [B, Hkv, L, d] (q, k normed and
        rotated)."""
        b, n, _ = h.shape
        q = self.q_proj(h).view(b, n, self.h, self.d)
        k = self.k_proj(h).view(b, n, self.hkv, self.d)
        # q and k normed and rotated as one tensor [B, H + Hkv, L, d]
        qk = apply_rotary(_qk_norm(q, k, self.q_norm, self.k_norm).transpose(1, 2), cos, sin)
        v = self.v_proj(h).view(b, n, self.hkv, self.d).transpose(1, 2)  # [B, Hkv, L, d]
        return qk[:, : self.h], qk[:, self.h :], v

    def output(self, y: Tensor) -> Tensor:
        """Attention output y [B, H, L, d] -> [B, L, D]."""
        b, _, n, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, n, self.h * self.d))


def attend(q: Tensor, k: Tensor, v: Tensor, mask, cache: KVCache | None, layer: int) -> Tensor:
    """One layer's attention: the block's k/v written into the cache (when given), then q
    [B, H, L, d] against every key -> [B, H, L, d]."""
    if cache is not None:
        k, v = cache.update(layer, k, v)  # [B, Hkv, T, d]
    return _attention(q, k, v, mask)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def pre(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The part before attention: residual stream x [B, L, D] -> q, k, v."""
        return self.self_attn.project(self.input_layernorm(x), cos, sin)

    def post(self, x: Tensor, y: Tensor) -> Tensor:
        """The part after attention: x [B, L, D] and attention output y [B, H, L, d] -> x."""
        x = x + self.self_attn.output(y)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, cos, sin, mask, cache, layer) -> Tensor:
        q, k, v = self.pre(x, cos, sin)
        return self.post(x, attend(q, k, v, mask, cache, layer))


class Lumos(nn.Module):
    """The decoder. `forward` maps tokens [B, L] and positions [B, 3, L] to logits or hidden."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg.rope, cfg.head_dim, cfg.rope_theta)
        self.checkpointing = False  # activation checkpointing per layer (set by the trainer)
        self.compiled: CompiledLayers | None = None  # compiled frame steps (`compile_steps`)

    def forward(
        self,
        tokens: Tensor,
        positions: Tensor,
        mask=None,
        kv_cache: KVCache | None = None,
        *,
        output: str = "logits",
    ) -> Tensor:
        """tokens [B, L], positions [B, 3, L]; mask: None (full attention over cache + block),
        a bool [B, 1, L|1, T] (True = attend) or a FlexAttention BlockMask.

        output="logits" -> [B, L, V]; output="hidden" -> final-normed hidden states [B, L, D].
        With a kv_cache, the new keys/values are written at each row's length (not committed).
        """
        x = self.embed_tokens(tokens)  # [B, L, D]
        cos, sin = self.rotary(positions)  # [B, L, d]
        fast = self.compiled
        if fast is not None and kv_cache is not None and not self.training and fast.serves(x):
            h = fast.run(x, cos, sin, mask, kv_cache)  # [B, L, D], final-normed
            return h if output == "hidden" else self.lm_head(h)
        for i, layer in enumerate(self.layers):
            if self.checkpointing and self.training and kv_cache is None:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, cos, sin, mask, None, i, use_reentrant=False
                )
            else:
                x = layer(x, cos, sin, mask, kv_cache, i)
        h = self.norm(x)
        return h if output == "hidden" else self.lm_head(h)

    def project(self, hidden: Tensor, rows: slice | None = None) -> Tensor:
        """hidden [..., D] -> logits over lm_head rows (e.g. the visual sub-vocabulary)."""
        w = self.lm_head.weight if rows is None else self.lm_head.weight[rows]
        return hidden @ w.t()

    def visual_rows(self) -> slice:
        v = self.cfg.vocab_spec
        return slice(v.visual_offset, v.visual_offset + v.codebook_size)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) linears/embedding, output projections scaled by depth; norms at 1/0."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                s = std
                if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                    s = std / (2 * self.cfg.n_layers) ** 0.5
                p.normal_(0.0, s, generator=generator)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute the non-persistent RoPE tables (after building on the meta device)."""
        dev = self.embed_tokens.weight.device
        self.rotary = Rotary(self.cfg.rope, self.cfg.head_dim, self.cfg.rope_theta).to(dev)


def _segment(model: Lumos, i: int):
    """The computation between two attentions: layer i-1's post-attention part (none for i = 0),
    then layer i's pre-attention part, or for i = n_layers the final norm.
    (x, y, cos, sin) -> (x, q, k, v), or the final-normed hidden state; y is the attention
    output as [B, L, H, d], contiguous (one memory layout, so one graph)."""
    prev = model.layers[i - 1] if i > 0 else None
    nxt = model.layers[i] if i < len(model.layers) else None

    def segment(x: Tensor, y: Tensor | None, cos: Tensor, sin: Tensor):
        if prev is not None:
            x = prev.post(x, y.transpose(1, 2))
        if nxt is None:
            return model.norm(x)
        return (x, *nxt.pre(x, cos, sin))

    # a code object of its own: dynamo keeps its graphs per code object and tries them in turn
    # on every call, so a shared one would check every segment's guards (~70 us a call)
    code = segment.__code__.replace(co_name=f"segment_{i}")
    return FunctionType(code, segment.__globals__, code.co_name, None, segment.__closure__)


class CompiledLayers:
    """A model's frame steps through `torch.compile`d code (inductor, weights frozen as
    constants, max-autotune GEMMs): the n_layers + 1 computations between attentions, each one
    compiled graph, for blocks of `length` tokens against a KV cache (the diffusion steps and
    the commit of a frame). Attention and the cache writes stay eager, so one graph serves every
    context length; a batch of one row has its own graph, every larger batch shares one.

    Measured on a 2-core Sapphire Rapids (AMX) in bfloat16, bundled model, 1,200 cached keys:
    the 8 layers 12.1 -> 7.8 ms for a CFG pair, 10.3 -> 7.0 ms for one row on one thread (see
    docs/LOG.md). `warm` compiles (~30-60 s cold on 2 cores; inductor's on-disk cache makes a
    restart faster); until a batch size is warm, `Lumos.forward` runs it eagerly. The weights
    are baked into the graphs: changing them afterwards needs a new CompiledLayers.
    """

    def __init__(self, model: Lumos, length: int, mode: str = "max-autotune-no-cudagraphs"):
        import torch._inductor.config

        torch._inductor.config.freezing = True  # weights as constants (no-grad graphs only)
        self.model, self.length = model, int(length)
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self._fns = [
            torch.compile(_segment(model, i), dynamic=None, mode=mode)
            for i in range(len(model.layers) + 1)
        ]
        self._warm: set[bool] = set()  # batch classes compiled: False (one row), True (more)

    def serves(self, x: Tensor) -> bool:
        """Whether this block x [B, L, D] runs compiled (a warm batch class, the compiled
        length and dtype, no autograd)."""
        return (
            (x.shape[0] > 1) in self._warm
            and x.shape[1] == self.length
            and x.dtype == self.dtype
            and not torch.is_grad_enabled()
        )

    def run(self, x: Tensor, cos: Tensor, sin: Tensor, mask, cache: KVCache) -> Tensor:
        """The layers of `Lumos.forward` over x [B, L, D] -> final-normed hidden [B, L, D]."""
        y = None
        for i, fn in enumerate(self._fns[:-1]):
            x, q, k, v = fn(x, y, cos, sin)
            y = attend(q, k, v, mask, cache, i).transpose(1, 2).contiguous()  # [B, L, H, d]
        return self._fns[-1](x, y, cos, sin)

    @torch.inference_mode()
    def warm(self, batches: tuple[int, ...] = (1, 2)) -> None:
        """Compile the graphs for these batch sizes (blocking), then let `forward` use them."""
        import torch._dynamo

        cfg = self.model.cfg
        for b in batches:
            x = torch.zeros(b, self.length, cfg.dim, dtype=self.dtype, device=self.device)
            y = torch.zeros(b, self.length, cfg.n_heads, cfg.head_dim, dtype=self.dtype)
            y = y.to(self.device)  # the attention output, [B, L, H, d]
            pos = torch.zeros(b, 3, self.length, dtype=torch.long, device=self.device)
            cos, sin = self.model.rotary(pos)  # [B, L, d]
            if b > 1:  # one graph for every batch of two rows or more
                for t in (x, y, cos, sin):
                    torch._dynamo.mark_dynamic(t, 0)
            out = self._fns[0](x, None, cos, sin)
            for fn in self._fns[1:]:
                out = fn(out[0], y, cos, sin)
            self._warm.add(b > 1)


def compile_steps(model: Lumos, length: int, batches: tuple[int, ...] = (1, 2)) -> None:
    """Compile `model`'s frame steps for blocks of `length` tokens (`CompiledLayers`) and warm
    them for these batch sizes; blocks until compiled. Run it in a thread to serve meanwhile:
    forwards stay eager until a batch size is warm."""
    fast = CompiledLayers(model, length)
    model.compiled = fast
    fast.warm(batches)


def build_model(
    cfg: ModelConfig,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    init: bool = True,
    seed: int | None = 0,
) -> Lumos:
    """Build on the meta device, then materialise on `device` and init (or leave for loading)."""
    with torch.device("meta"):
        model = Lumos(cfg)
    model = model.to_empty(device=device)
    if init:
        g = None
        if seed is not None:
            g = torch.Generator(device=device).manual_seed(seed)
        model.init_weights(generator=g)
    else:
        model.reset_buffers()
    return model.to(dtype)
