"""Every transformers internal the project relies on, in one file: the next upstream rename is a change here only.

Tested with transformers 5.23.0 and 5.24.0 (the range in setup.py). Each entry says what it depends on:

==============================  ====================================================================================
what                            depends on
==============================  ====================================================================================
``CACHE``, ``cache_kwarg``,     the KV cache's keyword and output-field name: ``cache`` from 5.24, ``past_key_values``
``cache_of``, ``take_cache``,   before (5.24 keeps the old name as a deprecated alias until 5.40). Read off
``with_cache_field``            ``LlamaModel.forward``'s signature, not the version string. ``generate`` finds the
                                cache in a model output by this name, and passes it back under it.
``new_dynamic_cache``           ``DynamicCache(config=)``: per-layer cache types come from the config.
``concat_cache_rows``,          ``DynamicCache.layers[i].keys/values`` ``[B, heads, T, head_dim]`` (a server merges rows
``drop_cache_columns``,         of different lengths, left-padded, and trims columns no row attends to; the static image
``cache_tensors``,              decoder copies a prefilled prompt into its buffers);
``select_cache_rows``           ``Cache.batch_select_indices`` keeps rows.
``create_causal_mask``          ``masking_utils.create_causal_mask(config, inputs_embeds, attention_mask, <CACHE>,
                                position_ids)`` (the depth head builds its own causal mask).
``init``                        ``transformers.initialization`` (v5): init functions that skip tensors already loaded
                                from a checkpoint, used in ``_init_weights``.
``prepare_generation_inputs``   ``GenerationMixin.prepare_inputs_for_generation(..., is_first_iteration=)``: the prompt
                                arrives as ``inputs_embeds`` on the first step only.
``set_attn_implementation``     the config's ``_attn_implementation`` (v5 property; read at every forward to pick the
                                attention function from ``ALL_ATTENTION_FUNCTIONS``).
Llama layers                    ``LlamaDecoderLayer`` attributes read by ``mllm.decoding.LayerStack``:
                                ``self_attn.{q,k,v,o}_proj``, ``self_attn.head_dim``, ``self_attn.scaling``,
                                ``input_layernorm``, ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``,
                                ``mlp.act_fn``; ``apply_rotary_pos_emb(q, k, cos, sin)``;
                                ``LlamaRotaryEmbedding(x, position_ids)`` returning ``cos, sin`` of shape
                                ``[B, T, head_dim]`` for ``position_ids`` ``[B, T]``; a decoder layer returning a
                                tensor (not a tuple).
``LEGACY_ROPE_FIELDS``          v5 ``LlamaConfig`` keeps rope in ``rope_parameters`` but still converts the Llama-2
                                ``config.json`` fields ``rope_theta`` / ``rope_scaling`` (read by ``mllm.weights``).
packed batches                  ``FlashAttentionKwargs`` names ``cu_seq_lens_q/k``, ``max_length_q/k`` (passed through
                                ``LlamaModel.forward(**kwargs)`` to the attention function; the varlen path flattens
                                the batch, so several rows work); ``tests/test_packing.py`` also patches
                                ``modeling_flash_attention_utils._lazy_imports`` to run that path with torch kernels.
config                          v5 configs are dataclasses; ``UniTokMLLMConfig.__post_init__(**kwargs)`` chains to
                                ``LlamaConfig.__post_init__`` (``mllm.configuration``).
==============================  ====================================================================================

``tests/test_hf_compat.py`` runs the training step, text and image generation, save/load and conversion with
transformers' deprecation warnings turned into errors, so a new rename shows up as a failing test that points here.
"""
from __future__ import annotations

import inspect

import torch

from transformers import initialization as init  # noqa: F401  (re-exported)
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask  # noqa: F401  (re-exported)
from transformers.models.llama.modeling_llama import (LlamaDecoderLayer, LlamaModel, LlamaRMSNorm,  # noqa: F401
                                                      LlamaRotaryEmbedding, apply_rotary_pos_emb)

CACHE = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"
LEGACY_ROPE_FIELDS = ("rope_theta", "rope_scaling")


def cache_kwarg(cache: Cache | None) -> dict:
    """``{name: cache}`` for a transformers call (model forward, decoder layer, ``create_causal_mask``)."""
    return {CACHE: cache}


def cache_of(output) -> Cache | None:
    """The KV cache of a transformers model output (``None`` when it has none)."""
    return getattr(output, CACHE, None)


def take_cache(cache: Cache | None, kwargs: dict) -> Cache | None:
    """Our forward takes ``cache=``; ``generate`` of transformers < 5.24 passes ``past_key_values=`` instead."""
    legacy = kwargs.pop("past_key_values", None)
    return cache if cache is not None else legacy


def with_cache_field(cls):
    """Class decorator, applied below ``@dataclass``: declares the output's KV-cache field under ``CACHE``, the
    name ``generate`` looks for (``"cache" in outputs``; ``past_key_values`` before 5.24)."""
    cls.__annotations__[CACHE] = "Cache | None"
    setattr(cls, CACHE, None)
    return cls


def new_dynamic_cache(config) -> DynamicCache:
    return DynamicCache(config=config)


def concat_cache_rows(first: DynamicCache, second: DynamicCache, config) -> DynamicCache:
    """One cache holding ``first``'s rows then ``second``'s; the shorter is left-padded with zeros (its attention
    mask must be left-padded with zeros as well)."""
    merged = new_dynamic_cache(config)
    length = max(first.get_seq_length(), second.get_seq_length())
    for i, (a, b) in enumerate(zip(first.layers, second.layers)):
        pad = [torch.nn.functional.pad(t, (0, 0, length - t.shape[2], 0)) for t in (a.keys, b.keys, a.values,
                                                                                   b.values)]
        merged.update(torch.cat(pad[:2]), torch.cat(pad[2:]), i)
    return merged


def drop_cache_columns(cache: DynamicCache, n: int) -> None:
    """Drop the first ``n`` sequence columns of every layer (columns masked out in every row)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, n:], layer.values[:, :, n:]


def cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the keys and values ``[B, heads, T, head_dim]`` (a static decoder copies a prefilled prompt)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def select_cache_rows(cache: Cache, index: torch.Tensor) -> None:
    cache.batch_select_indices(index)


def prepare_generation_inputs(prepare, image_codes, *args, **kwargs) -> dict:
    """``prepare`` is transformers' ``prepare_inputs_for_generation``; the image codes join only the first step,
    when the prompt (whose image slots they fill) is fed. Later steps feed generated text ids, which have no slots."""
    inputs = prepare(*args, **kwargs)
    if kwargs.get("is_first_iteration") and inputs.get("inputs_embeds") is None:
        inputs["image_codes"] = image_codes
    return inputs


def set_attn_implementation(config, name: str) -> None:
    """Select the attention function (``sdpa``, ``eager``, ``flash_attention_2``, ...) on a config before or after
    the model is built; every module sharing the config follows."""
    config._attn_implementation = name
