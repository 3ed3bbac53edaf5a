"""The streaming feed: order from (seed, epoch), exactly-once coverage, partners of the right kind, bounded rows."""

from __future__ import annotations

import platform
import time
import weakref

import numpy as np
import pytest
import torch

from pipeline.feed import Source, StreamingBatches, open_versions, plan_epoch
from pipeline.feed.epoch import _right_kind
from pipeline.feed.streaming import _take, keep_freed_batches
from pipeline.store import Store

BATCH = 8


def make_version(store: Store, *, objects: int = 6, poses: int = 6, lightings: int = 2, rows_per_shard: int = 16,
                 test_every: int = 5, stage: str = "m1", split_row_groups: bool = True):
    """A version whose sample i holds the value i in every cell; objects x azimuth poses x lightings rows,
    written grouped by object (as ingest writes them), every ``test_every``-th row in the test split (stored
    in row groups of their own unless ``split_row_groups`` is False, as the writer does by default)."""
    ids, label, inst, az, el, light = [], [], [], [], [], []
    for o in range(objects):
        for p in range(poses):
            for li in range(lightings):
                ids.append(len(ids))
                label.append(o % 3)
                inst.append(o)
                az.append(20.0 * p)
                el.append(30.0)
                light.append(li)
    n = len(ids)
    split = ["test" if i % test_every == test_every - 1 else "train" for i in range(n)]
    writer = store.begin_version(stage, codec="float32", rows_per_shard=rows_per_shard, split_row_groups=split_row_groups)
    x = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 2, 3).contiguous()
    writer.write({"sample_id": np.asarray(ids), "split": split, "label": np.asarray(label), "instance": np.asarray(inst),
                  "azimuth": np.asarray(az), "elevation": np.asarray(el), "lighting": np.asarray(light)}, x)
    return writer.commit()


def _meta(src):
    return {k: getattr(src, k) for k in ("label", "instance", "azimuth", "elevation", "lighting")}


def _epoch(src, pairing, seed=0, epoch=0, buffer=32, start_step=0, readahead=1):
    rng = np.random.default_rng([seed, 0, 0, epoch])
    plan = plan_epoch(_meta(src), src.train_rows(), src.unit, pairing=pairing, batch_size=BATCH, buffer=buffer, rng=rng)
    feed = StreamingBatches(src, plan, device=torch.device("cpu"), pairing=pairing, start_step=start_step,
                            readahead=readahead)
    return plan, feed, list(feed)


def _ids(batch) -> np.ndarray:
    return batch.x[:, 0, 0].round().long().numpy()  # the value written is the row's sample_id


@pytest.mark.parametrize("pairing", ["same_instance", "neighbor_pose", "augment", "patch_grid", "temporal", None])
def test_each_pairing_streamed_covers_every_train_sample_once(tmp_path, pairing):
    store = Store(str(tmp_path), "r")
    make_version(store, test_every=9)  # 72 rows, 64 of them train: 8 batches of 8, nothing dropped
    src = open_versions(store, [store.newest("m1")])
    train = set(src.sample_id[src.train_rows()].tolist())
    assert len(train) % BATCH == 0
    plan, feed, batches = _epoch(src, pairing)
    seen = np.concatenate([_ids(b) for b in batches])
    assert sorted(seen.tolist()) == sorted(train)  # every train sample exactly once, no test sample
    if pairing in ("same_instance", "neighbor_pose"):
        good = _right_kind(pairing, _meta(src), src.train_rows())  # of source rows
        row_of = np.argsort(src.sample_id)  # sample id -> source row (ids are 0..n-1; rows are not in id order)
        for b in batches:
            a, p = _ids(b), b.x_pos[:, 0, 0].round().long().numpy()
            assert good(row_of[a], row_of[p]).all(), f"{pairing}: a partner of the wrong kind in {list(zip(a, p))}"
            assert set(p.tolist()) <= train  # partners come from training rows only
        assert 0.0 <= plan.fetch_rate <= 1.0
    else:
        assert all(b.x_pos is None for b in batches)


def test_same_seed_same_order_and_epochs_differ(tmp_path):
    store = Store(str(tmp_path), "r")
    make_version(store)
    src = open_versions(store, [store.newest("m1")])
    first = np.concatenate([_ids(b) for b in _epoch(src, "same_instance", seed=3, epoch=1)[2]])
    again = np.concatenate([_ids(b) for b in _epoch(src, "same_instance", seed=3, epoch=1)[2]])
    other = np.concatenate([_ids(b) for b in _epoch(src, "same_instance", seed=3, epoch=2)[2]])
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_resuming_mid_epoch_continues_the_same_order(tmp_path):
    store = Store(str(tmp_path), "r")
    make_version(store)
    src = open_versions(store, [store.newest("m1")])
    whole = _epoch(src, "neighbor_pose", buffer=20)[2]
    rest = _epoch(src, "neighbor_pose", buffer=20, start_step=3)[2]
    assert len(rest) == len(whole) - 3
    for a, b in zip(whole[3:], rest):
        assert torch.equal(a.x, b.x) and torch.equal(a.x_pos, b.x_pos)


def test_a_tiny_buffer_bounds_the_rows_held(tmp_path):
    store = Store(str(tmp_path), "r")
    make_version(store, objects=12, rows_per_shard=8)  # 144 rows in 18 shards of 8, a train and a test row group each
    src = open_versions(store, [store.newest("m1")])
    plan, feed, batches = _epoch(src, "same_instance", buffer=8, readahead=1)
    assert plan.window_units == 1  # one unit in the sliding window
    # window (8) + one more where a batch straddles two units (8) + one unit read ahead (8) + partners fetched (8)
    assert 0 < feed.max_rows_held <= 8 + 8 + 8 + 8, feed.max_rows_held
    assert feed.max_rows_held < len(src) // 3
    whole = _epoch(src, "same_instance", buffer=1000)[1]
    assert whole.max_rows_held >= len(src.train_rows())  # the count is real: a big buffer holds everything


@pytest.mark.parametrize("pairing", ["same_instance", "neighbor_pose"])
def test_a_feed_released_between_batches_holds_no_rows_and_gives_the_same_batches(tmp_path, pairing):
    """A trainer waiting for its node's turn drops its window and reads ahead (``release``): nothing is held while
    it waits, and the next batch, read again, is the one it would have been."""
    store = Store(str(tmp_path), "r")
    make_version(store, objects=12, rows_per_shard=8)
    src = open_versions(store, [store.newest("m1")])
    plan, _, kept = _epoch(src, pairing, buffer=24, readahead=2)
    feed = StreamingBatches(src, plan, device=torch.device("cpu"), pairing=pairing, readahead=2)
    released = []
    for batch in feed.on_demand():
        released.append(batch)
        assert feed.rows_held > 0  # the window the next batch draws from
        feed.release()
        deadline = time.monotonic() + 10
        while feed.rows_held and time.monotonic() < deadline:  # a unit being read ahead lets go when it lands
            time.sleep(0.01)
        assert feed.rows_held == 0
    assert len(released) == len(kept) == plan.n_batches
    for a, b in zip(kept, released):
        assert np.array_equal(_ids(a), _ids(b))
        assert torch.equal(a.x_pos, b.x_pos)
    assert feed.max_rows_held <= 24 + 8 + 2 * 8 + 8  # the bound of a feed never released still holds


def test_a_stream_window_keeps_the_newest_row_of_each_sample(tmp_path):
    store = Store(str(tmp_path), "r")
    old = make_version(store, objects=2)
    writer = store.begin_version("m1", codec="float32", rows_per_shard=16)
    writer.write({"sample_id": np.arange(4), "split": ["train"] * 4}, torch.full((4, 2, 3), 1000.0))
    new = writer.commit()
    src = open_versions(store, [old, new])
    assert len(src) == old.rows
    x = src.fetch(np.flatnonzero(np.isin(src.sample_id, np.arange(4))))
    assert torch.all(x == 1000.0)


def test_take_gathers_rows_across_parts_in_the_order_asked():
    parts = [torch.arange(n * 6, dtype=torch.float16).reshape(n, 2, 3) + 1000 * k for k, n in enumerate((5, 1, 7))]
    starts = np.cumsum([0] + [len(p) for p in parts])
    whole = torch.cat(parts)
    rng = np.random.default_rng(0)
    for positions in (rng.integers(0, len(whole), 40), np.arange(len(whole)), np.array([12, 0, 5, 5]), np.zeros(0, int)):
        assert torch.equal(_take(parts, starts, positions), whole[torch.from_numpy(positions)])


def test_feed_keeps_freed_batch_memory_unless_malloc_is_tuned_by_the_user(monkeypatch):
    keep_freed_batches.cache_clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert keep_freed_batches() is False  # the user's setting stands
    keep_freed_batches.cache_clear()
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    if platform.libc_ver()[0] == "glibc":
        assert keep_freed_batches() is True


def test_units_are_released_after_their_last_batch(tmp_path, monkeypatch):
    """The unit tensors alive at any read (not the feed's own count): one window's units plus those in flight."""
    store = Store(str(tmp_path), "r")
    make_version(store, objects=12, rows_per_shard=8)
    src = open_versions(store, [store.newest("m1")])
    alive, peak = [], [0]
    read_unit = Source.read_unit

    def watched(self, u):
        rows, x = read_unit(self, u)
        alive.append(weakref.ref(x))
        peak[0] = max(peak[0], sum(ref() is not None for ref in alive))
        return rows, x

    monkeypatch.setattr(Source, "read_unit", watched)
    plan, feed, batches = _epoch(src, "same_instance", buffer=32, readahead=1)
    k = plan.window_units
    assert 1 < k < len(plan.units) // 3 and len(batches) == plan.n_batches
    # the window, one more where a batch straddles, the unit in flight and one ahead
    assert peak[0] <= k + 1 + 1 + 1, (peak[0], k)


def test_the_window_slides_a_unit_at_a_time(tmp_path):
    """No batch waits for a whole window, the first included (the window ramps up): each needs at most a couple
    of units not read before, while every batch mixes rows of several units (disjoint windows needed K new
    units at each boundary)."""
    store = Store(str(tmp_path), "r")
    make_version(store, objects=24, rows_per_shard=8, test_every=1000)  # 288 train rows in 36 units of 8
    src = open_versions(store, [store.newest("m1")])
    plan, feed, batches = _epoch(src, "same_instance", buffer=48, readahead=1)
    k = plan.window_units
    assert k == 6 and len(batches) == plan.n_batches == 36
    new_per_batch = np.bincount(plan.first_use // BATCH, minlength=plan.n_batches)
    assert new_per_batch[0] <= 3 and new_per_batch[1:].max() <= 3, new_per_batch  # the window ramps up
    mixed = [len(np.unique(src.unit[_ids(b)])) for b in batches[k:-k]]
    assert np.mean(mixed) >= 3, mixed  # rows of several units in a batch, not one unit after another
    live = [int(((plan.first_use < (t + 1) * BATCH) & (plan.last_use >= t * BATCH)).sum()) for t in range(36)]
    assert max(live) <= k + 1, live  # the window's units, one more where a batch straddles two stretches


@pytest.mark.parametrize("split_row_groups", [True, False])
def test_a_train_epoch_reads_no_test_row_group_when_the_splits_have_their_own(tmp_path, monkeypatch, split_row_groups):
    store = Store(str(tmp_path / "runs"), "r")
    src = open_versions(store, [make_version(store, split_row_groups=split_row_groups)])  # every 5th row a test row
    read_units = []
    read_unit = Source.read_unit
    monkeypatch.setattr(Source, "read_unit", lambda self, u: (read_units.append(u), read_unit(self, u))[1])
    plan, _, batches = _epoch(src, "same_instance")
    test_units = set(src.unit[src.split == "test"].tolist())
    assert test_units.isdisjoint(set(src.unit[src.split == "train"].tolist())) == split_row_groups
    assert read_units and test_units.isdisjoint(read_units) == split_row_groups
    got = np.concatenate([_ids(b) for b in batches])  # the same epoch either way: every train sample once
    train_ids = src.sample_id[src.train_rows()]
    assert len(set(got.tolist())) == len(got) == plan.n_batches * BATCH and set(got.tolist()) <= set(train_ids.tolist())
