"""Guidance distillation: a model whose conditional row alone samples what CFG samples.

Classifier-free guidance runs two rows per diffusion step, the prompt's and the unconditional
one, and samples from softmax(u + s (c - u)) (`lumos.sampler.combine_cfg`). On a CPU a one-row
forward costs a little over half of a two-row one, so a model that needs no unconditional row
makes a frame up to ~1.8x faster (docs/LONG_VIDEO.md, "Real time").

`lumos train --distill-cfg S --init-from TEACHER` trains such a model. The teacher is the
`--init-from` model, frozen. For every masked code of a training sample it gives the guided
distribution of its conditional logits c (the sample) and unconditional logits u. The u come
from the sample's twin: the same video and masks without the text (`make_sample(twin=True)`).
The student starts from the same weights and learns KL(guided || student) on the conditional
input alone, through the same chunked loss over the visual rows as AR-DF
(`lumos.diffusion.masked_visual_loss(soft=...)`). Text-dropped samples (their twin is
themselves) keep the student a good unconditional model. The export of such a run writes CFG 1,
so the pipeline runs one row a step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lumos.diffusion import masked_hidden
from lumos.sampler import combine_cfg


@torch.no_grad()
def guided_targets(teacher, batch: dict[str, Tensor], scale: float, chunk: int = 4096) -> Tensor:
    """[N, V] float: the teacher's CFG distribution softmax(u + scale (c - u)) at each masked
    code of a collated batch with twins (N = the batch's masked codes, row-major order)."""
    if "uncond_inputs" not in batch:
        raise ValueError("guidance distillation needs each sample's unconditional twin")
    hc = masked_hidden(teacher, batch)[batch["loss_mask"]]  # [N, D]
    hu = masked_hidden(teacher, batch, prefix="uncond_")[batch["uncond_loss_mask"]]  # [N, D]
    if hc.shape[0] != hu.shape[0]:
        raise ValueError(f"{hc.shape[0]} masked codes but {hu.shape[0]} in the twins")
    w = teacher.lm_head.weight[teacher.visual_rows()]  # [V, D]
    out = []
    for i in range(0, hc.shape[0], chunk):
        pair = torch.stack([hc[i : i + chunk], hu[i : i + chunk]]) @ w.t()  # [2, n, V]
        out.append(combine_cfg(pair.float(), 1, scale, True)[0].softmax(-1))  # [n, V]
    return torch.cat(out) if out else hc.new_zeros(0, w.shape[0], dtype=torch.float32)


def frozen_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """The teacher as the loop uses it: eval mode, no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
