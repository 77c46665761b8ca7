"""The MLLM training stream: a seeded weighted mixture of sources -> samples -> padded or packed batches.

Order. Sample ``i`` of a rank comes from source ``s_i``, drawn with the mixture weights from a generator seeded by
(seed, rank, i // 4096); within a source, records are read in the order of a seeded per-epoch permutation split
across ranks (map-style), or in stream order after a seeded buffer shuffle (``streaming``). Everything random about a
record (which caption, text->image or image->text, CFG dropout) comes from a generator seeded by
(seed, rank, source, epoch, position). The stream is therefore a pure function of the seed and the position.

Long text. A text document longer than ``max_tokens`` becomes several samples, its consecutive chunks
(:meth:`SampleBuilder.build`); multimodal samples are never cut and an over-long one is a counted skip.

Resume. The position is (i, per source (epoch, offset), chunk): ``chunk`` chunks of record i were already used. It is
committed when a batch is yielded (for packing: the position before the sample that did not fit and is carried
over), so ``state_dict()`` after batch b and ``load_state_dict`` in a new run continue with exactly batch b+1. The
bad-record counters are part of the state.

Workers. Every DataLoader worker walks the same plan and builds every W-th sample; the DataLoader hands results back
round-robin, restoring plan order, so the batches do not depend on ``num_workers``.

Bad records (unreadable image, missing field, wrong ``<image>`` count, codes of the wrong shape or out of range, a
sample longer than ``max_tokens``) are skipped and counted per source and reason (:class:`DataStats`); more than
``max_bad_fraction`` of a source's records (once ``bad_check_min_records`` were read from it) stops the run.
"""
from __future__ import annotations

import copy
import itertools
import logging
from collections import Counter
from typing import Any, Iterator

import numpy as np
import torch

from mllm.processing import MLLMProcessor
from train.common.datasources import BadRecord, BadRecordStats, reason_class
from train.common.record_stream import (BadRecordPolicy, check_world_size, rank_epoch_order, rank_stream,
                                        record_rng)

from .collate import MLLMCollator, encode_pending_images
from .config import MLLMDataConfig
from .samples import SampleBuilder
from .sources import MixtureSource, build_sources

logger = logging.getLogger(__name__)

CHOICE_BLOCK = 4096
STATE_VERSION = 2
# reasons counted without their record-specific detail (the full reason is logged for the first records)
_GROUPED = ("image count mismatch", "bad codes shape", "bad codes dtype", "bad conversation", "codes out of range",
            "cannot decode image:", "malformed record")


def group_reason(reason: str) -> str:
    reason = reason_class(reason)
    for prefix in _GROUPED:
        if reason.startswith(prefix):
            return prefix.rstrip(":")
    return reason


# ================================================================================================ statistics
class DataStats:
    """Per-source counters: records read (``seen``), skipped (``bad``, by reason) and usable (``good``)."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.sources = {n: BadRecordStats() for n in names}
        self.good = Counter({n: 0 for n in names})

    @property
    def seen(self) -> int:
        return sum(s.seen for s in self.sources.values())

    @property
    def bad(self) -> int:
        return sum(s.bad for s in self.sources.values())

    @property
    def reasons(self) -> Counter:
        total: Counter = Counter()
        for s in self.sources.values():
            total.update(s.reasons)
        return total

    def summary(self, top: int = 3) -> str:
        parts = [f"{n}: {s.summary(top)}" for n, s in self.sources.items() if s.seen]
        return "; ".join(parts) or "no records read"

    def as_dict(self) -> dict[str, float]:
        """Flat counters for a metrics logger: ``data/seen``, ``data/bad``, ``data/bad/<reason>``,
        ``data/<source>/{seen,bad,good}``."""
        out: dict[str, float] = {"data/seen": self.seen, "data/bad": self.bad}
        for reason, n in self.reasons.items():
            out[f"data/bad/{reason}"] = n
        for name, s in self.sources.items():
            out[f"data/{name}/seen"], out[f"data/{name}/bad"] = s.seen, s.bad
            out[f"data/{name}/good"] = self.good[name]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {n: {**s.state_dict(), "good": self.good[n]} for n, s in self.sources.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, s in state.items():
            self.sources[n].load_state_dict(s)
            self.good[n] = int(s.get("good", 0))


# ================================================================================================ the plan
def mixture_weights(sources: list[MixtureSource]) -> np.ndarray:
    w = np.array([s.cfg.weight for s in sources], dtype=np.float64)
    return w / w.sum()


class _Plan:
    """Walks the mixture from a position: yields (i, source, epoch, pos, row or None) in plan order."""

    def __init__(self, sources: list[MixtureSource], seed: int, rank: int, world_size: int) -> None:
        self.sources, self.seed, self.rank, self.world_size = sources, seed, rank, world_size
        self.weights = mixture_weights(sources)
        self._block = (-1, None)
        self._orders: dict[int, tuple[int, np.ndarray]] = {}

    def choice(self, i: int) -> int:
        b = i // CHOICE_BLOCK
        if self._block[0] != b:
            rng = np.random.default_rng([self.seed, self.rank, b, 0x3A1])
            self._block = (b, rng.choice(len(self.sources), size=CHOICE_BLOCK, p=self.weights))
        return int(self._block[1][i % CHOICE_BLOCK])

    def order(self, s: int, epoch: int) -> np.ndarray:
        cached = self._orders.get(s)
        if cached is None or cached[0] != epoch:
            src = self.sources[s]
            seed = [self.seed, s, epoch, 0x5EED] if src.cfg.shuffle else None
            order = rank_epoch_order(len(src), self.rank, self.world_size, seed, f"data.sources[{src.name}]")
            self._orders[s] = cached = (epoch, order)
        return cached[1]

    def stream(self, s: int, epoch: int, offset: int) -> Iterator[dict]:
        src = self.sources[s]
        return rank_stream(src.dataset, self.rank, self.world_size,
                           self.seed + 7919 * s if src.cfg.shuffle else None, src.cfg.shuffle_buffer, epoch, offset)

    def walk(self, sample: int, positions: list[list[int]], want) -> Iterator[tuple]:
        """``want(i)``: whether the caller builds sample i (map-style rows are only read then)."""
        positions = [list(p) for p in positions]
        streams: dict[int, Iterator[dict]] = {}
        for i in itertools.count(sample):
            s = self.choice(i)
            src = self.sources[s]
            epoch, pos = positions[s]
            row = None
            if src.streaming:
                it = streams.get(s)
                if it is None:
                    it = streams[s] = self.stream(s, epoch, pos)
                row = next(it, None)
                if row is None:  # end of the stream: next epoch
                    epoch, pos = epoch + 1, 0
                    it = streams[s] = self.stream(s, epoch, 0)
                    row = next(it, None)
                    if row is None:
                        raise ValueError(f"data.sources[{src.name}] yields no records")
            else:
                order = self.order(s, epoch)
                if pos >= len(order):
                    epoch, pos = epoch + 1, 0
                    order = self.order(s, epoch)
                if want(i):
                    row = src.dataset[int(order[pos])]
            positions[s] = [epoch, pos + 1]
            yield i, s, epoch, pos, row


def record_rng_of(seed: int, rank: int, source: int, epoch: int, pos: int) -> np.random.Generator:
    return record_rng(seed, rank, source, epoch, pos, 0xDA7A)


class _SampleStream(torch.utils.data.IterableDataset):
    """Plan items built into samples: ``{"i", "s", "epoch", "pos", "samples"}`` (one sample, or the chunks of a long
    text document) or ``{..., "reason", "id"}``."""

    def __init__(self, plan: _Plan, builders: list[SampleBuilder], sample: int, positions: list[list[int]]) -> None:
        self.plan, self.builders = plan, builders
        self.sample, self.positions = sample, positions

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        w, nw = (info.id, info.num_workers) if info is not None else (0, 1)

        def want(i: int) -> bool:
            return (i - self.sample) % nw == w

        for i, s, epoch, pos, row in self.plan.walk(self.sample, self.positions, want):
            if not want(i):
                continue
            item: dict[str, Any] = {"i": i, "s": s, "epoch": epoch, "pos": pos}
            source = self.plan.sources[s]
            rng = record_rng_of(self.plan.seed, self.plan.rank, s, epoch, pos)
            try:
                record = source.reader(row, rng)
                item["samples"] = self.builders[s].build(record, rng)
            except BadRecord as err:
                item["reason"], item["id"] = str(err), _ident(source, row)
            except (TypeError, ValueError, KeyError, AttributeError, IndexError, OSError) as err:
                # a value of an unexpected type or shape: still a bad record, not a crash of the run
                item["reason"], item["id"] = f"malformed record ({type(err).__name__}: {err})", _ident(source, row)
            yield item


def _ident(source: MixtureSource, row: Any) -> str:
    if not isinstance(row, dict):
        return "?"
    for key in ("id", "__key__", "image", "file_name"):
        if isinstance(row.get(key), str):
            return row[key]
    return "?"


def _identity(x):
    return x


# ================================================================================================ the loader
class MLLMDataLoader:
    """Endless, resumable batches of one rank: ``for batch in loader`` (pop ``batch["counts"]`` before the model).

    ``image_tokenizer`` (a :class:`tokenizer.UniTok`, on the device to encode on) turns raw images into codes in the
    main process; without it every source must carry precomputed codes."""

    def __init__(self, cfg: MLLMDataConfig, processor: MLLMProcessor, rank: int = 0, world_size: int = 1,
                 image_tokenizer=None, sources: list[MixtureSource] | None = None) -> None:
        self.cfg, self.processor = cfg, processor
        self.rank, self.world_size = rank, world_size
        self.image_tokenizer = image_tokenizer
        self.sources = build_sources(cfg.sources, cfg.cache_dir) if sources is None else sources
        image_size = cfg.image_size or (image_tokenizer.config.image_size if image_tokenizer is not None else None)
        self.builders = [SampleBuilder(processor, s.cfg, cfg, image_size, cfg.max_tokens) for s in self.sources]
        self.collator = MLLMCollator.from_processor(processor, cfg.batching, cfg.max_tokens, cfg.pad_to_multiple_of)
        self.stats = DataStats([s.name for s in self.sources])
        self.policy = BadRecordPolicy(cfg.max_bad_fraction, cfg.bad_check_min_records, cfg.log_bad_records,
                                      group_reason)
        self.sample = 0  # plan index of the next sample
        self.positions = [[0, 0] for _ in self.sources]  # per source: epoch, offset of the next record
        self.chunk = 0  # samples (text chunks) of record ``sample`` already used
        self.batches = 0

    def describe(self) -> str:
        return "\n".join(s.describe() for s in self.sources)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "seed": self.cfg.seed, "rank": self.rank, "world_size": self.world_size,
                "sources": [s.name for s in self.sources], "weights": [s.cfg.weight for s in self.sources],
                "sample": self.sample, "chunk": self.chunk,
                "positions": copy.deepcopy(self.positions), "batches": self.batches,
                "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_world_size(state, self.world_size)
        names = [s.name for s in self.sources]
        if state.get("sources") != names or state.get("seed") != self.cfg.seed:
            raise ValueError(f"the checkpoint's data mixture (sources {state.get('sources')}, seed "
                             f"{state.get('seed')}) differs from this run's ({names}, seed {self.cfg.seed}); the data "
                             "position cannot be restored")
        weights = [s.cfg.weight for s in self.sources]
        if state.get("weights", weights) != weights:
            logger.warning("the data mixture weights changed since the checkpoint (%s -> %s): the stream continues "
                           "from the saved position with the new weights", state.get("weights"), weights)
        self.sample = int(state["sample"])
        self.positions = [[int(e), int(o)] for e, o in state["positions"]]
        self.chunk = int(state.get("chunk", 0))
        self.batches = int(state.get("batches", 0))
        self.stats = DataStats(names)
        self.stats.load_state_dict(state["stats"])

    def _snapshot(self) -> tuple:
        return self.sample, copy.deepcopy(self.positions), self.chunk, copy.deepcopy(self.stats.state_dict())

    def _restore(self, snap: tuple) -> None:
        self.sample, self.positions, self.chunk = snap[0], snap[1], snap[2]
        self.stats = DataStats([s.name for s in self.sources])
        self.stats.load_state_dict(snap[3])

    # ---------------------------------------------------------------- iteration
    def _items(self) -> Iterator[dict]:
        plan = _Plan(self.sources, self.cfg.seed, self.rank, self.world_size)
        ds = _SampleStream(plan, self.builders, self.sample, copy.deepcopy(self.positions))
        # a private generator: creating the loader must not consume the global torch RNG (resume exactness)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.sample)
        nw = self.cfg.num_workers
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=nw, collate_fn=_identity,
                                             generator=gen, prefetch_factor=8 if nw else None)
        return iter(loader)

    def samples(self) -> Iterator:
        """Usable samples in plan order (the position and the counters advance as they are consumed)."""
        for sample, advance in self._units():
            advance()
            if sample is not None:
                yield sample

    def _units(self) -> Iterator[tuple]:
        """``(sample or None, advance)`` per sample of the plan (None for a bad record): the record's counters are
        updated when its first sample is reached; ``advance()`` moves the position past the sample."""
        skip = self.chunk
        for item in self._items():
            if skip == 0:
                self._count(item)
            samples = item.get("samples") or [None]
            for j in range(skip, len(samples)):
                yield samples[j], (lambda item=item, j=j, n=len(samples): self._advance(item, j + 1, n))
            skip = 0

    def _advance(self, item: dict, used: int, n: int) -> None:
        if used < n:  # more chunks of this record follow: the position stays on it
            self.sample, self.chunk = item["i"], used
            self.positions[item["s"]] = [item["epoch"], item["pos"]]
        else:
            self.sample, self.chunk = item["i"] + 1, 0
            self.positions[item["s"]] = [item["epoch"], item["pos"] + 1]

    def _count(self, item: dict) -> None:
        src = self.sources[item["s"]]
        st = self.stats.sources[src.name]
        self.policy.count(st, item.get("reason"),
                          f"{item.get('id')} of source {src.name} (epoch {item['epoch']}, #{item['pos']})",
                          f"data source {src.name!r}")
        if "reason" not in item:
            self.stats.good[src.name] += 1
        if not src.streaming and self.stats.good[src.name] == 0 and st.seen >= len(src) // self.world_size:
            raise ValueError(f"no usable record in a whole epoch of data source {src.name!r} ({st.summary(5)})")

    def __iter__(self) -> Iterator[dict]:
        if self.cfg.batching == "pad":
            yield from self._padded()
        else:
            yield from self._packed()

    def _emit(self, batch: dict) -> dict:
        self.batches += 1
        return encode_pending_images(batch, self.image_tokenizer, self.cfg.encode_batch_size)

    def _padded(self) -> Iterator[dict]:
        buf = []
        for sample in self.samples():
            buf.append(sample)
            if len(buf) == self.cfg.batch_size:
                batch = self.collator.pad(buf)
                buf = []
                yield self._emit(batch)

    def _packed(self) -> Iterator[dict]:
        max_tokens, max_rows = self.cfg.max_tokens, self.cfg.batch_size
        rows: list[list] = []
        free: list[int] = []
        before = self._snapshot()
        for sample, advance in self._units():
            snap = before
            advance()
            before = self._snapshot()
            if sample is None:
                continue
            n = len(sample)
            r = next((r for r, f in enumerate(free) if n <= f), None)
            if r is None and len(rows) == max_rows:
                # the batch is full: emit it at the position before this sample, which starts the next batch
                after = before
                self._restore(snap)
                batch = self.collator.collate_rows(rows)
                rows, free = [], []
                yield self._emit(batch)
                self._restore(after)
                r = None
            if r is None:
                rows.append([sample])
                free.append(max_tokens - n)
            else:
                rows[r].append(sample)
                free[r] -= n

    def metrics(self) -> dict[str, float]:
        return self.stats.as_dict()


def build_loader(cfg: MLLMDataConfig, processor: MLLMProcessor, rank: int = 0, world_size: int = 1,
                 image_tokenizer=None) -> MLLMDataLoader:
    return MLLMDataLoader(cfg, processor, rank, world_size, image_tokenizer)


__all__ = ["MLLMDataLoader", "DataStats", "build_loader", "mixture_weights", "record_rng_of"]
