"""Image-text training data for the tokenizer, read through HF ``datasets``.

Sources (``data.format``, or ``auto`` from the paths):

* ``folder``: a directory of images with captions in ``<name>.txt`` sidecars, or a ``captions.jsonl`` /
  ``metadata.jsonl`` mapping ``{"file_name": "a.png", "text": "..."}`` (``image``/``file`` and ``caption`` work too);
* ``jsonl``: ``{"image": path, "text": ...}`` per line, paths relative to the JSONL file (or ``data.image_root``);
* ``parquet``: an image column holding bytes, a path, or datasets' ``Image`` struct, plus a text column;
* ``webdataset``: tar shards (``load_dataset("webdataset", data_files=...)``), e.g. ``{000..139}.tar``;
* ``shapes``: no files: shapes-world scenes (``eval/shapes/world.py``) drawn and rendered on the fly, deterministic in
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

import itertools
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
        from eval.shapes.world import SPLITS

        if split not in SPLITS:
            raise ValueError(f"shapes split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.n, self.split, self.seed = int(n), split, int(seed)
        self.split_index = SPLITS.index(split)

    def __len__(self) -> int:
        return self.n

    def scene(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        from eval.shapes.world import make_scene, scene_split

        rng = np.random.default_rng([self.seed, self.split_index, int(i), 0x5A9E])
        while True:
            scene = make_scene(rng)
            if scene_split(scene) == self.split:
                return scene

    def __getitem__(self, i: int) -> dict[str, Any]:
        from eval.shapes.world import captions, render

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


def record_rng(seed: int, epoch: int, rank: int, position: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, rank, position])


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
    round-robin, which restores stream order whatever the number of workers. ``IterableDataset.iter`` is used rather
    than ``__iter__`` because the latter re-shards by worker inside a DataLoader, which would change the order.
    """

    def __init__(self, stream: Any, decoder: RecordDecoder, offset: int, seed: int, epoch: int, rank: int) -> None:
        self.stream = stream
        self.decoder = decoder
        self.offset = offset
        self.seed, self.epoch, self.rank = seed, epoch, rank

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # Skip by reading, not with IterableDataset.skip: on a shuffled stream .skip() changes the shuffle order.
        records = itertools.islice(_flatten(self.stream.iter(batch_size=256)), self.offset, None)
        for j, record in enumerate(records):
            if j % nw == w:  # assignment relative to the offset keeps the round-robin order exact after resume
                pos = self.offset + j
                out = self.decoder(record, record_rng(self.seed, self.epoch, self.rank, pos))
                out["pos"] = pos
                yield out


def _flatten(chunks: Iterator[dict[str, list]]) -> Iterator[dict[str, Any]]:
    for chunk in chunks:
        n = len(next(iter(chunk.values())))
        for i in range(n):
            yield {k: v[i] for k, v in chunk.items()}


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
        if not source.streaming and len(source) < world_size:
            raise ValueError(f"the dataset has {len(source)} records, fewer than the {world_size} processes")

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "stats": self.stats.state_dict(),
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size:
            # The per-rank split (and so the position) depends on the world size.
            raise ValueError(f"the checkpoint's data position is for {state['world_size']} processes, "
                             f"this run has {self.world_size}; resume with the same number of processes")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self.stats.load_state_dict(state["stats"])

    # ---------------------------------------------------------------- epochs
    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.source)
        order = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.cfg.shuffle else np.arange(n))
        per_rank = n // self.world_size  # equal counts keep the ranks' epochs in step
        return order[self.rank::self.world_size][:per_rank]

    def _epoch_loader(self, epoch: int, offset: int) -> torch.utils.data.DataLoader:
        # A private generator: creating the loader must not consume the global torch RNG, or a resumed run (which
        # creates it at a different step) would diverge from an uninterrupted one.
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        common = dict(batch_size=None, num_workers=self.cfg.num_workers, generator=gen,
                      prefetch_factor=8 if self.cfg.num_workers else None)
        if self.source.streaming:
            stream = self.source.dataset
            if self.cfg.shuffle:
                stream = stream.shuffle(seed=self.seed, buffer_size=self.cfg.shuffle_buffer)
                stream.set_epoch(epoch)
            if self.world_size > 1:
                from datasets.distributed import split_dataset_by_node

                stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
            ds = _StreamEpoch(stream, self.decoder, offset, self.seed, epoch, self.rank)
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
                self.stats.seen += 1
                if not item["ok"]:
                    self._record_bad(item)
                self._check_bad_fraction()
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

    def _record_bad(self, item: dict[str, Any]) -> None:
        s = self.stats
        s.bad += 1
        s.reasons[_reason_class(item["reason"])] += 1
        if s.bad <= self.cfg.log_bad_records:
            logger.warning("skipping record %s (epoch %d, #%d): %s", item["id"], self.epoch, item["pos"], item["reason"])
            if s.bad == self.cfg.log_bad_records:
                logger.warning("further skipped records are only counted (data.log_bad_records=%d)",
                               self.cfg.log_bad_records)

    def _check_bad_fraction(self) -> None:
        s = self.stats
        if s.bad and s.seen >= self.cfg.bad_check_min_records and s.bad > self.cfg.max_bad_fraction * s.seen:
            raise ValueError(
                f"too many unreadable records: {s.bad} of {s.seen} ({s.bad / s.seen:.1%}) exceed "
                f"data.max_bad_fraction={self.cfg.max_bad_fraction:g}; most common reasons: "
                + "; ".join(f"{n}x {r}" for r, n in s.reasons.most_common(3))
                + ". Fix or filter the dataset, or raise data.max_bad_fraction.")


def build_stream(cfg: DataConfig, image_size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1, source: Source | None = None) -> ImageTextStream:
    source = build_source(cfg) if source is None else source
    return ImageTextStream(cfg, source, image_size, batch_size, seed, rank, world_size)


def describe(source: Source) -> str:
    n = "streaming" if source.streaming else f"{len(source):,} records"
    return f"{source.format} data, {n}, image column {source.image_key!r}, text column {source.text_key!r}"


__all__ = ["RandomResizedCrop", "to_tensor", "Source", "ShapesDataset", "FullImage", "build_source", "expand_paths", "detect_format", "BadRecord",
           "load_image", "RecordDecoder", "BadRecordStats", "ImageTextStream", "build_stream", "describe"]
