"""Feeding from a version held in memory (the in-memory baseline of the streaming feed).

Trainers stream (``pipeline.feed.streaming``); this path stays for the benchmarks that compare
store-fed streaming with memory-fed training, and for tools that want a small version as one tensor.
The version is decoded once into one tensor (its stored dtype: uint8 pixels
or float16/bfloat16/float32 activations) and batches are gathered from it by index, cast to
float32 on the trainer's device. A background thread prepares the next batch
(gather, cast, pin) while the current one trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.data.base import object_ids
from pipeline.feed.source import recompute_chain, stored_below, stored_features
from pipeline.feed.streaming import TrainBatch, background
from pipeline.nn.pairing import partner_index
from pipeline.store import Store
from pipeline.store.columns import column_array
from schemas.manifest import Manifest


@dataclass
class Upstream:
    """One upstream version held in memory."""

    manifest: Manifest
    meta: "pa.Table"               # metadata columns, carried into published versions
    x: torch.Tensor                # (N, *shape) uint8 or float16, as stored
    sample_id: np.ndarray          # (N,)
    split: np.ndarray              # (N,) "train" / "test"
    label: np.ndarray              # (N,) int64, -1 where null
    instance: np.ndarray
    azimuth: np.ndarray            # float degrees, NaN where null
    elevation: np.ndarray
    lighting: np.ndarray
    # Set when the stage read is not materialized (``manifest`` is then its weights version): the
    # stored version ``x`` comes from, and the frozen modules that turn float(x) into the stage's
    # activations, with the weights versions they came from (bottom to top).
    source: Manifest | None = None
    recompute: torch.nn.Module | None = None
    chain: tuple[Manifest, ...] = ()

    @property
    def pixels(self) -> bool:
        return self.x.dtype == torch.uint8

    def features(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        return stored_features(x, self.recompute, device)

    def train_rows(self) -> np.ndarray:
        return np.flatnonzero(self.split == "train")


# The dtype a version is held in memory as: its own where torch has it, float16 for int8 codes.
_NATIVE = {"uint8": torch.uint8, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _decoded(reader) -> torch.Tensor:
    codec = reader.manifest.codec
    if codec in _NATIVE:
        return reader.tensor(dtype=_NATIVE[codec])
    x = reader.tensor(dtype=torch.float32)  # int8: decoded values may span beyond float16's 65504
    return x.half() if x.numel() == 0 or x.abs().max().item() < 65504 else x


def load_upstream(store: Store, stage: str, version: int) -> Upstream:
    reader = store.read(stage, version)
    meta = reader.meta
    return Upstream(
        manifest=reader.manifest,
        meta=meta,
        x=_decoded(reader),
        sample_id=column_array(meta, "sample_id", np.int64, 0),
        split=np.asarray(meta.column("split").to_pylist(), dtype=object),
        label=column_array(meta, "label", np.int64, -1),
        instance=column_array(meta, "instance", np.int64, -1),
        azimuth=column_array(meta, "azimuth", np.float64, np.nan),
        elevation=column_array(meta, "elevation", np.float64, np.nan),
        lighting=column_array(meta, "lighting", np.int64, -1),
    )


def load_source(store: Store, stage: str, version: int, config: dict, device: torch.device) -> Upstream:
    """Version ``version`` of ``stage`` in memory, materialized or not (see ``source.stored_below``)."""
    stored, chain = stored_below(store, stage, version)
    up = load_upstream(store, stored.stage, stored.version)
    if chain:
        up.source, up.manifest = up.manifest, chain[0]
        up.recompute = recompute_chain(store, chain, config, device)
        up.chain = tuple(reversed(chain))
    return up


class PairedBatches:
    """An epoch of shuffled train batches with their positives, prefetched one ahead.

    ``pairing`` is a metadata pairing (same_instance, neighbor_pose) or None;
    augment and patch_grid pairs are formed by the trainer from ``x`` alone.
    """

    def __init__(self, up: Upstream, *, batch_size: int, pairing: str | None, rng: np.random.Generator,
                 device: torch.device, max_steps: int | None = None, prefetch: int = 2) -> None:
        rows = up.train_rows()
        order = rows[rng.permutation(len(rows))]
        n_batches = len(order) // batch_size if len(order) >= batch_size else 1
        if max_steps is not None:
            n_batches = min(n_batches, max_steps)
        self._batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(n_batches)]
        self._partner = None
        # Under same_instance every image of an object is a positive of every other, so in-batch rows of the
        # same object are masked out of the negatives (the objective gets their group ids).
        self._groups = object_ids(up.label, up.instance) if pairing == "same_instance" else None
        if pairing in ("same_instance", "neighbor_pose"):
            # Partners come from the train rows only: test images never enter training.
            local = partner_index(pairing, label=up.label[rows], instance=up.instance[rows], azimuth=up.azimuth[rows],
                                  elevation=up.elevation[rows], lighting=up.lighting[rows], rng=rng)
            self._partner = np.empty(len(up.label), dtype=np.int64)
            self._partner[rows] = rows[local]
        self._up, self._device, self._prefetch = up, device, prefetch
        self._pin = device.type == "cuda"

    def __len__(self) -> int:
        return len(self._batches)

    def _make(self, idx: np.ndarray) -> TrainBatch:
        index = torch.from_numpy(idx)
        x = self._up.x.index_select(0, index)
        x_pos = self._up.x.index_select(0, torch.from_numpy(self._partner[idx])) if self._partner is not None else None
        if self._pin:
            x = x.pin_memory()
            x_pos = x_pos.pin_memory() if x_pos is not None else None
        labels = torch.from_numpy(self._up.label[idx]).to(self._device)
        groups = torch.from_numpy(self._groups[idx]).to(self._device) if self._groups is not None else None
        return TrainBatch(self._up.features(x, self._device),
                          self._up.features(x_pos, self._device) if x_pos is not None else None, labels, groups)

    def __iter__(self):
        return background((self._make(idx) for idx in self._batches), self._prefetch, "isostack-prefetch")


def concat_upstreams(parts: list[Upstream]) -> Upstream:
    """One ``Upstream`` of several chunks' rows; a sample in several chunks keeps its newest rows."""
    newest = parts[-1]
    ids = np.concatenate([p.sample_id for p in parts])
    # The last occurrence of each sample_id (chunks come oldest first).
    _, first_from_end = np.unique(ids[::-1], return_index=True)
    keep = np.sort(len(ids) - 1 - first_from_end)
    idx = torch.from_numpy(keep)

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts])[keep]

    return Upstream(
        manifest=newest.manifest, meta=pa.concat_tables([p.meta for p in parts]).take(pa.array(keep)),
        x=torch.cat([p.x for p in parts]).index_select(0, idx), sample_id=ids[keep], split=cat("split"),
        label=cat("label"), instance=cat("instance"), azimuth=cat("azimuth"), elevation=cat("elevation"),
        lighting=cat("lighting"))


def inference_chunks(up: Upstream, rows: np.ndarray, chunk: int):
    """Row-index chunks in stored order for publishing (no shuffling: shards stay sorted)."""
    for start in range(0, len(rows), chunk):
        yield rows[start:start + chunk]
