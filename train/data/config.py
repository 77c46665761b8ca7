"""Typed configuration of the MLLM data mixture (the ``data`` section of an MLLM training config).

Example (YAML)::

    data:
      seed: 42
      batching: pack          # pack: rows of max_tokens, padding-free; pad: batch_size samples, right-padded
      batch_size: 4           # pack: rows per micro-batch; pad: samples per micro-batch
      max_tokens: 2048
      cfg_dropout: 0.1
      sources:
        - {name: journeydb, kind: caption, t2i_ratio: 0.9, paths: ["/data/jdb/codes-*.parquet"], weight: 1.0}
        - {name: llava, kind: chat, paths: [/data/llava_v1_5_mix665k.json], image_folder: /data/llava/images}
        - {name: dclm, kind: text, paths: ["/data/dclm/*.parquet"], weight: 0.5, streaming: true}

Unknown keys and wrong types fail at start-up (:func:`train.common.config.from_dict`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SOURCE_KINDS = ("t2i", "i2t", "caption", "chat", "text")


@dataclass
class SourceConfig:
    name: str
    # t2i / i2t: image-caption pairs in one direction; caption: both, text->image with probability t2i_ratio;
    # chat: LLaVA conversations; text: plain text
    kind: Literal["t2i", "i2t", "caption", "chat", "text"]
    paths: list[str] = field(default_factory=list)  # files, dirs or globs; {000..139} ranges expanded
    # auto: from the file names (dir -> folder, .json/.jsonl -> jsonl (chat: llava), .parquet, .tar -> webdataset)
    format: Literal["auto", "jsonl", "parquet", "webdataset", "folder", "llava"] = "auto"
    weight: float = 1.0                 # relative sampling weight in the mixture
    image_folder: str | None = None     # base dir of relative image paths (default: the data file's directory)
    image_key: str | None = None        # auto: image, jpg, png, ... (chat: image)
    text_key: str | None = None         # auto: text, caption, txt, prompt, json
    codes_key: str | None = None        # precomputed [K][N] codes (auto: a `codes` column if present)
    conversations_key: str = "conversations"
    t2i_ratio: float = 0.5              # kind caption: fraction of visits that become text->image samples
    cfg_dropout: float | None = None    # text->image prompt dropout; None = data.cfg_dropout
    streaming: bool = False             # datasets streaming (jsonl/parquet/webdataset); approximate shuffle
    shuffle: bool = True
    shuffle_buffer: int = 10_000        # streaming only

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"source name {self.name!r} must be non-empty and contain no '/'")
        if not self.paths:
            raise ValueError(f"source {self.name!r}: paths is empty")
        if self.weight < 0:
            raise ValueError(f"source {self.name!r}: weight must be >= 0, got {self.weight}")
        if not 0.0 <= self.t2i_ratio <= 1.0:
            raise ValueError(f"source {self.name!r}: t2i_ratio must be in [0, 1], got {self.t2i_ratio}")
        if self.cfg_dropout is not None and not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"source {self.name!r}: cfg_dropout must be in [0, 1], got {self.cfg_dropout}")
        if self.streaming and (self.format in ("folder", "llava") or self.kind == "chat"):
            raise ValueError(f"source {self.name!r}: streaming is only for jsonl/parquet/webdataset pair or text data")
        if self.shuffle_buffer < 1:
            raise ValueError(f"source {self.name!r}: shuffle_buffer must be >= 1")


@dataclass
class MLLMDataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    seed: int = 0
    cfg_dropout: float = 0.1            # text->image samples trained unconditionally (prompt None)
    batching: Literal["pad", "pack"] = "pack"
    batch_size: int = 8                 # pad: samples per batch; pack: rows per batch
    max_tokens: int = 2048              # pack: row length; both: longer samples are skipped ("sample too long")
    pad_to_multiple_of: int | None = None
    # raw images: resized (shorter side to image_size*resize_ratio) and centre-cropped to the tokenizer's size,
    # then encoded in the main process with the image tokenizer given to the loader, encode_batch_size at a time
    image_size: int | None = None       # default: the image tokenizer's
    resize_ratio: float = 1.125
    encode_batch_size: int = 64
    num_workers: int = 4
    cache_dir: str | None = None        # datasets' Arrow cache (default: HF_DATASETS_CACHE)
    # bad records are skipped and counted by reason; more than this fraction of one source's records (after
    # bad_check_min_records of it were read) stops training
    max_bad_fraction: float = 0.01
    bad_check_min_records: int = 1000
    log_bad_records: int = 20

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources names must be unique, got {names}")
        if self.sources and sum(s.weight for s in self.sources) <= 0:
            raise ValueError("data.sources: at least one source needs a positive weight")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ValueError(f"data.cfg_dropout must be in [0, 1], got {self.cfg_dropout}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        for key in ("batch_size", "max_tokens", "encode_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"data.pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}")
        if self.resize_ratio < 1.0:
            raise ValueError(f"data.resize_ratio must be >= 1, got {self.resize_ratio}")


__all__ = ["SOURCE_KINDS", "SourceConfig", "MLLMDataConfig"]
