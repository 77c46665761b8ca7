"""Attention-factorised projection (UniTok ``AttnProjection``), used before and after quantisation and, causal,
as the MLLM's code embedder.

    y   = Linear(LN3(x)) + Attn(LN1(x))
    out = y + GeGLU(LN2(y))

The attention works at width ``W = max(in_dim, out_dim)`` with ``num_heads`` heads. Going down (W = in_dim) the
head outputs are *averaged* (then pooled to out_dim if head_dim != out_dim); going up they are concatenated.
The key has no bias (``zero_k_bias`` is a stored zero buffer, kept so official checkpoints load strictly).

The release uses ``num_heads = encoder_width // latent_width`` (16), not one head per codebook: the LLaVA wrapper
of the reference builds 8 heads and gets different codes from the same weights.

``causal`` attention was used by the February-2025 tokenizer checkpoint and by the MLLM's code embedder; the
April-2025 tokenizer uses full attention. The keys are identical, so it is a config field, not a weight property.
For causal use, ``forward`` accepts a :class:`ProjectionCache` (growing) or a :class:`StaticProjectionCache`
(preallocated, compilable) so that positions fed one at a time (image generation) are embedded exactly as when the
whole sequence is fed at once (training).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import GeGluMlp


@dataclass
class ProjectionCache:
    """Keys and values of the positions seen so far, ``[B, heads, T, head_dim]`` each."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep/reorder batch rows (e.g. when a server drops finished requests)."""
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


@dataclass
class StaticProjectionCache:
    """Preallocated keys and values ``[B, heads, N, head_dim]`` for positions fed one at a time, and ``position``,
    the next one (0-d, advanced in place): fixed shapes and no host reads, so a compiled generation step traces once.
    Unwritten slots are zeros (masked, but finite)."""

    k: torch.Tensor
    v: torch.Tensor
    position: torch.Tensor

    @classmethod
    def empty(cls, rows: int, heads: int, positions: int, head_dim: int, like: torch.Tensor) -> "StaticProjectionCache":
        shape = (rows, heads, positions, head_dim)
        return cls(like.new_zeros(shape), like.new_zeros(shape), torch.zeros((), dtype=torch.long, device=like.device))

    @property
    def length(self) -> torch.Tensor:
        return self.position


class PlainAttention(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_heads: int, causal: bool = False):
        super().__init__()
        width = max(in_dim, out_dim)
        if width % num_heads:
            raise ValueError(f"attention width {width} is not divisible by {num_heads} heads")
        self.in_dim, self.out_dim, self.num_heads, self.causal = in_dim, out_dim, num_heads, causal
        self.head_dim = width // num_heads
        self.qkv = nn.Linear(in_dim, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor, cache: ProjectionCache | StaticProjectionCache | None = None) -> torch.Tensor:
        B, N, _ = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        past = 0
        if isinstance(cache, StaticProjectionCache):
            if not self.causal or N != 1:
                raise ValueError("a static projection cache takes one position at a time, causal attention only")
            cache.k.index_copy_(2, cache.position.view(1), k)
            cache.v.index_copy_(2, cache.position.view(1), v)
            seen = (torch.arange(cache.k.shape[2], device=x.device) <= cache.position)[None]
            x = F.scaled_dot_product_attention(q, cache.k, cache.v, attn_mask=seen)
            cache.position.add_(1)
            return self._merge_heads(x, B, N)
        if cache is not None:
            if not self.causal:
                raise ValueError("a projection cache only makes sense for causal attention")
            past = cache.length
            if past:
                k, v = torch.cat((cache.k, k), 2), torch.cat((cache.v, v), 2)
            cache.k, cache.v = k, v
        if self.causal and past and N > 1:
            # new queries sit at absolute positions past..past+N-1
            mask = torch.ones(N, past + N, dtype=torch.bool, device=x.device).tril(past)
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            x = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and past == 0 and N > 1)
        return self._merge_heads(x, B, N)

    def _merge_heads(self, x: torch.Tensor, B: int, N: int) -> torch.Tensor:
        if self.in_dim > self.out_dim:
            x = x.mean(dim=1)
            if self.head_dim != self.out_dim:
                x = F.adaptive_avg_pool1d(x, self.out_dim)
        else:
            x = x.transpose(1, 2).reshape(B, N, -1)
        return self.proj(x)


class AttnProjection(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_heads: int, causal: bool = False, mlp_ratio: float = 2.0):
        super().__init__()
        if in_dim % out_dim and out_dim % in_dim:
            raise ValueError(f"AttnProjection needs one width to divide the other, got {in_dim} -> {out_dim}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm1 = nn.LayerNorm(in_dim)
        self.attn = PlainAttention(in_dim, out_dim, num_heads, causal)
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm3 = nn.LayerNorm(in_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = GeGluMlp(out_dim, int(out_dim * mlp_ratio))

    @property
    def causal(self) -> bool:
        return self.attn.causal

    def forward(self, x: torch.Tensor, cache: ProjectionCache | StaticProjectionCache | None = None) -> torch.Tensor:
        x = self.proj(self.norm3(x)) + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))
