"""Writing a dataset into the store as the ``input`` stage."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa

from pipeline.data import load_dataset
from pipeline.data.base import object_ids
from pipeline.store import Store
from pipeline.store.columns import column_array
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


def shard_order(meta: pa.Table, rows_per_shard: int, seed: int, piece_rows: int | None = None) -> np.ndarray | None:
    """The order a dataset's rows are written in: None (as loaded) when they fit one shard; otherwise dealt
    out in *pieces* of objects: each object's (label, instance) rows in pose order (elevation, azimuth,
    lighting; loaded order without a pose) cut into pieces of about ``piece_rows`` rows (by default
    ``rows_per_shard / PIECES_PER_SHARD``, at least ``MIN_PIECE``), the pieces of all objects in a seeded random
    order (a row without an instance is a piece of its own).

    A trainer streams a large version through a window of a few row groups (``pipeline.feed.epoch``), and its
    contrastive negatives are the other rows of a batch: written in the loaded order (small-NORB's files, an
    image folder: sorted by class), a window held one or two classes at a time; dealt out as whole objects, a
    window of a third of the rows held a third of the objects. Dealt out in small pieces, a row group holds
    pieces of nearly every object, a row's ``same_instance`` partners (its object's other pieces in the
    window) span its object's poses, and its ``neighbor_pose`` partner (the next azimuth) is in its own
    piece. A version of one shard is one unit, fully shuffled every epoch: it keeps the loaded order (the
    single-process reference's)."""
    n = meta.num_rows
    if n <= rows_per_shard:
        return None
    rng = np.random.default_rng(seed)
    if meta.column("instance").null_count == n:
        return rng.permutation(n)
    label = column_array(meta, "label", np.int64, -1)
    inst = column_array(meta, "instance", np.int64, -1)
    inst = np.where(inst >= 0, inst, -1 - np.arange(n))  # no instance: an object of one row
    obj = object_ids(label, inst)
    pose = [column_array(meta, c, np.float64, 0) for c in ("lighting", "azimuth", "elevation")]
    by_object = np.lexsort((np.arange(n), *pose, obj))  # rows by object, then pose, then loaded order
    size = np.bincount(obj)
    rank = np.empty(n, dtype=np.int64)  # a row's place in its object's pose order
    rank[by_object] = np.arange(n) - (np.cumsum(size) - size)[obj[by_object]]
    if piece_rows is None:
        piece_rows = max(MIN_PIECE, rows_per_shard // PIECES_PER_SHARD)
    pieces = np.maximum(1, np.rint(size / piece_rows)).astype(np.int64)
    piece = (np.cumsum(pieces) - pieces)[obj] + rank * pieces[obj] // size[obj]  # each object split evenly
    return np.lexsort((rank, rng.permutation(int(pieces.sum()))[piece]))


PIECES_PER_SHARD = 256  # pieces of 16 rows in a shard of 4,096
MIN_PIECE = 8  # rows: a piece holds a few neighbouring poses

