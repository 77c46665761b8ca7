"""Batches for :class:`mllm.modeling.UniTokMLLM`: right-padded or padding-free packed.

Both return a dict with the model inputs and ``counts`` (plain ints for logging; pop it before ``model(**batch)``):

* ``input_ids`` / ``labels`` ``[R, L]``; ``image_codes`` ``[M, K, N]``: every image of the batch in order of
  appearance, row-major (the order of the image slots in ``input_ids.flatten()``), empty ``[0, K, N]`` if none;
* padded: ``attention_mask`` ``[B, L]`` (1 on tokens); pads carry the processor's pad id and IGNORE labels;
* packed: ``position_ids`` ``[R, L]`` restarting at 0 for every sample and no attention mask — sdpa/eager/flex then
  get a block-diagonal causal mask built from them. Flash-attention reads packing off ``position_ids`` only for a
  single row, so the batch also names every sequence of the flattened rows for the varlen kernel:
  ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32 ``[S+1]``, one sequence per sample and per row tail) and
  ``max_length_q``/``max_length_k`` (ints), transformers' ``FlashAttentionKwargs``. The label of the first token
  of every sample is IGNORE, so no sample is trained to predict the next one's first token. Row tails are padding
  with their own position block. The model must run without a KV cache (``use_cache=False``): the packed-sequence
  detection only happens when no cache is passed;
* raw images (pixels ``[3, S, S]`` instead of codes): ``pixel_values`` ``[P, 3, S, S]`` and ``pixel_index`` ``[P]``
  (their rows in ``image_codes``, zero until :func:`encode_pending_images` fills them).

``counts``: ``samples``, ``tokens`` (non-pad), ``text_targets`` and ``image_targets`` (supervised text tokens and image
positions, exactly those the model's loss averages over), ``images``, and per kind ``samples_<kind>`` plus
``samples_t2i_uncond``.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from mllm.configuration import IGNORE_INDEX

from .samples import KINDS, Sample


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else int(math.ceil(n / multiple) * multiple)


def _check_images(sample: Sample, image_token_id: int, positions: int) -> None:
    slots = sum(1 for t in sample.input_ids if t == image_token_id)
    if slots != positions * len(sample.images):
        raise ValueError(f"sample {sample.source}/{sample.id} has {slots} image slots but {len(sample.images)} images "
                         f"of {positions} positions")


class MLLMCollator:
    """``collate(samples)`` (pad, or pack greedily into rows) and ``collate_rows(rows)`` (pre-packed rows)."""

    def __init__(self, pad_token_id: int, image_token_id: int, num_codebooks: int, image_positions: int,
                 mode: str = "pad", max_tokens: int | None = None, pad_to_multiple_of: int | None = None) -> None:
        if mode not in ("pad", "pack"):
            raise ValueError(f"collation mode must be 'pad' or 'pack', got {mode!r}")
        if mode == "pack" and not max_tokens:
            raise ValueError("packing needs max_tokens (the row length)")
        self.pad_token_id, self.image_token_id = pad_token_id, image_token_id
        self.num_codebooks, self.image_positions = num_codebooks, image_positions
        self.mode, self.max_tokens, self.pad_to_multiple_of = mode, max_tokens, pad_to_multiple_of

    @classmethod
    def from_processor(cls, processor, mode: str = "pad", max_tokens: int | None = None,
                       pad_to_multiple_of: int | None = None) -> "MLLMCollator":
        c = processor.config
        return cls(processor.pad_token_id, c.image_placeholder_id, c.num_codebooks, c.image_positions, mode,
                   max_tokens, pad_to_multiple_of)

    def __call__(self, samples: Sequence[Sample]) -> dict:
        return self.collate(samples)

    def collate(self, samples: Sequence[Sample]) -> dict:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        if self.mode == "pad":
            return self.pad(samples)
        rows = pack_rows([len(s) for s in samples], self.max_tokens)
        return self.collate_rows([[samples[i] for i in row] for row in rows])

    # ------------------------------------------------------------------ padded
    def pad(self, samples: Sequence[Sample]) -> dict:
        L = _round_up(max(len(s) for s in samples), self.pad_to_multiple_of)
        B = len(samples)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        for b, s in enumerate(samples):
            _check_images(s, self.image_token_id, self.image_positions)
            n = len(s)
            input_ids[b, :n] = torch.tensor(s.input_ids)
            labels[b, :n] = torch.tensor(s.labels)
            attention_mask[b, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        batch.update(self._images([img for s in samples for img in s.images]))
        batch["counts"] = self._counts(samples, labels, int(attention_mask.sum()))
        return batch

    # ------------------------------------------------------------------ packed
    def collate_rows(self, rows: Sequence[Sequence[Sample]]) -> dict:
        rows = [list(r) for r in rows if r]
        if not rows:
            raise ValueError("cannot collate an empty list of rows")
        lengths = [sum(len(s) for s in row) for row in rows]
        if self.max_tokens is not None and max(lengths) > self.max_tokens:
            raise ValueError(f"a packed row holds {max(lengths)} tokens, more than max_tokens {self.max_tokens}")
        L = _round_up(max(lengths), self.pad_to_multiple_of)
        R = len(rows)
        input_ids = torch.full((R, L), self.pad_token_id, dtype=torch.long)
        labels = torch.full((R, L), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((R, L), dtype=torch.long)
        images = []
        for r, row in enumerate(rows):
            at = 0
            for s in row:
                _check_images(s, self.image_token_id, self.image_positions)
                n = len(s)
                input_ids[r, at:at + n] = torch.tensor(s.input_ids)
                labels[r, at:at + n] = torch.tensor(s.labels)
                labels[r, at] = IGNORE_INDEX  # nothing before a sample's first token may learn to predict it
                position_ids[r, at:at + n] = torch.arange(n)
                images += s.images
                at += n
            position_ids[r, at:] = torch.arange(L - at)  # the tail padding is a block of its own
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                 **varlen_kwargs(position_ids)}
        batch.update(self._images(images))
        batch["counts"] = self._counts([s for row in rows for s in row], labels, sum(lengths))
        return batch

    # ------------------------------------------------------------------ shared
    def _images(self, images: list[torch.Tensor]) -> dict:
        K, N = self.num_codebooks, self.image_positions
        codes = torch.zeros((len(images), K, N), dtype=torch.long)
        pixel_index, pixels = [], []
        for i, img in enumerate(images):
            if img.is_floating_point():
                pixel_index.append(i)
                pixels.append(img)
            else:
                if tuple(img.shape) != (K, N):
                    raise ValueError(f"image codes of shape {tuple(img.shape)}, expected ({K}, {N})")
                codes[i] = img
        out = {"image_codes": codes}
        if pixels:
            out["pixel_values"] = torch.stack(pixels)
            out["pixel_index"] = torch.tensor(pixel_index, dtype=torch.long)
        return out

    def _counts(self, samples: list[Sample], labels: torch.Tensor, tokens: int) -> dict:
        targets = labels[:, 1:]
        counts = {"samples": len(samples), "tokens": tokens, "text_targets": int((targets >= 0).sum()),
                  "image_targets": int((targets == self.image_token_id).sum()),
                  "images": sum(len(s.images) for s in samples)}
        for kind in KINDS:
            counts[f"samples_{kind}"] = sum(1 for s in samples if s.kind == kind)
        counts["samples_t2i_uncond"] = sum(1 for s in samples if s.unconditional)
        return counts


def varlen_kwargs(position_ids: torch.Tensor) -> dict:
    """Packed ``position_ids`` ``[R, L]`` (every sequence starts at 0) -> transformers' ``FlashAttentionKwargs`` for
    the flattened rows: ``cu_seq_lens_q/k`` (int32 sequence starts + the total) and ``max_length_q/k`` (ints)."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().view(-1)
    cu = torch.cat((starts, torch.tensor([flat.numel()]))).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def pack_rows(lengths: Iterable[int], max_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """First-fit packing of samples (in order) into rows of at most ``max_tokens`` tokens -> row lists of indices.
    With ``max_rows``, samples that fit in no row once ``max_rows`` rows are open raise ValueError."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(f"sample {i} has {n} tokens, more than max_tokens {max_tokens}")
        for r, f in enumerate(free):
            if n <= f:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            if max_rows is not None and len(rows) >= max_rows:
                raise ValueError(f"sample {i} fits in none of the {max_rows} rows")
            rows.append([i])
            free.append(max_tokens - n)
    return rows


@torch.no_grad()
def encode_pending_images(batch: dict, tokenizer, batch_size: int = 64) -> dict:
    """Fill ``image_codes`` rows of raw images (``pixel_values``/``pixel_index``) with ``tokenizer.encode``, run in
    chunks of ``batch_size`` on the tokenizer's device; the codes are returned on the CPU like the rest."""
    if "pixel_values" not in batch:
        return batch
    if tokenizer is None:
        raise ValueError("the batch holds raw images but no image tokenizer was given to encode them "
                         "(pass image_tokenizer to the loader, or extract codes with `unitok extract-codes`)")
    pixels, index = batch.pop("pixel_values"), batch.pop("pixel_index")
    device = next(tokenizer.parameters()).device
    codes = torch.cat([tokenizer.encode(chunk.to(device)).cpu() for chunk in pixels.split(batch_size)])
    codes = codes.flatten(2)
    if tuple(codes.shape[1:]) != tuple(batch["image_codes"].shape[1:]):
        raise ValueError(f"the image tokenizer gives codes of shape {tuple(codes.shape[1:])}, the model expects "
                         f"{tuple(batch['image_codes'].shape[1:])} (K, N)")
    batch["image_codes"][index] = codes.long()
    return batch


__all__ = ["MLLMCollator", "pack_rows", "varlen_kwargs", "encode_pending_images"]
