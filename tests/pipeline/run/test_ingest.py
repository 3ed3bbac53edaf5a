"""Ingest deals a dataset larger than one shard out in pieces of objects, so that a streaming window over a few
row groups mixes most objects of every class (the loaded order is sorted by class), while the partners a
``same_instance`` or ``neighbor_pose`` pair needs stay in the window."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline.data import load_dataset
from pipeline.feed import open_source, plan_epoch
from pipeline.planning.config import load_config
from pipeline.run.ingest import ingest, shard_order
from pipeline.store import Store
from tests.conftest import TINY_NORB

# 5 classes x 4 instances x 6 azimuths x 3 elevations x 2 lightings = 720 rows, loaded sorted by class
ROWS_PER_SHARD = 96  # about two objects' train rows a row group


def _ingested(tmp_path, rows_per_shard=ROWS_PER_SHARD):
    cfg = load_config("norb-synthetic", TINY_NORB)
    ds = load_dataset(cfg.dataset)
    store = Store(str(tmp_path), "r")
    manifest = ingest(store, cfg.dataset, rows_per_shard=rows_per_shard, dataset=ds)
    return ds, open_source(store, "input", manifest.version, {}, torch.device("cpu"))


def _written(root, ds, order=None, rows_per_shard=ROWS_PER_SHARD):
    """The same rows written in ``order`` (as loaded when None)."""
    store = Store(str(root), "r")
    writer = store.begin_version("input", codec="uint8", final=True, rows_per_shard=rows_per_shard, producer={})
    if order is None:
        writer.write(ds.meta, ds.images)
    else:
        writer.write(ds.meta.take(pa.array(order)), ds.images[order])
    manifest = writer.commit()
    return open_source(store, "input", manifest.version, {}, torch.device("cpu"))


def _plan(src, pairing, seed=0, batch=32):
    plan = plan_epoch(src.pairing_meta(), src.train_rows(), src.unit, pairing=pairing, batch_size=batch,
                      buffer=ROWS_PER_SHARD, rng=np.random.default_rng(seed))
    assert plan.window_units < len(np.unique(src.unit[src.train_rows()]))  # the window is smaller than the version
    return plan


def _per_batch(src, key, batch=32) -> float:
    """Mean distinct ``key`` values in a batch of an epoch through a window of one row group."""
    plan = _plan(src, "same_instance", batch=batch)
    return float(np.mean([len(np.unique(key[plan.order[b * batch:(b + 1) * batch]])) for b in range(plan.n_batches)]))


def test_a_window_of_one_row_group_mixes_classes_and_objects(tmp_path):
    ds, src = _ingested(tmp_path)
    loaded_labels = np.asarray(ds.meta.column("label").to_numpy())
    assert (np.diff(loaded_labels) >= 0).all(), "the toy is loaded sorted by class (what this test is about)"
    # every row once, the same pixels under the same sample_id
    stored_ids = np.asarray(src.meta.column("sample_id").to_numpy())
    loaded_ids = np.asarray(ds.meta.column("sample_id").to_numpy())
    assert sorted(stored_ids.tolist()) == sorted(loaded_ids.tolist())
    at = {int(s): i for i, s in enumerate(loaded_ids)}
    rows = np.arange(0, len(stored_ids), 97)
    assert np.array_equal(src.fetch(rows).numpy(), ds.images[[at[int(s)] for s in stored_ids[rows]]])
    # batches through one row group: more classes than the loaded order, more objects than whole objects dealt out
    whole = _written(tmp_path / "whole", ds, shard_order(ds.meta, ROWS_PER_SHARD, seed=0, piece_rows=10**9))
    loaded = _written(tmp_path / "loaded", ds)
    assert _per_batch(src, src.label) > _per_batch(loaded, loaded.label) + 1.0
    assert _per_batch(src, src.label * 1000 + src.instance) > 1.5 * _per_batch(whole, whole.label * 1000 + whole.instance)


@pytest.mark.parametrize("pairing", ["same_instance", "neighbor_pose"])
def test_partners_are_in_the_window(tmp_path, pairing):
    _, src = _ingested(tmp_path)
    for seed in range(3):
        plan = _plan(src, pairing, seed)
        assert plan.fetch_rate <= 0.01, (seed, plan.fetch_rate)  # a partner read from outside: rare


def test_a_piece_holds_neighbouring_poses_of_one_object():
    # 4 classes x 5 objects x (8 azimuths x 4 elevations x 2 lightings = 64 rows), loaded sorted by class
    n_obj, per = 20, 64
    obj = np.repeat(np.arange(n_obj), per)
    pose = np.tile(np.arange(per), n_obj)
    meta = pa.table({"label": obj // 5, "instance": obj % 5, "lighting": pose % 2,
                     "azimuth": (pose // 2 % 8) * 45.0, "elevation": (pose // 16) * 5.0})
    order = shard_order(meta, rows_per_shard=256, seed=3, piece_rows=16)
    assert sorted(order.tolist()) == list(range(n_obj * per))
    pose_key = meta.column("elevation").to_numpy() * 1000 + meta.column("azimuth").to_numpy()
    cut = (np.diff(obj[order]) != 0) | (np.diff(pose_key[order]) < 0)
    stretches = np.split(order, np.flatnonzero(cut) + 1)  # runs of one object in rising pose order
    # each object cut into 4 pieces of 16 rows, a piece's rows in pose order (a stretch is one piece, or a few
    # of one object that happened to be dealt next to each other in their pose order)
    assert all(len(s) % 16 == 0 for s in stretches), sorted({len(s) for s in stretches})
    assert len(stretches) > n_obj * 2
    shards = order.reshape(-1, 256)
    assert min(len(np.unique(obj[s])) for s in shards) >= 10  # a shard holds pieces of half the objects or more


def test_the_order_is_the_same_for_the_same_dataset(tmp_path):
    _, a = _ingested(tmp_path / "a")
    _, b = _ingested(tmp_path / "b")
    assert np.array_equal(a.meta.column("sample_id").to_numpy(), b.meta.column("sample_id").to_numpy())


def test_a_dataset_within_one_shard_keeps_its_loaded_order(tmp_path):
    ds, src = _ingested(tmp_path / "a", rows_per_shard=4096)
    loaded = _written(tmp_path / "b", ds, rows_per_shard=4096)
    assert np.array_equal(src.meta.column("sample_id").to_numpy(), loaded.meta.column("sample_id").to_numpy())


def test_rows_without_an_instance_are_permuted():
    meta = pa.table({"label": np.repeat(np.arange(4), 50), "instance": pa.nulls(200, pa.int64())})
    order = shard_order(meta, rows_per_shard=32, seed=1)
    assert sorted(order.tolist()) == list(range(200)) and not np.array_equal(order, np.arange(200))
    assert shard_order(meta, rows_per_shard=200, seed=1) is None
