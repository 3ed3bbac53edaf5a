"""Ingest deals a dataset larger than one shard out by object, so that a streaming window over a few row groups
mixes every class (the loaded order is sorted by class), while each object's rows stay together."""

from __future__ import annotations

import numpy as np
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


def test_a_window_of_few_row_groups_holds_every_class(tmp_path):
    ds, src = _ingested(tmp_path)
    loaded_labels = np.asarray(ds.meta.column("label").to_numpy())
    assert (np.diff(loaded_labels) >= 0).all(), "the toy is loaded sorted by class (what this test is about)"
    # every row once, the same pixels under the same sample_id
    stored_ids = np.asarray(src.meta.column("sample_id").to_numpy())
    loaded_ids = np.asarray(ds.meta.column("sample_id").to_numpy())
    assert sorted(stored_ids.tolist()) == sorted(loaded_ids.tolist())
    at = {int(s): i for i, s in enumerate(loaded_ids)}
    rows = np.arange(0, len(stored_ids), 97)
    got = src.fetch(rows).numpy()
    assert np.array_equal(got, ds.images[[at[int(s)] for s in stored_ids[rows]]])
    # each object's rows stay together: one row group, or two where a shard boundary splits it
    obj = src.label * 100_003 + src.instance
    assert max(len(np.unique(src.unit[obj == o])) for o in np.unique(obj)) <= 2
    # through a window of one row group, batches of 32 hold more classes than with the loaded order
    dealt, loaded = _classes_per_batch(src), _classes_per_batch(_loaded_order(tmp_path / "loaded", ds))
    assert np.mean(dealt) > np.mean(loaded) + 0.5, (dealt, loaded)


def _classes_per_batch(src, batch=32) -> list[int]:
    plan = plan_epoch(src.pairing_meta(), src.train_rows(), src.unit, pairing="same_instance", batch_size=batch,
                      buffer=ROWS_PER_SHARD, rng=np.random.default_rng(0))
    assert plan.window_units < len(np.unique(src.unit[src.train_rows()]))  # the window is smaller than the version
    return [len(np.unique(src.label[plan.order[b * batch:(b + 1) * batch]])) for b in range(plan.n_batches)]


def _loaded_order(root, ds, rows_per_shard=ROWS_PER_SHARD):
    """The same rows written as loaded (what ingest did before dealing them out)."""
    store = Store(str(root), "r")
    writer = store.begin_version("input", codec="uint8", final=True, rows_per_shard=rows_per_shard, producer={})
    writer.write(ds.meta, ds.images)
    manifest = writer.commit()
    return open_source(store, "input", manifest.version, {}, torch.device("cpu"))


def test_the_order_is_the_same_for_the_same_dataset(tmp_path):
    _, a = _ingested(tmp_path / "a")
    _, b = _ingested(tmp_path / "b")
    assert np.array_equal(a.meta.column("sample_id").to_numpy(), b.meta.column("sample_id").to_numpy())


def test_a_dataset_within_one_shard_keeps_its_loaded_order(tmp_path):
    ds, src = _ingested(tmp_path / "a", rows_per_shard=4096)
    loaded = _loaded_order(tmp_path / "b", ds, rows_per_shard=4096)
    assert np.array_equal(src.meta.column("sample_id").to_numpy(), loaded.meta.column("sample_id").to_numpy())


def test_every_shard_holds_objects_of_many_classes():
    import pyarrow as pa

    # 10 classes x 20 objects x 10 rows, sorted by class: a shard of 100 loaded rows holds one class
    label, instance = np.repeat(np.arange(10), 200), np.tile(np.repeat(np.arange(20), 10), 10)
    order = shard_order(pa.table({"label": label, "instance": instance}), rows_per_shard=100, seed=3)
    assert sorted(order.tolist()) == list(range(2000))
    shards = order.reshape(20, 100)
    assert min(len(np.unique(label[s])) for s in shards) >= 4
    objects = label[order] * 100 + instance[order]
    assert (np.diff(objects) != 0).sum() == 199  # each object's 10 rows together


def test_rows_without_an_instance_are_permuted():
    import pyarrow as pa

    meta = pa.table({"label": np.repeat(np.arange(4), 50), "instance": pa.nulls(200, pa.int64())})
    order = shard_order(meta, rows_per_shard=32, seed=1)
    assert sorted(order.tolist()) == list(range(200)) and not np.array_equal(order, np.arange(200))
    assert shard_order(meta, rows_per_shard=200, seed=1) is None
