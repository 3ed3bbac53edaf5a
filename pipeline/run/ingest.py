"""Writing a dataset into the store as the ``input`` stage."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa

from pipeline.data import load_dataset
from pipeline.store import Store
from schemas.config import DatasetConfig
from schemas.manifest import Manifest


def dataset_fingerprint(cfg: DatasetConfig) -> str:
    """Identifies the ingested data: same fingerprint = same rows, same pixels."""
    blob = json.dumps(cfg.model_dump(mode="json", exclude={"cache_dir"}), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def is_ingested(store: Store, cfg: DatasetConfig) -> bool:
    existing = store.final("input")
    return existing is not None and existing.producer.get("fingerprint") == dataset_fingerprint(cfg)


def ingest(store: Store, cfg: DatasetConfig, *, rows_per_shard: int = 4096, dataset=None) -> Manifest:
    """Commit the dataset as ``input``'s final version, or reuse an identical one.

    Pixels are stored as uint8 (the trainer scales them to [0, 1]), so the input
    stage costs what the raw images cost; signals of sequence datasets (float
    samples in about [-1, 1]) as float16, which the trainer reads as they are.
    Rows are written in ``shard_order`` (every version above keeps that order).
    """
    fingerprint = dataset_fingerprint(cfg)
    existing = store.final("input")
    if existing is not None and existing.producer.get("fingerprint") == fingerprint:
        return existing
    ds = dataset if dataset is not None else load_dataset(cfg)
    codec = "uint8" if ds.images.dtype == np.uint8 else "float16"
    writer = store.begin_version(
        "input", codec=codec, final=True, rows_per_shard=rows_per_shard,
        producer={"dataset": ds.name, "fingerprint": fingerprint, "config": cfg.model_dump(mode="json")},
    )
    try:
        order = shard_order(ds.meta, rows_per_shard, seed=int(fingerprint[:8], 16))
        if order is None:
            writer.write(ds.meta, ds.images)
        else:
            for start in range(0, len(order), rows_per_shard):  # a shard at a time: no second copy of the images
                rows = order[start:start + rows_per_shard]
                writer.write(ds.meta.take(pa.array(rows)), ds.images[rows])
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def shard_order(meta: pa.Table, rows_per_shard: int, seed: int) -> np.ndarray | None:
    """The order a dataset's rows are written in: None (as loaded) when they fit one shard; otherwise its
    objects, (label, instance), in a seeded random order, each object's rows together and in loaded order
    (a row without an instance is an object of its own).

    A trainer streams a large version through a window of a few row groups (``pipeline.feed.epoch``), and its
    contrastive negatives are the other rows of a batch: written in the loaded order (small-NORB's files, an
    image folder: sorted by class), a window held one or two classes at a time. Dealt out by object, a row group
    holds objects drawn from every class, while the rows a ``same_instance`` or ``neighbor_pose`` partner comes
    from stay together in one row group. A version of one shard is one unit, fully shuffled every epoch: it
    keeps the loaded order (the single-process reference's)."""
    n = meta.num_rows
    if n <= rows_per_shard:
        return None
    rng = np.random.default_rng(seed)
    if meta.column("instance").null_count == n:
        return rng.permutation(n)
    label = meta.column("label").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    inst = meta.column("instance").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    inst = np.where(inst >= 0, inst, -1 - np.arange(n))  # no instance: an object of one row
    _, group = np.unique(np.stack([label, inst], axis=1), axis=0, return_inverse=True)
    rank = rng.permutation(group.max() + 1)[group.reshape(-1)]
    return np.lexsort((np.arange(n), rank))
