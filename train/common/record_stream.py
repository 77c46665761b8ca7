"""What the two training streams share — the tokenizer's image-text stream (``train/tokenizer/data.py``) and the MLLM
mixture (``train/data/loader.py``): where a rank reads a source's records, epoch after epoch, how a record draws
its randomness, what a bad record costs, and the position a checkpoint holds.

* Map-style sources: epoch ``e`` is a seeded permutation of the records (their file order when unshuffled), split
  across ranks by striding, every rank the same count so that the ranks' epochs stay in step
  (:func:`rank_epoch_order`).
* Streaming sources: a seeded buffer shuffle per epoch, split across ranks by ``datasets``; a resume skips by reading,
  since ``IterableDataset.skip`` on a shuffled stream would change the order (:func:`rank_stream`).
* Everything random about a record (crop, caption, CFG drop, ...) comes from a generator seeded by the record's
  coordinates, never from a worker's RNG (:func:`record_rng`), so the data depends neither on ``num_workers`` nor on
  where a run was interrupted.
* Bad records are skipped and counted per reason; the first ``log_bad_records`` are logged; once
  ``bad_check_min_records`` were read, more than ``max_bad_fraction`` bad stops the run (:class:`BadRecordPolicy`).
* A position (epoch and offset per source) is for one world size: the per-rank split depends on it
  (:func:`check_world_size`).

Each stream passes its own seed keys, so both keep the orders their exact-resume tests pin.
"""
from __future__ import annotations

import itertools
import logging
from typing import Any, Callable, Iterator

import numpy as np

from .datasources import BadRecordStats

logger = logging.getLogger(__name__)


def rank_epoch_order(n: int, rank: int, world_size: int, permutation_seed: list[int] | None,
                     name: str = "the data") -> np.ndarray:
    """The record indices this rank reads in one epoch of an ``n``-record source: a permutation seeded by
    ``permutation_seed`` (``None``: file order), strided over ranks, ``n // world_size`` each."""
    per_rank = n // world_size
    if per_rank == 0:
        raise ValueError(f"{name} has {n} records, fewer than the {world_size} processes")
    order = np.random.default_rng(permutation_seed).permutation(n) if permutation_seed is not None else np.arange(n)
    return order[rank::world_size][:per_rank]


def flatten(chunks: Iterator[dict[str, list]]) -> Iterator[dict[str, Any]]:
    """Column chunks (``IterableDataset.iter(batch_size=...)``) -> one record dict at a time."""
    for chunk in chunks:
        n = len(next(iter(chunk.values())))
        for i in range(n):
            yield {k: v[i] for k, v in chunk.items()}


def rank_stream(dataset: Any, rank: int, world_size: int, shuffle_seed: int | None, buffer_size: int, epoch: int,
                offset: int) -> Iterator[dict[str, Any]]:
    """Records ``offset, offset+1, ...`` of this rank's share of epoch ``epoch`` of a streaming ``dataset``
    (shuffled with ``shuffle_seed`` in a buffer of ``buffer_size``; ``None``: stream order)."""
    if shuffle_seed is not None:
        dataset = dataset.shuffle(seed=shuffle_seed, buffer_size=buffer_size)
        dataset.set_epoch(epoch)
    if world_size > 1:
        from datasets.distributed import split_dataset_by_node

        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    return itertools.islice(flatten(dataset.iter(batch_size=256)), offset, None)


def record_rng(*key: int) -> np.random.Generator:
    """The generator of one record, seeded by its coordinates (seed, rank, epoch, position, ... as the caller keys it)."""
    return np.random.default_rng(list(key))


class BadRecordPolicy:
    """Counts each record read into a :class:`BadRecordStats`, logs its first ``log_bad_records`` bad ones, and
    raises once more than ``max_bad_fraction`` of a source's records (after ``bad_check_min_records``) were bad."""

    def __init__(self, max_bad_fraction: float, bad_check_min_records: int, log_bad_records: int,
                 reason_class: Callable[[str], str]) -> None:
        self.max_bad_fraction, self.min_records = max_bad_fraction, bad_check_min_records
        self.log_bad_records, self.reason_class = log_bad_records, reason_class

    def count(self, stats: BadRecordStats, reason: str | None, where: str, source: str = "the data") -> None:
        """One record read into ``stats``: ``reason`` is None for a good record; ``where`` names it in the log."""
        stats.seen += 1
        if reason is not None:
            stats.bad += 1
            stats.reasons[self.reason_class(reason)] += 1
            if stats.bad <= self.log_bad_records:  # the first ones of each source
                logger.warning("skipping record %s: %s", where, reason)
                if stats.bad == self.log_bad_records:
                    logger.warning("further skipped records are only counted (data.log_bad_records=%d)",
                                   self.log_bad_records)
        if stats.bad and stats.seen >= self.min_records and stats.bad > self.max_bad_fraction * stats.seen:
            raise ValueError(
                f"too many bad records in {source}: {stats.bad} of {stats.seen} ({stats.bad / stats.seen:.1%}) "
                f"exceed data.max_bad_fraction={self.max_bad_fraction:g}; reasons: "
                + "; ".join(f"{n}x {r}" for r, n in stats.reasons.most_common())
                + ". Fix or filter the dataset, or raise data.max_bad_fraction.")


def check_world_size(state: dict[str, Any], world_size: int) -> None:
    if state.get("world_size") != world_size:
        raise ValueError(f"the checkpoint's data position is for {state.get('world_size')} processes, this run has "
                         f"{world_size}; resume with the same number of processes")


__all__ = ["rank_epoch_order", "rank_stream", "flatten", "record_rng", "BadRecordPolicy", "check_world_size"]
