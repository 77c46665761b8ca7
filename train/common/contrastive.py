"""CLIP contrastive loss with open_clip ``ClipLoss(local_loss=True, gather_with_grad=True)`` semantics."""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along dim 0; gradients flow back to every rank's slice.

    ``torch.distributed.nn.functional.all_gather`` is the autograd-aware collective (its backward is a reduce-scatter),
    which is what open_clip uses for ``gather_with_grad=True``. Every rank must pass the same shape.
    """
    rank, world = _dist_info()
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # torch 2.13 flags this public API as deprecated in favour of private _functional_collectives names; it is
        # what open_clip uses and still the only public autograd-aware gather.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x), dim=0)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy between local features and the features gathered from all ranks.

    ``logit_scale`` is already exponentiated. With ``local_loss`` each rank scores only its own rows against all
    columns, and its positives sit at ``arange(B) + B * rank``. Features are expected L2-normalised.
    """
    rank, world = _dist_info()
    all_image = gather_with_grad(image_features)
    all_text = gather_with_grad(text_features)
    logits_per_image = logit_scale * image_features @ all_text.T
    logits_per_text = logit_scale * text_features @ all_image.T
    labels = torch.arange(image_features.shape[0], device=image_features.device) + image_features.shape[0] * rank
    return 0.5 * (F.cross_entropy(logits_per_image.float(), labels) + F.cross_entropy(logits_per_text.float(), labels))
