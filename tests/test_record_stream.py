"""The record-stream pieces both trainers share (train/common/record_stream.py): the per-rank epoch split, the
streaming skip, per-record generators, the bad-record policy and the world-size check of a saved position."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from train.common.datasources import BadRecordStats, reason_class
from train.common.record_stream import (BadRecordPolicy, check_world_size, rank_epoch_order, rank_stream,
                                        record_rng)


def test_rank_epoch_orders_are_disjoint_equal_and_seeded():
    orders = [rank_epoch_order(10, r, 3, [7, 0]) for r in range(3)]
    assert [len(o) for o in orders] == [3, 3, 3]  # 10 // 3 each: the ranks' epochs stay in step
    flat = np.concatenate(orders)
    assert len(set(flat.tolist())) == 9 and set(flat.tolist()) <= set(range(10))
    assert np.array_equal(orders[0], rank_epoch_order(10, 0, 3, [7, 0]))  # a pure function of the seed key
    assert not np.array_equal(orders[0], rank_epoch_order(10, 0, 3, [7, 1]))  # the next epoch reshuffles
    assert rank_epoch_order(6, 1, 2, None).tolist() == [1, 3, 5]  # unshuffled: file order, strided
    with pytest.raises(ValueError, match="data.sources\\[x\\] has 1 records, fewer than the 2 processes"):
        rank_epoch_order(1, 0, 2, None, "data.sources[x]")


def test_rank_stream_resumes_by_reading_and_splits_ranks():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"x": list(range(40))}).to_iterable_dataset(num_shards=4)
    full = [r["x"] for r in rank_stream(ds, 0, 1, 3, 8, epoch=0, offset=0)]
    assert sorted(full) == list(range(40)) and full != list(range(40))  # shuffled, every record once
    assert [r["x"] for r in rank_stream(ds, 0, 1, 3, 8, epoch=0, offset=25)] == full[25:]  # the same order
    assert [r["x"] for r in rank_stream(ds, 0, 1, 3, 8, epoch=1, offset=0)] != full  # a new epoch reshuffles
    halves = [[r["x"] for r in rank_stream(ds, k, 2, None, 8, epoch=0, offset=0)] for k in range(2)]
    assert sorted(halves[0] + halves[1]) == list(range(40)) and not set(halves[0]) & set(halves[1])


def test_record_rng_is_keyed_by_the_record():
    assert record_rng(1, 2, 3).integers(1 << 30) == record_rng(1, 2, 3).integers(1 << 30)
    assert record_rng(1, 2, 3).integers(1 << 30) != record_rng(1, 2, 4).integers(1 << 30)


def test_bad_record_policy_counts_logs_and_stops(caplog):
    policy = BadRecordPolicy(max_bad_fraction=0.4, bad_check_min_records=4, log_bad_records=2,
                             reason_class=reason_class)
    stats = BadRecordStats()
    with caplog.at_level(logging.WARNING):
        for reason in (None, "image file not found: a.png", None, None, "image file not found: b.png", None):
            policy.count(stats, reason, "r", "data source 'pairs'")
    assert (stats.seen, stats.bad, dict(stats.reasons)) == (6, 2, {"image file not found": 2})
    assert sum("skipping record r: image file not found" in m for m in caplog.messages) == 2
    assert any("further skipped records are only counted" in m for m in caplog.messages)
    with pytest.raises(ValueError) as err:
        policy.count(stats, "image file not found: c.png", "r", "data source 'pairs'")
    assert ("too many bad records in data source 'pairs': 3 of 7 (42.9%) exceed data.max_bad_fraction=0.4; "
            "reasons: 3x image file not found") in str(err.value)


def test_a_position_is_for_one_world_size():
    check_world_size({"world_size": 2}, 2)
    with pytest.raises(ValueError, match="is for 2 processes, this run has 1; resume with the same number"):
        check_world_size({"world_size": 2}, 1)
