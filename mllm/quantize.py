"""Opt-in int8 weight-only inference: the Linear layers of the backbone and the depth head keep their weights as
int8 (symmetric, one scale per output channel: ``max |row| / 127``) and their activations in the model's dtype, through
torch's ``_weight_int8pack_mm`` (CPU and CUDA). It quarters the weight bytes a decode step streams; whether that is
faster depends on the kernel and the CPU (``benchmarks/bench_mllm_generation.py`` prints the speed beside float32's
and how many greedy codes still equal float32's). The code embedder, the embeddings and the LM head stay as they are.
"""
from __future__ import annotations

import torch
from torch import nn


class Int8WeightLinear(nn.Module):
    """``nn.Linear`` with an int8 weight ``[out, in]`` and float scales ``[out]``; same call, same output shape."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("weight", (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scales.to(x.dtype))
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantize_weights_int8(model) -> int:
    """Replace the Linear layers of ``model``'s backbone layers and depth-head layers, and the depth head's output,
    with :class:`Int8WeightLinear`, in place (inference only). Returns how many were replaced."""
    replaced = 0
    for layer in [*model.model.layers, *model.depth_head.layers]:
        for block in (layer.self_attn, layer.mlp):
            for name, child in list(block.named_children()):
                if type(child) is nn.Linear:
                    setattr(block, name, Int8WeightLinear(child))
                    replaced += 1
    model.depth_head.linear_head = Int8WeightLinear(model.depth_head.linear_head)
    return replaced + 1


__all__ = ["Int8WeightLinear", "quantize_weights_int8"]
