"""Optimizer construction: AdamW with weight decay only where it regularises (matrices / conv kernels)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

# Substrings of parameter names that never get weight decay (UniTok's utils/optimizer.py list). Together with the
# ndim < 2 rule this exempts biases, norm gains, the CLIP logit scale and other scalars.
DEFAULT_NO_DECAY = ("norm_scale", "bn", "ln", "bias", "logit_scale")


def param_groups(model: nn.Module, weight_decay: float,
                 no_decay_keywords: Iterable[str] = DEFAULT_NO_DECAY) -> list[dict]:
    """Two AdamW groups over the trainable parameters: ``[decay, no_decay]`` (empty groups are dropped).

    Each group carries the parameter names (``"names"``) so logs and tests can check where a parameter went; torch's
    optimizers keep unknown group keys and save them in ``state_dict``.
    """
    keywords = tuple(no_decay_keywords)
    decay, no_decay = ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        target = no_decay if p.ndim < 2 or any(k in name for k in keywords) else decay
        target[0].append(name)
        target[1].append(p)
    groups = [{"params": decay[1], "names": decay[0], "weight_decay": weight_decay},
              {"params": no_decay[1], "names": no_decay[0], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                eps: float = 1e-8, no_decay_keywords: Iterable[str] = DEFAULT_NO_DECAY,
                fused: bool | None = None) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, no_decay_keywords)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    # fused AdamW exists for CUDA tensors only; foreach (the default) is the fast path on CPU.
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)
