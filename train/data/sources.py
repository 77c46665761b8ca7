"""Data sources of the MLLM mixture: ``datasets`` tables plus a reader that turns one row into a :class:`Record`.

Formats (``SourceConfig.format``; ``auto`` from the paths):

* pairs (kinds ``t2i``/``i2t``/``caption``) — JSONL, parquet, webdataset shards (``jpg``/``png`` + ``txt``/``json``)
  or image folders with ``<name>.txt`` sidecars (the tokenizer trainer's readers, :mod:`train.common.datasources`).
  A row carries a raw image (path, bytes, datasets ``Image`` struct) or precomputed codes (``[K][N]`` ints, a numpy
  array, or a JSON string like the reference's ``vqcode_256``) in ``codes_key`` (auto: ``codes``).
* chat — LLaVA conversations (``{"id", "image": str | [str] (optional), "conversations": [{"from": "human"|"gpt",
  "value": "<image>\\n..."}]}``) from a JSON array or JSONL file (read by :func:`load_llava`, which tolerates the
  mixed ``image`` types that break Arrow's inference), or any table with those columns (e.g. extracted codes,
  ``codes`` ``[M][K][N]``). Image paths are relative to ``image_folder`` (default: the JSON file's directory).
* text — JSONL / parquet with a ``text`` field.

Readers raise :class:`~train.common.datasources.BadRecord` with a readable reason; the loader counts it and skips.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from train.common.datasources import (ERROR_KEY, IMAGE_KEYS, ROOT_KEY, TEXT_KEYS, BadRecord, detect_format,
                                      expand_paths, folder_table, jsonl_items, keep_image_bytes, load_table, path_of,
                                      pick_caption, pick_key, table_columns)

from .config import SourceConfig

PAIR_TEXT_KEYS = TEXT_KEYS + ("json",)  # webdataset: a .json member holding {"caption": ...}
CODES_KEYS = ("codes",)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_TAG = "<image>"


@dataclass
class Record:
    """One normalised record. ``images``: raw image cells; ``codes``: one ``[K][N]`` array per image, or None."""
    kind: str  # "pair" | "chat" | "text"
    id: str
    text: str | None = None
    messages: list[dict] | None = None
    images: list[Any] = field(default_factory=list)
    codes: list[Any] | None = None
    root: str | None = None

    @property
    def num_images(self) -> int:
        return len(self.codes) if self.codes is not None else len(self.images)


# ================================================================================================ readers
class PairReader:
    def __init__(self, image_key: str | None, text_key: str, codes_key: str | None, root_key: str | None,
                 image_root: str | None) -> None:
        self.image_key, self.text_key, self.codes_key = image_key, text_key, codes_key
        self.root_key, self.image_root = root_key, image_root

    def ident(self, row: dict) -> str:
        return str(row.get("__key__") or row.get("id") or path_of(row.get(self.image_key)) or "?")

    def __call__(self, row: dict, rng: np.random.Generator) -> Record:
        rid = self.ident(row)
        if row.get(ERROR_KEY):
            raise BadRecord(row[ERROR_KEY])
        if self.text_key not in row:
            raise BadRecord(f"missing field {self.text_key!r}")
        text = caption_of(row.get(self.text_key), rng)
        codes = row.get(self.codes_key) if self.codes_key else None
        image = row.get(self.image_key) if self.image_key else None
        if codes is None and image is None:
            raise BadRecord("no image" if self.image_key else f"missing field {self.codes_key!r}")
        root = self.image_root or (row.get(self.root_key) if self.root_key else None)
        return Record("pair", rid, text=text, images=[image] if codes is None else [],
                      codes=None if codes is None else [codes], root=root)


class ChatReader:
    def __init__(self, image_key: str | None, conversations_key: str, codes_key: str | None, root_key: str | None,
                 image_root: str | None) -> None:
        self.image_key, self.conversations_key, self.codes_key = image_key, conversations_key, codes_key
        self.root_key, self.image_root = root_key, image_root

    def __call__(self, row: dict, rng: np.random.Generator) -> Record:
        rid = str(row.get("id") or row.get("__key__") or "?")
        if row.get(ERROR_KEY):
            raise BadRecord(row[ERROR_KEY])
        if row.get(self.conversations_key) is None:
            raise BadRecord(f"missing field {self.conversations_key!r}")
        messages = llava_messages(row[self.conversations_key])
        images = image_list(row.get(self.image_key) if self.image_key else None)
        codes = row.get(self.codes_key) if self.codes_key else None
        if codes is not None:
            if isinstance(codes, (str, bytes)):
                codes = json.loads(codes)
            codes = list(codes)
            images = []
        n_tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
        n_images = len(codes) if codes is not None else len(images)
        if n_tags != n_images:
            raise BadRecord(f"image count mismatch: {n_tags} {IMAGE_TAG} tags but {n_images} images")
        root = self.image_root or (row.get(self.root_key) if self.root_key else None)
        return Record("chat", rid, messages=messages, images=images, codes=codes, root=root)


class TextReader:
    def __init__(self, text_key: str) -> None:
        self.text_key = text_key

    def __call__(self, row: dict, rng: np.random.Generator) -> Record:
        rid = str(row.get("id") or row.get("__key__") or "?")
        if row.get(ERROR_KEY):
            raise BadRecord(row[ERROR_KEY])
        text = row.get(self.text_key)
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if not isinstance(text, str):
            raise BadRecord(f"missing field {self.text_key!r}" if text is None
                            else f"unsupported text of type {type(text).__name__}")
        if not text.strip():
            raise BadRecord("empty text")
        return Record("text", rid, text=text)


def caption_of(value: Any, rng: np.random.Generator) -> str:
    if isinstance(value, dict):  # webdataset .json member
        for key in TEXT_KEYS:
            if key in value:
                return caption_of(value[key], rng)
        raise BadRecord("no caption")
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = pick_caption(value, rng)
    if not text.strip():
        raise BadRecord("no caption")
    return text


def image_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def llava_messages(conversations: Any) -> list[dict]:
    """LLaVA ``[{"from": "human"|"gpt", "value": ...}]`` -> ``[{"role": "user"|"assistant", "content": ...}]``."""
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise BadRecord("bad conversation: empty or not a list")
    messages = []
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise BadRecord("bad conversation: a turn without a string 'value'")
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            raise BadRecord(f"bad conversation: unknown speaker {turn.get('from')!r}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


# ================================================================================================ LLaVA files
def _llava_rows(paths: list[str], stamps: list[str]):  # noqa: ARG001 (stamps: part of the datasets cache key)
    for path in paths:
        root, base = str(Path(path).resolve().parent), os.path.basename(path)
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            if head.startswith("["):
                items = enumerate(json.load(f))
            else:
                items = jsonl_items(f)
            for n, item in items:
                yield _llava_row(item, f"{base}:{n}", root)


def _llava_row(item: Any, default_id: str, root: str) -> dict:
    row = {"id": default_id, "image": [], "conversations": [], "codes": None, ROOT_KEY: root, ERROR_KEY: None}
    if isinstance(item, json.JSONDecodeError):
        row[ERROR_KEY] = f"invalid JSON line: {item.msg}"
        return row
    if not isinstance(item, dict):
        row[ERROR_KEY] = f"record is a {type(item).__name__}, not an object"
        return row
    row["id"] = str(item.get("id", default_id))
    image = item.get("image", item.get("images"))
    images = image_list(image)
    if not all(isinstance(x, str) for x in images):
        row[ERROR_KEY] = "image must be a path or a list of paths"
        return row
    conv = item.get("conversations")
    if conv is None:
        row[ERROR_KEY] = "missing field 'conversations'"
        return row
    if not isinstance(conv, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conv):
        row[ERROR_KEY] = "bad conversation: turns must be objects with a string 'value'"
        return row
    row["image"] = images
    row["conversations"] = [{"from": str(t.get("from", t.get("role", ""))), "value": t["value"]} for t in conv]
    if item.get("codes") is not None:  # precomputed codes [M][K][N]: kept as JSON text (checked when read)
        row["codes"] = json.dumps(item["codes"])
    return row


def load_llava(paths: list[str], cache_dir: str | None = None) -> Any:
    """LLaVA JSON/JSONL files -> ``Dataset`` (id, image: list[str], conversations, codes (JSON text or null),
    ``__root__``, ``__error__``).

    Rows are normalised in Python first (``image`` str or list, odd records), so Arrow sees one schema; a record that
    cannot be parsed becomes a row with ``__error__`` set, counted as bad when it is read. The Arrow cache is keyed
    by the files' size and mtime."""
    import datasets

    features = datasets.Features({
        "id": datasets.Value("string"), "image": datasets.List(datasets.Value("string")),
        "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        "codes": datasets.Value("string"), ROOT_KEY: datasets.Value("string"), ERROR_KEY: datasets.Value("string")})
    paths = [str(Path(p).resolve()) for p in paths]
    stamps = [f"{os.path.getsize(p)}:{os.path.getmtime(p)}" for p in paths]
    return datasets.Dataset.from_generator(_llava_rows, features=features, cache_dir=cache_dir,
                                           gen_kwargs={"paths": paths, "stamps": stamps})


# ================================================================================================ building
@dataclass
class MixtureSource:
    """A source of the mixture: its config, the ``datasets`` table (``IterableDataset`` when streaming), a reader."""
    cfg: SourceConfig
    dataset: Any
    reader: Any
    format: str

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def streaming(self) -> bool:
        return self.cfg.streaming

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError(f"source {self.name!r} is streaming and has no length")
        return len(self.dataset)

    def describe(self) -> str:
        n = "streaming" if self.streaming else f"{len(self):,} records"
        return f"{self.name}: {self.cfg.kind} from {self.format}, {n}, weight {self.cfg.weight:g}"


def build_table(cfg: SourceConfig, cache_dir: str | None = None) -> tuple[Any, str, str | None, str | None]:
    """-> (dataset, format, root column or None, default image root)."""
    option = f"data.sources[{cfg.name}]"
    paths = expand_paths(cfg.paths, option=f"{option}.paths")
    fmt = cfg.format
    if fmt == "auto":
        fmt = detect_format(paths, option=option)
        if fmt == "jsonl" and cfg.kind == "chat":
            fmt = "llava"
    if fmt in ("folder", "llava") and cfg.kind == "text":
        raise ValueError(f"{option}: format {fmt} holds no text-only data")
    if fmt == "folder":
        if cfg.kind == "chat":
            raise ValueError(f"{option}: a folder of images holds no conversations")
        return folder_table(paths, option=option), fmt, None, None
    if fmt == "llava":
        return load_llava(paths, cache_dir), fmt, ROOT_KEY, cfg.image_folder
    ds, root_key = load_table(paths, fmt, cfg.streaming, cache_dir, option=option)
    default_root = None if root_key else str(Path(paths[0]).resolve().parent)
    return ds, fmt, root_key, cfg.image_folder or default_root


def build_source(cfg: SourceConfig, cache_dir: str | None = None) -> MixtureSource:
    option = f"data.sources[{cfg.name}]"
    ds, fmt, root_key, image_root = build_table(cfg, cache_dir)
    columns = table_columns(ds)
    if cfg.kind == "text":
        text_key = pick_key(cfg.text_key, TEXT_KEYS, columns, "text", f"{option}.text_key")
        reader: Any = TextReader(text_key)
        return MixtureSource(cfg, ds, reader, fmt)
    codes_key = pick_key(cfg.codes_key, CODES_KEYS, columns, "codes", f"{option}.codes_key", required=False)
    image_key = pick_key(cfg.image_key, IMAGE_KEYS + ("images",), columns, "image", f"{option}.image_key",
                         required=codes_key is None and cfg.kind != "chat")
    if image_key is not None:
        ds = keep_image_bytes(ds, image_key)
    if cfg.image_folder:
        image_root = cfg.image_folder
    if cfg.kind == "chat":
        if cfg.conversations_key not in columns:
            raise ValueError(f"{option}: no {cfg.conversations_key!r} column (columns: {', '.join(columns)}); "
                             f"set conversations_key")
        reader = ChatReader(image_key, cfg.conversations_key, codes_key, root_key, image_root)
    else:
        text_key = pick_key(cfg.text_key, PAIR_TEXT_KEYS, columns, "caption", f"{option}.text_key")
        reader = PairReader(image_key, text_key, codes_key, root_key, image_root)
    return MixtureSource(cfg, ds, reader, fmt)


def build_sources(cfgs: list[SourceConfig], cache_dir: str | None = None) -> list[MixtureSource]:
    if not cfgs:
        raise ValueError("data.sources is empty: list at least one source")
    sources = [build_source(c, cache_dir) for c in cfgs]
    for s in sources:
        if not s.streaming and len(s) == 0:
            raise ValueError(f"data.sources[{s.name}] has no records")
    return sources


__all__ = ["Record", "PairReader", "ChatReader", "TextReader", "llava_messages", "load_llava", "MixtureSource",
           "build_table", "build_source", "build_sources", "IMAGE_TAG"]
