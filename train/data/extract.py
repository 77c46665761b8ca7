"""``unitok extract-codes``: run a UniTok tokenizer over a dataset once and store the codes next to the records.

    unitok extract-codes --tokenizer ckpt/unitok --data data/pairs.jsonl --out data/pairs_codes --batch-size 64
    accelerate launch -m unitok_cli extract-codes ...        # several processes / GPUs

The input (pairs: JSONL / parquet / webdataset / image folder; chat: LLaVA JSON/JSONL) is cut into shards of
``--shard-size`` consecutive records; process r of W takes shards r, r+W, ... Each shard becomes
``OUT/codes-<k>-of-<n>.parquet`` with the original fields and a ``codes`` column (``[K][N]`` per pair record,
``[M][K][N]`` per conversation, int16 when the codebook allows), written to a temporary file and renamed, so a
finished file is always complete. Records whose image cannot be read are left out and counted. ``OUT/extract.json``
records the extraction (the input files, their format and count, the shard size, the tokenizer's shape and the sha256
of its weights). A re-run of the same extraction skips finished shards (resume after an interruption); any other
extraction into a folder holding shards or settings is refused, naming what differs, instead of mixing shards of two
extractions (``--overwrite`` deletes them first).

Training reads the result as a parquet source (``paths: [OUT/*.parquet]``): the ``codes`` column is used automatically.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from tokenizer.checkpoint import claim_output
from train.common.checkpoint import file_sha256
from train.common.datasources import (IMAGE_KEYS, ROOT_KEY, BadRecord, expand_paths, keep_image_bytes, load_image,
                                      pick_key, reason_class, table_columns)

from .config import SourceConfig
from .sources import ERROR_KEY, build_table, image_list

logger = logging.getLogger(__name__)

META_NAME = "extract.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", required=True, help="UniTok folder (save_pretrained) or official .pth")
    p.add_argument("--preset", default=None, help="tokenizer config preset for an official .pth")
    p.add_argument("--causal-projection", action="store_true", help="the February-2025 tokenizer checkpoint")
    p.add_argument("--data", required=True, nargs="+", help="input files, folders or globs ({000..009} ranges ok)")
    p.add_argument("--out", required=True, help="output folder for the parquet shards")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the shards and settings of another extraction in --out first")
    p.add_argument("--format", default="auto", choices=["auto", "jsonl", "parquet", "webdataset", "folder", "llava"])
    p.add_argument("--kind", default="auto", choices=["auto", "pairs", "chat"],
                   help="pairs: one image per record; chat: LLaVA conversations (auto: from the data)")
    p.add_argument("--image-key", default=None, help="image column (auto: image, jpg, png, ...)")
    p.add_argument("--image-folder", default=None, help="base folder of relative image paths")
    p.add_argument("--batch-size", type=int, default=32, help="images per tokenizer call")
    p.add_argument("--num-workers", type=int, default=4, help="image decoding workers per process")
    p.add_argument("--shard-size", type=int, default=10_000, help="input records per output shard")
    p.add_argument("--resize-ratio", type=float, default=1.125,
                   help="shorter side resized to image_size*ratio, then centre-cropped (tokenizer preprocessing)")
    p.add_argument("--drop-columns", nargs="*", default=[], help="input columns not to copy (e.g. image bytes)")
    p.add_argument("--cache-dir", default=None, help="datasets' Arrow cache")


def _detect_kind(paths: list[str], fmt: str) -> str:
    if fmt == "llava":
        return "chat"
    for p in paths:
        if p.endswith((".json", ".jsonl")) and os.path.isfile(p):
            with open(p, encoding="utf-8", errors="replace") as f:
                if '"conversations"' in f.read(1 << 16):
                    return "chat"
    return "pairs"


class _Items(torch.utils.data.Dataset):
    """Record j of a shard -> (j, pixels [n, 3, S, S] or None, reason or None)."""

    def __init__(self, ds, start: int, stop: int, image_key: str, root_key: str | None, image_root: str | None,
                 chat: bool, image_size: int, resize_ratio: float) -> None:
        self.ds, self.start, self.stop = ds, start, stop
        self.image_key, self.root_key, self.image_root = image_key, root_key, image_root
        self.chat, self.image_size, self.resize_ratio = chat, image_size, resize_ratio

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, j: int) -> tuple[int, Any, str | None]:
        from tokenizer.image import preprocess

        row = self.ds[self.start + j]
        try:
            if row.get(ERROR_KEY):
                raise BadRecord(row[ERROR_KEY])
            values = image_list(row.get(self.image_key)) if self.chat else [row.get(self.image_key)]
            root = self.image_root or (row.get(self.root_key) if self.root_key else None)
            pixels = []
            for v in values:
                img, _ = load_image(v, root)
                try:
                    pixels.append(preprocess(img, self.image_size, self.resize_ratio))
                except Exception as err:
                    raise BadRecord(f"cannot decode image: {type(err).__name__}: {err}") from None
        except BadRecord as err:
            return j, None, str(err)
        return j, torch.stack(pixels) if pixels else torch.zeros(0, 3, self.image_size, self.image_size), None


def _collate(items):
    return items


def shard_name(k: int, n: int) -> str:
    return f"codes-{k:05d}-of-{n:05d}.parquet"


OWNED = (META_NAME, "codes-*-of-*.parquet", ".codes-*.parquet.tmp")  # what an extraction writes into --out
SAME_EXTRACTION = ("data", "format", "kind", "num_records", "shard_size", "tokenizer", "tokenizer_sha256")


def tokenizer_digest(path: str | Path) -> str:
    """sha256 over the tokenizer's files (a .pth, or a save_pretrained folder): two tokenizers of one shape must not
    share an output folder."""
    path = Path(path)
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{file_sha256(f)}\n".encode())
    return h.hexdigest()


def claim_extraction(out: Path, meta: dict, is_main: bool, overwrite: bool) -> bool:
    """Every process checks ``out`` before any writes: the same extraction is resumed; the output of any other
    (other settings, an unreadable settings file, shards without one) is refused, or with ``overwrite`` deleted by
    the main process. Returns whether the settings file is to be (re)written."""
    path = out / META_NAME
    if not path.is_file():  # shards without settings: not an extraction this command can resume
        claim_output(out, overwrite, OWNED, remove=is_main)
        return True
    try:
        old = json.loads(path.read_text())
        # tokenizer_sha256 is absent from extractions written before it was recorded: not a difference
        diff = [k for k in SAME_EXTRACTION if old.get(k) != meta.get(k) and (k in old or k != "tokenizer_sha256")]
        why = "; ".join(f"{k}: {old.get(k)} in {META_NAME}, {meta.get(k)} now" for k in diff[:3])
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        diff, why = ["unreadable"], f"{META_NAME} is unreadable: {err}"
    if diff and not overwrite:
        raise FileExistsError(f"{out} holds an extraction with other settings ({why}): pass --overwrite to "
                              "replace it, or choose another --out")
    if diff:
        claim_output(out, True, OWNED, remove=is_main)
    return bool(diff)


def run(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from accelerate import PartialState

    from tokenizer.cli import load_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.batch_size < 1 or args.shard_size < 1 or args.num_workers < 0:
        raise ValueError("--batch-size and --shard-size must be >= 1, --num-workers >= 0")
    state = PartialState()
    rank, world = state.process_index, state.num_processes
    paths = expand_paths(args.data, option="--data")
    kind = _detect_kind(paths, args.format) if args.kind == "auto" else args.kind
    chat = kind == "chat"
    src = SourceConfig(name="extract", kind="chat" if chat else "i2t", paths=paths, format=args.format,
                       image_folder=args.image_folder)
    ds, fmt, root_key, image_root = build_table(src, args.cache_dir)
    columns = table_columns(ds)
    image_key = pick_key(args.image_key, IMAGE_KEYS + ("images",), columns, "image", "--image-key")
    ds = keep_image_bytes(ds, image_key)

    tok = load_tokenizer(args.tokenizer, args.preset, args.causal_projection).to(state.device).eval()
    tc = tok.config
    K, N, V, S = tc.num_codebooks, tc.num_positions, tc.codebook_size, tc.image_size
    code_type = pa.int16() if V <= 2 ** 15 else pa.int32()
    codes_type = pa.list_(pa.list_(code_type))
    if chat:
        codes_type = pa.list_(codes_type)

    n = len(ds)
    num_shards = max(1, math.ceil(n / args.shard_size))
    out = Path(args.out)
    meta = {"data": [str(Path(p).resolve()) for p in paths], "format": fmt, "kind": kind, "num_records": n,
            "shard_size": args.shard_size, "num_shards": num_shards,
            "tokenizer": {"num_codebooks": K, "codebook_size": V, "num_positions": N, "image_size": S},
            "tokenizer_sha256": tokenizer_digest(args.tokenizer)}
    write_meta = claim_extraction(out, meta, state.is_main_process, args.overwrite)
    state.wait_for_everyone()  # every process has checked, and another extraction is gone (--overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if state.is_main_process and write_meta:
        tmp = out / f".{META_NAME}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, out / META_NAME)

    mine = range(rank, num_shards, world)
    written = skipped = records = 0
    bad: Counter = Counter()
    for k in mine:
        final = out / shard_name(k, num_shards)
        if final.exists():
            skipped += 1
            continue
        start, stop = k * args.shard_size, min(n, (k + 1) * args.shard_size)
        items = _Items(ds, start, stop, image_key, root_key, image_root, chat, S, args.resize_ratio)
        loader = torch.utils.data.DataLoader(items, batch_size=args.batch_size, num_workers=args.num_workers,
                                             collate_fn=_collate)
        good: list[int] = []
        codes: list[Any] = []
        for batch in loader:
            ok = [(j, px) for j, px, reason in batch if reason is None]
            for _, _, reason in batch:
                if reason is not None:
                    bad[reason_class(reason)] += 1
            if not ok:
                continue
            pixels = torch.cat([px for _, px in ok])
            enc = [tok.encode(c.to(state.device)).flatten(2).cpu() for c in pixels.split(args.batch_size)] \
                if len(pixels) else []
            flat = torch.cat(enc).to(torch.int32).numpy() if enc else None
            at = 0
            for j, px in ok:
                m = px.shape[0]
                these = flat[at:at + m].tolist() if m else []
                at += m
                good.append(j)
                codes.append(these if chat else these[0])
        table = ds.with_format("arrow")[start:stop]
        table = table.take(pa.array(good, type=pa.int64()))
        drop = [c for c in (ROOT_KEY, ERROR_KEY, "codes", *args.drop_columns) if c in table.column_names]
        table = table.drop_columns(drop).append_column("codes", pa.array(codes, type=codes_type))
        # datasets' feature metadata would not describe `codes`: let readers infer the schema from Arrow
        schema_meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"huggingface"}
        table = table.replace_schema_metadata({**schema_meta, b"unitok_codes": json.dumps(meta["tokenizer"]).encode()})
        tmp = out / f".{final.name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, final)
        written += 1
        records += len(good)
        logger.info("[%d/%d] %s: %d records, %d skipped so far", rank, world, final.name, len(good), sum(bad.values()))
    summary = "; ".join(f"{c}x {r}" for r, c in bad.most_common())
    logger.info("[%d/%d] extract-codes: %d shards written (%d records), %d already done; %d records skipped%s",
                rank, world, written, records, skipped, sum(bad.values()), f" ({summary})" if summary else "")
    state.wait_for_everyone()
    return 0


__all__ = ["add_arguments", "run", "shard_name"]
