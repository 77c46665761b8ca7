"""Image-text training data for the tokenizer, read through HF ``datasets``.

Sources (``data.format``, or ``auto`` from the paths):

* ``folder``: a directory of images with captions in ``<name>.txt`` sidecars, or a ``captions.jsonl`` /
  ``metadata.jsonl`` mapping ``{"file_name": "a.png", "text": "..."}`` (``image``/``file`` and ``caption`` work too);
* ``jsonl``: ``{"image": path, "text": ...}`` per line, paths relative to the JSONL file (or ``data.image_root``);
* ``parquet``: an image column holding bytes, a path, or datasets' ``Image`` struct, plus a text column;
* ``webdataset``: tar shards (``load_dataset("webdataset", data_files=...)``), e.g. ``{000..139}.tar``;
* ``shapes``: no files: shapes-world scenes (``shapes/world.py``) drawn and rendered on the fly, deterministic in
  ``data.shapes_seed`` (:class:`ShapesDataset`).

Images are decoded here, not by ``datasets``, so that an unreadable record is skipped with its reason and counted
instead of crashing a worker (:class:`BadRecordStats`).

Determinism and resume. Every rank reads an endless sequence of records: epoch ``e`` is a seeded permutation of the
dataset (or, in streaming mode, a seeded buffer shuffle), split across ranks. A record's random crop is drawn from a
generator seeded by (seed, epoch, rank, position), never from a worker's RNG, so the data does not depend on the number
of workers or on where the run was interrupted. The stream's position is (epoch, index of the next record); a batch
is the next ``batch_size`` readable records, assembled in the main process, so a checkpoint that saves the position
after a batch resumes with exactly the next batch.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from train.common.datasources import (ERROR_KEY, IMAGE_EXTENSIONS, IMAGE_KEYS, TEXT_KEYS,  # noqa: F401 (re-exported)
                                      BadRecord, BadRecordStats, detect_format, expand_paths, folder_table, keep_image_bytes,
                                      load_image, load_table, path_of as _path_of, pick_caption as _caption,
                                      pick_key as _pick_key, reason_class as _reason_class, table_columns)

from train.common.record_stream import BadRecordPolicy, check_world_size, rank_epoch_order, rank_stream, record_rng

from .config import DataConfig

logger = logging.getLogger(__name__)


# ================================================================================================ transform
class RandomResizedCrop:
    """torchvision ``RandomResizedCrop`` (PIL path) + ToTensor + Normalize(0.5, 0.5), in PIL/numpy/torch.

    Same sampling procedure as ``RandomResizedCrop.get_params``: up to 10 tries of an area fraction from ``scale`` and
    a log-uniform aspect ratio from ``ratio``, else a centre crop clamped to the ratio range. The crop is resized with
    PIL bicubic, like torchvision on PIL input. The generator is passed in so the crop is a function of the record.
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.9, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.size = size
        self.scale = scale
        self.ratio = ratio

    def params(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                i = int(rng.integers(0, height - h + 1))
                j = int(rng.integers(0, width - w + 1))
                return i, j, h, w
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        img = img.convert("RGB")  # before resizing: palette images would otherwise be resampled with NEAREST
        i, j, h, w = self.params(img.width, img.height, rng)
        img = img.crop((j, i, j + w, i + h)).resize((self.size, self.size), Image.BICUBIC)
        return to_tensor(img)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float32 [3,H,W] in [-1,1] (ToTensor then Normalize(mean=std=0.5))."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


# ================================================================================================ sources
@dataclass
class Source:
    """A datasets ``Dataset`` (or ``IterableDataset`` when streaming) with the columns to read."""
    dataset: Any
    image_key: str
    text_key: str
    format: str
    root_key: str | None = None   # column with the base dir of relative image paths
    image_root: str | None = None

    @property
    def streaming(self) -> bool:
        if isinstance(self.dataset, ShapesDataset):
            return False
        import datasets

        return isinstance(self.dataset, datasets.IterableDataset)

    def __len__(self) -> int:
        if self.streaming:
            raise TypeError("a streaming source has no length")
        return len(self.dataset)


class ShapesDataset:
    """A virtual map-style dataset of shapes-world scenes: item ``i`` -> ``{"image": PIL render, "text": captions,
    "__key__": scene id}``, a pure function of ``(seed, split, i)``.

    Scenes are drawn with ``world.make_scene`` from a generator seeded by ``(seed, split, i)`` until one whose layout
    hashes to ``split`` (``world.scene_split``), so train records never share a layout with the test split that
    ``world.generate_split("test", ...)`` draws. Rendering is exact (no anti-aliasing) at the world canvas, 64 px.
    """

    def __init__(self, n: int, split: str = "train", seed: int = 0) -> None:
        from shapes.world import SPLITS

        if split not in SPLITS:
            raise ValueError(f"shapes split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.n, self.split, self.seed = int(n), split, int(seed)
        self.split_index = SPLITS.index(split)

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        from shapes.world import make_scene, scene_split

        rng = np.random.default_rng([self.seed, self.split_index, int(i), 0x5A9E])
        while True:
            scene = make_scene(rng)
            if scene_split(scene) == self.split:
                return scene

    def __getitem__(self, i: int) -> dict[str, Any]:
        from shapes.world import captions, render

        scene = self.scene(int(i))
        return {"image": render(scene), "text": captions(scene), "__key__": scene.id}


class FullImage:
    """The whole image, resized to ``size`` only when it differs (bicubic): the shapes world trains on exact renders,
    the images the detector and the demo evaluate, not on crops."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        img = img.convert("RGB")
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BICUBIC)
        return to_tensor(img)


def build_source(cfg: DataConfig) -> Source:
    if cfg.format == "shapes":
        if cfg.paths:
            raise ValueError("data.format=shapes renders its images: leave data.paths empty")
        return Source(ShapesDataset(cfg.shapes_scenes, cfg.shapes_split, cfg.shapes_seed), "image", "text", "shapes")
    if not cfg.paths:
        raise ValueError("data.paths is empty: give image folders, JSONL/parquet files or webdataset shards")
    paths = expand_paths(cfg.paths)
    fmt = detect_format(paths) if cfg.format == "auto" else cfg.format
    if fmt == "folder":
        return Source(folder_table(paths), "image", "text", "folder")
    ds, root_key = load_table(paths, fmt, cfg.streaming, cfg.cache_dir)
    columns = table_columns(ds)
    image_key = _pick_key(cfg.image_key, IMAGE_KEYS, columns, "image", "data.image_key")
    text_key = _pick_key(cfg.text_key, TEXT_KEYS, columns, "text", "data.text_key")
    ds = keep_image_bytes(ds, image_key)
    # parquet/webdataset records carry no file of origin: relative image paths resolve against data.image_root,
    # else the directory of the first file.
    default_root = None if root_key else str(Path(paths[0]).resolve().parent)
    return Source(ds, image_key, text_key, fmt, root_key=root_key, image_root=cfg.image_root or default_root)


# ================================================================================================ record decoding
class RecordDecoder:
    """record dict -> {"ok": True, "image", "text"} or {"ok": False, "reason", "id"}; never raises for bad data."""

    def __init__(self, source: Source, transform: "RandomResizedCrop | FullImage") -> None:
        self.image_key = source.image_key
        self.text_key = source.text_key
        self.root_key = source.root_key
        self.image_root = source.image_root
        self.transform = transform

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        ident = str(record.get("__key__") or _path_of(record.get(self.image_key)) or "?")
        try:
            if record.get(ERROR_KEY):
                raise BadRecord(record[ERROR_KEY])
            root = self.image_root or (record.get(self.root_key) if self.root_key else None)
            img, ident = load_image(record.get(self.image_key), root)
            text = _caption(record.get(self.text_key), rng)
            image = self.transform(img, rng)
        except BadRecord as err:
            return {"ok": False, "reason": str(err), "id": ident}
        except Exception as err:  # a transform failure on a weird image is still a bad record, not a crash
            return {"ok": False, "reason": f"{type(err).__name__}: {err}", "id": ident}
        return {"ok": True, "image": image, "text": text, "id": ident}


# ================================================================================================ per-epoch readers
class _IndexedEpoch(torch.utils.data.Dataset):
    """Map-style: item j = record ``order[j]`` of this rank's epoch permutation, decoded."""

    def __init__(self, source: Source, decoder: RecordDecoder, order: np.ndarray, seed: int, epoch: int,
                 rank: int) -> None:
        self.dataset = source.dataset
        self.decoder = decoder
        self.order = order
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: int) -> dict[str, Any]:
        record = self.dataset[int(self.order[j])]
        out = self.decoder(record, record_rng(self.seed, self.epoch, self.rank, j))
        out["pos"] = j
        return out


class _StreamEpoch(torch.utils.data.IterableDataset):
    """Streaming: records ``offset, offset+1, ...`` of this rank's stream.

    Every DataLoader worker reads the same stream and decodes every W-th record; the DataLoader returns worker outputs
    round-robin, which restores stream order whatever the number of workers (``rank_stream`` reads with
    ``IterableDataset.iter``: ``__iter__`` would re-shard by worker inside a DataLoader and change the order).
    """

    def __init__(self, records: "functools.partial", decoder: RecordDecoder, offset: int, seed: int,
                 epoch: int, rank: int) -> None:
        self.records = records  # () -> this rank's records from ``offset`` on (``record_stream.rank_stream``)
        self.decoder = decoder
        self.offset = offset
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for j, record in enumerate(self.records()):
            if j % nw == w:  # assignment relative to the offset keeps the round-robin order exact after resume
                pos = self.offset + j
                out = self.decoder(record, record_rng(self.seed, self.epoch, self.rank, pos))
                out["pos"] = pos
                yield out


# ================================================================================================ the stream
class ImageTextStream:
    """Endless, resumable stream of ``{"images": [B,3,S,S], "texts": [str]*B}`` batches for one rank."""

    def __init__(self, cfg: DataConfig, source: Source, image_size: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.cfg = cfg
        self.source = source
        self.batch_size = batch_size
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        transform = (FullImage(image_size) if source.format == "shapes"
                     else RandomResizedCrop(image_size, cfg.crop_scale, cfg.crop_ratio))
        self.decoder = RecordDecoder(source, transform)
        self.epoch = 0
        self.offset = 0          # index (within this rank's epoch) of the next record to read
        self.stats = BadRecordStats()
        self.policy = BadRecordPolicy(cfg.max_bad_fraction, cfg.bad_check_min_records, cfg.log_bad_records,
                                      _reason_class)
        if not source.streaming and len(source) < world_size:
            raise ValueError(f"the dataset has {len(source)} records, fewer than the {world_size} processes")

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "stats": self.stats.state_dict(),
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_world_size(state, self.world_size)
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.stats.load_state_dict(state["stats"])

    # ---------------------------------------------------------------- epochs
    def _epoch_order(self, epoch: int) -> np.ndarray:
        seed = [self.seed, epoch] if self.cfg.shuffle else None
        return rank_epoch_order(len(self.source), self.rank, self.world_size, seed)

    def _epoch_loader(self, epoch: int, offset: int) -> torch.utils.data.DataLoader:
        # A private generator: creating the loader must not consume the global torch RNG, or a resumed run (which
        # creates it at a different step) would diverge from an uninterrupted one.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        common = dict(batch_size=None, num_workers=self.cfg.num_workers, generator=gen,
                      prefetch_factor=8 if self.cfg.num_workers else None)
        if self.source.streaming:
            # built in each worker (a partial pickles, an open iterator would not)
            records = functools.partial(rank_stream, self.source.dataset, self.rank, self.world_size,
                                        self.seed if self.cfg.shuffle else None, self.cfg.shuffle_buffer, epoch,
                                        offset)
            ds = _StreamEpoch(records, self.decoder, offset, self.seed, epoch, self.rank)
            return torch.utils.data.DataLoader(ds, **common)
        ds = _IndexedEpoch(self.source, self.decoder, self._epoch_order(epoch), self.seed, epoch, self.rank)
        return torch.utils.data.DataLoader(ds, sampler=range(offset, len(ds)), **common)

    # ---------------------------------------------------------------- batches
    def __iter__(self) -> Iterator[dict[str, Any]]:
        images: list[torch.Tensor] = []
        texts: list[str] = []
        while True:
            good_this_epoch, full_epoch = 0, self.offset == 0
            for item in self._epoch_loader(self.epoch, self.offset):
                self.offset = item["pos"] + 1
                self.policy.count(self.stats, None if item["ok"] else item["reason"],
                                  f"{item.get('id')} (epoch {self.epoch}, #{item['pos']})")
                if not item["ok"]:
                    continue
                good_this_epoch += 1
                images.append(item["image"])
                texts.append(item["text"])
                if len(images) == self.batch_size:
                    batch = {"images": torch.stack(images), "texts": texts}
                    images, texts = [], []
                    yield batch
            if full_epoch and good_this_epoch == 0:  # otherwise this loop would spin forever
                raise ValueError(f"no readable record in a whole epoch of the data ({self.stats.summary()})")
            self.epoch += 1
            self.offset = 0

def build_stream(cfg: DataConfig, image_size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, source: Source | None = None) -> ImageTextStream:
    source = build_source(cfg) if source is None else source
    return ImageTextStream(cfg, source, image_size, batch_size, seed, rank, world_size)


def describe(source: Source) -> str:
    n = "streaming" if source.streaming else f"{len(source):,} records"
    return f"{source.format} data, {n}, image column {source.image_key!r}, text column {source.text_key!r}"


__all__ = ["RandomResizedCrop", "to_tensor", "Source", "ShapesDataset", "FullImage", "build_source", "expand_paths", "detect_format", "BadRecord",
           "load_image", "RecordDecoder", "BadRecordStats", "ImageTextStream", "build_stream", "describe"]
