"""Records -> training samples: token ids and labels from :class:`mllm.processing.MLLMProcessor`, plus one tensor per
image — its codes ``[K, N]`` (int64) when precomputed, else its pixels ``[3, S, S]`` in [-1, 1], encoded later in
the main process (:func:`train.data.collate.encode_pending_images`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mllm.processing import MLLMProcessor, SampleTooLong
from tokenizer.image import preprocess
from train.common.datasources import BadRecord, load_image

from .config import MLLMDataConfig, SourceConfig
from .sources import Record

KINDS = ("t2i", "i2t", "chat", "text")


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    images: list[torch.Tensor] = field(default_factory=list)  # per image: codes [K, N] long or pixels [3, S, S]
    kind: str = "text"  # t2i | i2t | chat | text
    unconditional: bool = False  # t2i with the prompt dropped (classifier-free guidance)
    source: str = ""
    id: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @classmethod
    def from_encoded(cls, enc, images: list[torch.Tensor] | None = None, kind: str = "text", **kw) -> "Sample":
        return cls(list(enc.input_ids), list(enc.labels), list(images or []), kind, **kw)


def check_codes(value: Any, num_codebooks: int, positions: int, codebook_size: int) -> torch.Tensor:
    """One image's codes (nested lists, array or JSON string; ``[K, N]`` or ``[1, K, N]``) -> LongTensor [K, N]."""
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise BadRecord("bad codes: not valid JSON") from None
    try:
        arr = np.asarray(value)
    except ValueError:
        raise BadRecord("bad codes shape: ragged") from None
    if arr.dtype == object:
        try:  # arrow gives a list of arrays for nested lists
            arr = np.stack([np.asarray(v) for v in value])
        except (ValueError, TypeError):
            raise BadRecord("bad codes shape: ragged") from None
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.shape != (num_codebooks, positions):
        raise BadRecord(f"bad codes shape {tuple(arr.shape)}, expected ({num_codebooks}, {positions})")
    if not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(np.mod(arr, 1) == 0)):
            raise BadRecord(f"bad codes dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= codebook_size):
        raise BadRecord(f"codes out of range [0, {codebook_size})")
    return torch.from_numpy(arr.astype(np.int64))


class SampleBuilder:
    """``Record`` + per-record RNG -> :class:`Sample` for one source (direction choice, CFG dropout, images)."""

    def __init__(self, processor: MLLMProcessor, source: SourceConfig, data: MLLMDataConfig,
                 image_size: int | None, max_tokens: int | None = None) -> None:
        self.processor = processor
        self.cfg = source
        self.cfg_dropout = data.cfg_dropout if source.cfg_dropout is None else source.cfg_dropout
        self.image_size = image_size
        self.resize_ratio = data.resize_ratio
        self.max_tokens = max_tokens
        c = processor.config
        self.code_shape = (c.num_codebooks, c.image_positions, c.codebook_size)

    def images(self, record: Record) -> list[torch.Tensor]:
        if record.codes is not None:
            return [check_codes(c, *self.code_shape) for c in record.codes]
        out = []
        for value in record.images:
            img, _ = load_image(value, record.root)
            if self.image_size is None:
                raise ValueError(f"source {self.cfg.name!r} has raw images but no image size is known: give the "
                                 "loader an image tokenizer (or set data.image_size), or extract codes first "
                                 "(unitok extract-codes)")
            try:
                out.append(preprocess(img, self.image_size, self.resize_ratio))
            except Exception as err:  # a conversion failure on an odd image is a bad record, not a crash
                raise BadRecord(f"cannot decode image: {type(err).__name__}: {err}") from None
        return out

    def build(self, record: Record, rng: np.random.Generator) -> list[Sample]:
        """The samples of one record: one, except for a text document longer than ``max_tokens``, which is split
        into chunks of ``max_tokens`` (:meth:`MLLMProcessor.text_chunks`). Over-long multimodal samples stay a
        counted skip ("sample too long"): an image or a reply is never cut."""
        if self.cfg.kind != "text" or self.max_tokens is None:
            return [self(record, rng)]
        chunks = self.processor.text_chunks(record.text, self.max_tokens)
        return [Sample.from_encoded(c, [], "text", source=self.cfg.name,
                                    id=record.id if len(chunks) == 1 else f"{record.id}#{i}")
                for i, c in enumerate(chunks)]

    def __call__(self, record: Record, rng: np.random.Generator) -> Sample:
        kind = self.cfg.kind
        if kind == "caption":
            kind = "t2i" if rng.random() < self.cfg.t2i_ratio else "i2t"
        unconditional = kind == "t2i" and rng.random() < self.cfg_dropout
        images = self.images(record)  # images first: a broken image is reported as such, not as a text problem
        p = self.processor
        try:
            if kind == "t2i":
                enc = p.text_to_image(None if unconditional else record.text)
            elif kind == "i2t":
                enc = p.image_to_text(record.text)
            elif kind == "chat":
                enc = p.chat(record.messages)
            else:
                enc = p.text(record.text)
        except SampleTooLong:
            raise BadRecord("sample too long") from None
        except ValueError as err:  # the template rejects e.g. turns that do not alternate user/assistant
            raise BadRecord(f"bad conversation: {err}" if kind == "chat" else str(err)) from None
        if self.max_tokens is not None and len(enc) > self.max_tokens:
            raise BadRecord("sample too long")
        if enc.num_images != len(images):
            raise BadRecord(f"image count mismatch: the sample has {enc.num_images} image slots, "
                            f"the record {len(images)} images")
        return Sample(enc.input_ids, enc.labels, images, kind, unconditional, self.cfg.name, record.id)


__all__ = ["Sample", "SampleBuilder", "check_codes", "KINDS"]
