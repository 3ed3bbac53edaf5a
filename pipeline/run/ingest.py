"""Writing a dataset into the store as the ``input`` stage."""

from __future__ import annotations

import hashlib
import json

import numpy as np

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
        writer.write(ds.meta, ds.images)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
