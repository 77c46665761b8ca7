"""Fixed-shape single-token steps through Llama layer stacks, for image generation's two inner loops.

One :class:`LayerStack` serves both loops: the **backbone**, fed one image position per step (per-row RoPE
positions: left-padded prompts), and the **depth head**, fed the K sub-code slots of one position. Its KV buffers
(:class:`StaticKV`) are preallocated, the column written next is a tensor advanced in place, and nothing is read back
to the host, so every step has the same shapes and ``torch.compile`` traces it once (and CUDA graphs can replay it,
``mode="reduce-overhead"``). q/k/v and gate/up projections run as one matmul each where that is bit-identical to
the separate ones (checked on the rows of the rollout when the stack is built).

:class:`StaticImageDecoder` holds, for one batch shape, the backbone stack, the depth decoder and the code
embedder's projection buffers (:class:`tokenizer.projection.StaticProjectionCache`); it is built once per model and
shape and reused (LlamaGen's / gpt-fast's ``setup_caches``), so that a compiled step is compiled once. Each rollout
refreshes the fused weights from the model (they may have been trained since) and copies in the prompt's KV cache.
A greedy rollout equals the dynamic-cache loop of :mod:`mllm.generation` (``tests/test_decoding.py``).
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.projection import StaticProjectionCache

from . import hf_compat as hf
from .hf_compat import apply_rotary_pos_emb


@dataclass
class StaticKV:
    """Per layer ``[R, kv_heads, L, head_dim]`` keys and values (zeros where unwritten: masked, but finite),
    ``visible`` ``[R, L]`` (False at prompt padding) and ``length``, the next column to write (0-d, in place)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    visible: torch.Tensor
    length: torch.Tensor


def _fused(x: torch.Tensor, linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One weight (and bias) for ``linears`` applied together, if that gives bit-identical outputs on ``x``."""
    if any(type(lin) is not nn.Linear for lin in linears) or len({lin.bias is None for lin in linears}) != 1:
        return None  # (int8 weights: see mllm.quantize)
    weight = torch.cat([lin.weight for lin in linears])
    bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
    together = F.linear(x, weight, bias).split([lin.out_features for lin in linears], dim=-1)
    same = all(torch.equal(a, lin(x)) for a, lin in zip(together, linears))
    return (weight, bias) if same else None


class LayerStack:
    """Single-token steps through ``layers`` (transformers ``LlamaDecoderLayer``), then ``norm``."""

    def __init__(self, layers: nn.ModuleList, norm: nn.Module, rotary_emb: nn.Module, rows: int, fuse: bool = True):
        self.layers, self.norm, self.rotary_emb, self.rows = layers, norm, rotary_emb, rows
        # fused weights are copies: worth building once per decoder (and refreshing in place), not per call;
        # whether fusing is exact depends on the kernels, not on the weights' values, so it is checked here once
        self.qkv: list = [None] * len(layers)
        self.gate_up: list = [None] * len(layers)
        if fuse:
            p = next(layers.parameters())
            x = torch.randn(rows, 1, p.shape[-1], generator=torch.Generator().manual_seed(0)).to(p)
            with torch.no_grad():
                self.qkv = [_fused(x, self._qkv_of(l)) for l in layers]
                self.gate_up = [_fused(x, self._gate_up_of(l)) for l in layers]

    @staticmethod
    def _qkv_of(layer) -> list[nn.Linear]:
        return [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]

    @staticmethod
    def _gate_up_of(layer) -> list[nn.Linear]:
        return [layer.mlp.gate_proj, layer.mlp.up_proj]

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the layers' current weights into the fused projections, in place, so that a compiled step keeps
        reading the same tensors (the weights may have been trained since the stack was built)."""
        for fused, linears in zip(self.qkv + self.gate_up, [self._qkv_of(l) for l in self.layers]
                                  + [self._gate_up_of(l) for l in self.layers]):
            if fused is not None:
                torch.cat([lin.weight for lin in linears], out=fused[0])
                if fused[1] is not None:
                    torch.cat([lin.bias for lin in linears], out=fused[1])

    def new_kv(self, length: int, like: torch.Tensor) -> StaticKV:
        attn = self.layers[0].self_attn
        shape = (self.rows, attn.k_proj.out_features // attn.head_dim, length, attn.head_dim)
        n = len(self.layers)
        return StaticKV([like.new_zeros(shape) for _ in range(n)], [like.new_zeros(shape) for _ in range(n)],
                        torch.ones(self.rows, length, dtype=torch.bool, device=like.device),
                        torch.zeros((), dtype=torch.long, device=like.device))

    def step(self, x: torch.Tensor, positions: torch.Tensor, kv: StaticKV) -> torch.Tensor:
        """``x`` [R, hidden] at column ``kv.length`` with RoPE positions ``positions`` [R] -> normed [R, hidden];
        advances ``kv.length``."""
        R, column = x.shape[0], kv.length.view(1)
        cos, sin = self.rotary_emb(x, position_ids=positions[:, None])
        columns = torch.arange(kv.visible.shape[1], device=x.device)
        mask = (kv.visible & (columns <= kv.length))[:, None, None, :]
        x = x[:, None]
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            h = layer.input_layernorm(x)
            if self.qkv[i] is not None:
                q, k, v = F.linear(h, *self.qkv[i]).split(
                    [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features], dim=-1)
            else:
                q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
            q, k, v = (t.view(R, 1, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kv.keys[i].index_copy_(2, column, k)
            kv.values[i].index_copy_(2, column, v)
            o = F.scaled_dot_product_attention(q, kv.keys[i], kv.values[i], attn_mask=mask, scale=attn.scaling,
                                               enable_gqa=True)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(R, 1, -1))
            h = layer.post_attention_layernorm(x)
            if self.gate_up[i] is not None:
                gate, up = F.linear(h, *self.gate_up[i]).chunk(2, dim=-1)
            else:
                gate, up = mlp.gate_proj(h), mlp.up_proj(h)
            x = x + mlp.down_proj(mlp.act_fn(gate) * up)
        kv.length.add_(1)
        return self.norm(x)[:, 0]


class DepthDecoder(LayerStack):
    """The depth head's K single-token steps (slot k at RoPE position k). ``tests/test_mllm.py`` checks it against
    :meth:`mllm.modeling.DepthHead.forward` (the transformers layers, teacher-forced)."""

    def __init__(self, head, rows: int, fuse: bool = True):
        super().__init__(head.layers, head.norm, head.rotary_emb, rows, fuse)
        self.head = head

    def new_cache(self, like: torch.Tensor) -> StaticKV:
        return self.new_kv(self.head.config.num_codebooks, like)

    def step(self, x: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        return super().step(x, cache.length.expand(x.shape[0]), cache)


class StaticImageDecoder:
    """Preallocated buffers and steps for image rollouts of ``rows`` rows, prompts up to ``prompt_capacity`` columns
    and ``positions`` image positions (see the module docstring). Get one with :meth:`for_model`."""

    def __init__(self, model, rows: int, prompt_capacity: int, positions: int, compile: bool = False,
                 compile_mode: str | None = None):
        # the parts it runs, not the model: the decoders of a model are kept in a weak mapping keyed by it
        self.code_embedder, self.dtype = model.code_embedder, model.dtype
        self.rows, self.prompt_capacity, self.positions = rows, prompt_capacity, positions
        like = next(model.model.parameters())
        self.backbone = LayerStack(model.model.layers, model.model.norm, model.model.rotary_emb, rows)
        self.kv = self.backbone.new_kv(prompt_capacity + positions - 1, like)
        self.rope_positions = torch.zeros(rows, dtype=torch.long, device=like.device)
        proj = model.code_embedder.attn_projection.attn
        self.projection = StaticProjectionCache.empty(rows, proj.num_heads, positions, proj.head_dim,
                                                      next(model.code_embedder.mm_projector.parameters()))
        self.depth = DepthDecoder(model.depth_head, rows)
        self.depth_cache = self.depth.new_cache(like)
        self._advance = self._advance_eager
        self._depth_step = self.depth.step
        if compile:
            # fixed addresses: CUDA graphs (mode="reduce-overhead") replay steps that write into these in place
            for t in self._buffers():
                torch._dynamo.mark_static_address(t)
            self._advance = torch.compile(self._advance_eager, dynamic=False, mode=compile_mode)
            self._depth_step = torch.compile(self.depth.step, dynamic=False, mode=compile_mode)

    def _buffers(self) -> list[torch.Tensor]:
        fused = [t for pair in self.backbone.qkv + self.backbone.gate_up + self.depth.qkv + self.depth.gate_up
                 if pair is not None for t in pair if t is not None]
        caches = [self.kv, self.depth_cache]
        return [*fused, *(t for c in caches for t in (*c.keys, *c.values, c.visible, c.length)),
                self.rope_positions, self.projection.k, self.projection.v, self.projection.position]

    _built: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    KEEP = 2  # decoders kept per model (the most recently used shapes): their KV buffers stay allocated

    @classmethod
    def for_model(cls, model, rows: int, prompt_length: int, positions: int, compile: bool = False,
                  compile_mode: str | None = None) -> "StaticImageDecoder":
        """The decoder of this model, shape and thread, built on first use and kept while it is among the ``KEEP``
        most recently used. Prompt lengths are rounded up to a multiple of 64 so that a compiled step serves every
        prompt of a bucket (the extra columns are masked)."""
        capacity = -(-prompt_length // 64) * 64
        # per thread: two threads generating with one model must not share buffers
        key = (rows, capacity, positions, compile, compile_mode, model.dtype, threading.get_ident())
        per_model = cls._built.setdefault(model, {})
        decoder = per_model.pop(key, None) or cls(model, rows, capacity, positions, compile, compile_mode)
        per_model[key] = decoder  # (re)inserted last: dicts keep insertion order
        for stale in list(per_model)[:-cls.KEEP]:
            del per_model[stale]
        return decoder

    @torch.no_grad()
    def start(self, prompt_cache, prompt_mask: torch.Tensor, next_position: torch.Tensor) -> None:
        """Take over a prefilled prompt: its KV cache ``[R, heads, P, head_dim]`` per layer, its mask ``[R, P]``
        and each row's next RoPE position."""
        self.backbone.refresh()
        self.depth.refresh()
        P = prompt_mask.shape[1]
        for i, (keys, values) in enumerate(hf.cache_tensors(prompt_cache)):
            self.kv.keys[i][:, :, :P] = keys
            self.kv.values[i][:, :, :P] = values
        self.kv.visible[:, :self.prompt_capacity] = False
        self.kv.visible[:, :P] = prompt_mask.bool()
        self.kv.visible[:, self.prompt_capacity:] = True
        # the image positions are written from column ``prompt_capacity`` on; the columns P..capacity stay masked
        self.kv.length.fill_(self.prompt_capacity)
        self.rope_positions.copy_(next_position)
        self.projection.position.zero_()

    def depth_cache_reset(self) -> StaticKV:
        self.depth_cache.length.zero_()
        return self.depth_cache

    def depth_step(self, x: torch.Tensor, cache: StaticKV) -> torch.Tensor:
        return self._depth_step(x, cache)

    def advance(self, codes: torch.Tensor) -> torch.Tensor:
        """Feed one image position (codes ``[R, K]``, drawn in range: not checked again) -> the backbone's normed
        state before the next position ``[R, hidden]``."""
        return self._advance(codes)

    def _advance_eager(self, codes: torch.Tensor) -> torch.Tensor:
        embeds = self.code_embedder(codes[:, :, None], cache=self.projection, check=False)[:, 0]
        hidden = self.backbone.step(embeds.to(self.dtype), self.rope_positions, self.kv)
        self.rope_positions.add_(1)
        return hidden


__all__ = ["LayerStack", "DepthDecoder", "StaticKV", "StaticImageDecoder"]
