"""Record readers shared by the tokenizer and MLLM data layers (HF ``datasets`` underneath).

* :func:`expand_paths` / :func:`detect_format`: ``{000..139}`` shard ranges, globs, format from the file names;
* :func:`load_table`: JSONL/JSON, parquet and webdataset files -> a ``datasets`` ``Dataset`` (or ``IterableDataset``
  when streaming); JSONL records remember the directory of their file (relative image paths);
* :func:`folder_table`: a folder of images with ``<name>.txt`` sidecars or a ``captions.jsonl``/``metadata.jsonl``;
* :func:`load_image` / :func:`pick_caption`: decode one cell, raising :class:`BadRecord` with a readable reason instead
  of crashing a worker;
* :class:`BadRecordStats`: skipped records counted by reason (grouped with :func:`reason_class`).
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tokenizer.image import open_image, to_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_KEYS = ("image", "jpg", "jpeg", "png", "webp", "img", "image_path", "file_name", "path")
TEXT_KEYS = ("text", "caption", "txt", "prompt")
CAPTION_FILES = ("captions.jsonl", "metadata.jsonl")
ROOT_KEY = "__root__"  # column added to JSONL tables: the directory of the record's file
logger = logging.getLogger(__name__)
ERROR_KEY = "__error__"  # why a row could not be parsed (a malformed JSONL line): counted as bad when read


# ================================================================================================ paths
def expand_paths(patterns: list[str], option: str = "data.paths") -> list[str]:
    """Expand ``{000..012}`` ranges (zero padding kept) and globs; keep plain paths (they may not exist yet)."""
    out: list[str] = []
    for pattern in patterns:
        for p in _expand_braces(os.path.expanduser(pattern)):
            matches = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
            if not matches:
                raise FileNotFoundError(f"{option}: no file matches {p!r}")
            out.extend(matches)
    for p in out:
        if not os.path.exists(p):
            raise FileNotFoundError(f"{option}: {p} does not exist")
    return out


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    head, tail = pattern[:m.start()], pattern[m.end():]
    return [x for n in range(int(lo), int(hi) + 1) for x in _expand_braces(f"{head}{n:0{width}d}{tail}")]


def detect_format(paths: list[str], option: str = "data") -> str:
    kinds = set()
    for p in paths:
        if os.path.isdir(p):
            kinds.add("folder")
        elif p.endswith((".jsonl", ".json")):
            kinds.add("jsonl")
        elif p.endswith(".parquet"):
            kinds.add("parquet")
        elif p.endswith((".tar", ".tar.gz", ".tgz")):
            kinds.add("webdataset")
        else:
            raise ValueError(f"{option}.format=auto cannot tell the format of {p!r}; set {option}.format "
                             "(folder, jsonl, parquet or webdataset)")
    if len(kinds) != 1:
        raise ValueError(f"{option}.paths mix formats ({', '.join(sorted(kinds))}); use one format per run")
    return kinds.pop()


# ================================================================================================ tables
def load_table(paths: list[str], fmt: str, streaming: bool = False, cache_dir: str | None = None,
               option: str = "data") -> tuple[Any, str | None]:
    """JSONL/parquet/webdataset files -> (``datasets`` dataset, name of the per-record root-dir column or None)."""
    import datasets

    load_kw: dict[str, Any] = {"split": "train", "streaming": streaming}
    if cache_dir and not streaming:
        load_kw["cache_dir"] = cache_dir
    root_key = None
    if fmt == "jsonl":
        # One load per file so each record remembers its file's directory (relative image paths).
        parts = []
        for p in paths:
            if not _has_a_line(p):  # datasets raises a bare StopIteration on an empty file
                raise ValueError(f"{option}: {p} holds no records (the file is empty)")
            if streaming:  # datasets' reader would fail on a malformed line only when it reaches it, mid-run
                ds = _jsonl_lines_table(p, streaming, cache_dir)
            else:
                try:
                    ds = datasets.load_dataset("json", data_files=[p], **load_kw)
                except datasets.exceptions.DatasetGenerationError:  # a malformed line: parse line by line instead
                    ds = _jsonl_lines_table(p, streaming, cache_dir)
            root = str(Path(p).resolve().parent)
            ds = ds.map(lambda ex, root=root: {ROOT_KEY: root}) if streaming else \
                ds.add_column(ROOT_KEY, [root] * len(ds))
            parts.append(ds)
        ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        root_key = ROOT_KEY
    elif fmt == "parquet":
        _check_parquet(paths, option)  # datasets' error would not say which file is damaged
        ds = datasets.load_dataset("parquet", data_files=paths, **load_kw)
    elif fmt == "webdataset":
        ds = datasets.load_dataset("webdataset", data_files=paths, **load_kw)
    else:
        raise ValueError(f"unknown {option}.format {fmt!r}")
    return ds, root_key


def _check_parquet(paths: list[str], option: str) -> None:
    """Each file's footer and schema must read (cheap: no row group is decoded); all files share one schema."""
    import pyarrow.parquet as pq

    first = None
    for p in paths:
        try:
            schema = pq.read_schema(p)
        except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for damaged files
            raise ValueError(f"{option}: {p} is not a readable parquet file ({type(err).__name__}: {err})") from None
        if first is None:
            first = (p, schema)
        elif set(schema.names) != set(first[1].names):
            raise ValueError(f"{option}: {p} has columns {sorted(schema.names)}, {first[0]} has "
                             f"{sorted(first[1].names)}; one source must have one schema")


def _has_a_line(path: str) -> bool:
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def jsonl_items(f):
    """``(line number from 0, parsed item or its json.JSONDecodeError)`` for each non-blank line of an open JSONL
    file: a malformed line is reported, not raised (the LLaVA loader and the line-by-line JSONL table share it)."""
    for n, line in enumerate(f):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as err:
            yield n, err


def _jsonl_rows(path: str, keys: tuple[str, ...], stamp: str):  # noqa: ARG001 (stamp: part of the datasets cache key)
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, item in jsonl_items(f):
            error = (f"invalid JSON line: {item.msg}" if isinstance(item, json.JSONDecodeError) else
                     None if isinstance(item, dict) else f"record is a {type(item).__name__}, not an object")
            if error is None:
                yield {**{k: item.get(k) for k in keys}, ERROR_KEY: None}
            else:
                yield {**dict.fromkeys(keys), ERROR_KEY: f"line {n + 1} of {os.path.basename(path)}: {error}"}


def _jsonl_lines_table(path: str, streaming: bool, cache_dir: str | None) -> Any:
    """A JSONL file read line by line -> a table whose malformed lines are rows with ``ERROR_KEY`` set (counted as
    bad records by the readers, like the LLaVA loader's), instead of datasets' error for the whole file. One pass
    collects the columns; streaming then parses lines as they are read."""
    import datasets

    keys: dict[str, None] = {}
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for _, item in jsonl_items(f):
            if isinstance(item, dict):
                keys.update(dict.fromkeys(item))
            else:
                bad += 1
    if bad:
        logger.warning("%s: %d malformed line(s); they are skipped and counted as bad records", path, bad)
    stamp = f"{os.path.getsize(path)}:{os.path.getmtime(path)}"  # the Arrow cache key follows the file
    kwargs = {"gen_kwargs": {"path": path, "keys": tuple(keys), "stamp": stamp}}  # a list would be split in shards
    if streaming:
        return datasets.IterableDataset.from_generator(_jsonl_rows, **kwargs)
    return datasets.Dataset.from_generator(_jsonl_rows, cache_dir=cache_dir, **kwargs)


def table_columns(ds: Any) -> list[str]:
    columns = list(ds.column_names or (ds.features or {}).keys())
    if not columns:  # a streaming dataset after .map() may not know its columns until it reads a record
        columns = list(next(iter(ds.take(1)), {}).keys())
    return columns


def keep_image_bytes(ds: Any, image_key: str) -> Any:
    """Keep raw bytes: we decode (and count failures) ourselves instead of letting datasets raise mid-iteration."""
    import datasets

    if ds.features is not None and isinstance(ds.features.get(image_key), datasets.Image):
        ds = ds.cast_column(image_key, datasets.Image(decode=False))
    return ds


def pick_key(explicit: str | None, candidates: tuple[str, ...], columns: list[str], what: str, option: str,
             required: bool = True) -> str | None:
    if explicit is not None:
        if explicit not in columns:
            raise ValueError(f"{option}={explicit!r} is not a column of the dataset (columns: {', '.join(columns)})")
        return explicit
    for key in candidates:
        if key in columns:
            return key
    if not required:
        return None
    raise ValueError(f"cannot find the {what} column among {', '.join(columns)}; set {option}")


def folder_table(paths: list[str], option: str = "data") -> Any:
    """Image folders -> ``Dataset`` with ``image`` (absolute path) and ``text`` (None when there is no caption)."""
    import datasets

    images: list[str] = []
    texts: list[str | None] = []
    for folder in paths:
        if not os.path.isdir(folder):
            raise ValueError(f"{option}.format=folder expects directories, got {folder}")
        folder = str(Path(folder).resolve())  # absolute paths: workers and resumed runs may have another cwd
        mapping = caption_mapping(Path(folder))
        files = sorted(str(p) for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        for f in files:
            rel = os.path.relpath(f, folder)
            caption = mapping.get(rel)
            if caption is None:
                sidecar = Path(f).with_suffix(".txt")
                caption = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else None
            images.append(f)
            texts.append(caption)  # None -> counted as a bad record ("no caption") when read
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {', '.join(paths)}")
    return datasets.Dataset.from_dict({"image": images, "text": texts},
                                      features=datasets.Features({"image": datasets.Value("string"),
                                                                  "text": datasets.Value("string")}))


def caption_mapping(folder: Path) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for name in CAPTION_FILES:
        path = folder / name
        if not path.is_file():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = next(row[k] for k in ("file_name", "image", "file", "path") if k in row)
                text = next(row[k] for k in TEXT_KEYS if k in row)
            except (json.JSONDecodeError, StopIteration, TypeError) as err:
                raise ValueError(f"{path}:{n}: expected {{\"file_name\": ..., \"text\": ...}} ({err!r})") from None
            mapping[os.path.normpath(key)] = text
    return mapping


# ================================================================================================ record decoding
class BadRecord(Exception):
    """A record that cannot be used; the message is the reason shown to the user."""


def load_image(value: Any, root: str | None) -> tuple[Image.Image, str]:
    """Decode an image cell (path, bytes, datasets Image struct, PIL) -> (fully loaded PIL image, identifier)."""
    def resolve(path: str) -> str:
        return path if os.path.isabs(path) or root is None else os.path.join(root, path)

    ident = "<bytes>"
    try:
        if isinstance(value, Image.Image):
            value.load()
            img = to_rgb(value)
        else:
            if isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
                if value.get("bytes") is not None:
                    ident = value.get("path") or ident
                    source = io.BytesIO(value["bytes"])
                else:
                    source = ident = resolve(value["path"])
            elif isinstance(value, (bytes, bytearray, memoryview)):
                source = io.BytesIO(bytes(value))
            elif isinstance(value, str):
                source = ident = resolve(value)
            elif value is None:
                raise BadRecord("no image")
            else:
                raise BadRecord(f"unsupported image value of type {type(value).__name__}")
            img = open_image(source, ident)  # decoded now: truncated files fail here, inside the try
    except BadRecord:
        raise
    except FileNotFoundError as err:
        raise BadRecord(f"image file not found: {err.filename or ident}") from None
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise BadRecord(f"cannot decode image {ident}: {type(err).__name__}: {err}") from None
    if img.width < 1 or img.height < 1:
        raise BadRecord(f"empty image {ident}")
    return img, ident


def pick_caption(value: Any, rng: np.random.Generator) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return value[int(rng.integers(len(value)))]  # several captions per image: pick one per visit
    raise BadRecord("no caption" if value is None or (isinstance(value, (list, tuple)) and not value)
                    else f"unsupported caption of type {type(value).__name__}")


def path_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path")
    return None


# ================================================================================================ bad-record accounting
@dataclass
class BadRecordStats:
    seen: int = 0
    bad: int = 0
    reasons: Counter = field(default_factory=Counter)

    def summary(self, top: int = 3) -> str:
        common = "; ".join(f"{n}x {r}" for r, n in self.reasons.most_common(top))
        return f"{self.bad}/{self.seen} records skipped" + (f" ({common})" if common else "")

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "bad": self.bad, "reasons": dict(self.reasons)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.bad, self.reasons = int(state["seen"]), int(state["bad"]), Counter(state["reasons"])


def reason_class(reason: str) -> str:
    """Group reasons for counting: drop the file-specific tail ("cannot decode image a.png: X" -> "... X")."""
    reason = re.sub(r"image file not found: .*", "image file not found", reason)
    reason = re.sub(r"cannot decode image .*?: (\w+):.*", r"cannot decode image (\1)", reason)
    return re.sub(r"^line \d+ of \S+: ", "", reason)


__all__ = ["IMAGE_EXTENSIONS", "IMAGE_KEYS", "TEXT_KEYS", "CAPTION_FILES", "ROOT_KEY", "expand_paths", "detect_format",
           "load_table", "table_columns", "keep_image_bytes", "pick_key", "folder_table", "caption_mapping",
           "BadRecord", "load_image", "pick_caption", "path_of", "BadRecordStats", "reason_class"]
