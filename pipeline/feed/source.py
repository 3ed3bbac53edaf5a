"""A trainer's upstream as a *source*: the metadata of every row up front, the tensors row group by row group.

The metadata index (sample id, split, label, instance, pose: a few dozen bytes a row) is read once
and decides everything an epoch needs (order, windows, partners) before any tensor is read. The
tensors stay in the store and are read one row group (a *unit*) at a time through
``VersionReader.read_row_group`` (page checksums verified), on a local path and on ``s3://`` alike,
so no process holds a whole version. A source may span several committed versions (the chunks of a
stream window): a sample in several keeps its newest row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load as st_load

from pipeline.errors import StoreError
from pipeline.nn.modules import build_module
from pipeline.planning.plan import build_plan
from pipeline.store import Store
from pipeline.store.columns import column_array
from pipeline.store.reader import VersionReader
from schemas.config import RunConfig
from schemas.manifest import Manifest


def to_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Stored values -> float32 on ``device``; pixels scale to [0, 1]."""
    x = x.to(device, non_blocking=True)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


@dataclass
class Source:
    """Rows of one or more committed versions: metadata in memory, tensors read per unit (row group)."""

    manifest: Manifest                 # the version trained on (a weights version when recomputed)
    meta: pa.Table                     # metadata columns of the kept rows, carried into published versions
    readers: list[VersionReader]
    units: list[tuple[int, int, int]]  # (reader, shard, row group) of each unit, stored order
    unit: np.ndarray                   # (N,) unit of each kept row
    offset: np.ndarray                 # (N,) the row's position inside its unit
    sample_id: np.ndarray = field(init=False)
    split: np.ndarray = field(init=False)     # (N,) "train" / "test"
    label: np.ndarray = field(init=False)     # (N,) int64, -1 where null
    instance: np.ndarray = field(init=False)
    azimuth: np.ndarray = field(init=False)   # float degrees, NaN where null
    elevation: np.ndarray = field(init=False)
    lighting: np.ndarray = field(init=False)
    # Set when the stage is not materialized: the stored version read and the frozen modules that turn
    # float(x) into the stage's activations (bottom to top), with the weights versions they came from.
    source: Manifest | None = None
    recompute: torch.nn.Module | None = None
    chain: tuple[Manifest, ...] = ()
    versions: tuple[Manifest, ...] = ()       # the stored versions read (several for a stream window)
    pinned: dict[int, torch.Tensor] = field(default_factory=dict)  # units held in memory (``pin``)
    _by_unit: tuple | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        m = self.meta
        self.sample_id = column_array(m, "sample_id", np.int64, 0)
        self.split = np.asarray(m.column("split").to_pylist(), dtype=object)
        self.label = column_array(m, "label", np.int64, -1)
        self.instance = column_array(m, "instance", np.int64, -1)
        self.azimuth = column_array(m, "azimuth", np.float64, np.nan)
        self.elevation = column_array(m, "elevation", np.float64, np.nan)
        self.lighting = column_array(m, "lighting", np.int64, -1)

    def __len__(self) -> int:
        return len(self.sample_id)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.readers[0].shape)

    def train_rows(self) -> np.ndarray:
        return np.flatnonzero(self.split == "train")

    def pairing_meta(self) -> dict[str, np.ndarray]:
        """The (N,) metadata arrays ``plan_epoch`` draws partners from."""
        return {k: getattr(self, k) for k in ("label", "instance", "azimuth", "elevation", "lighting")}

    def features(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        return stored_features(x, self.recompute, device)

    def step_input(self, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What a training step makes of each micro-batch as stored (``pipeline.nn.step.step_loss``'s ``prepare``),
        so that it holds the batch as stored (float16: half the float32 bytes): the float32 features; None for a
        recomputed stage, whose frozen chain would run twice a micro-batch (the whole batch is made float32 first)."""
        return None if self.recompute is not None else functools.partial(to_float, device=device)

    def unit_rows(self) -> np.ndarray:
        """(U,) kept rows in each unit."""
        return np.bincount(self.unit, minlength=len(self.units))

    def pin(self) -> "Source":
        """Read every unit into memory now (a small stream window whose files the producer may delete later)."""
        for u in range(len(self.units)):
            self.pinned[u] = self._unit_tensor(u)
        return self

    def _unit_tensor(self, u: int) -> torch.Tensor:
        if u in self.pinned:
            return self.pinned[u]
        r, shard, group = self.units[u]
        return self.readers[r].read_row_group(shard, group)

    def read_unit(self, u: int) -> tuple[np.ndarray, torch.Tensor]:
        """(kept global rows of unit ``u``, their tensors ``(n, *shape)`` in storage dtype), stored order."""
        x = self._unit_tensor(u)
        rows = self._unit_members(u)
        off = self.offset[rows]
        if len(off) == len(x) and (len(off) == 0 or (off[0] == 0 and np.all(np.diff(off) == 1))):
            return rows, x  # every row of the unit kept, in order (the usual case): no copy
        return rows, x.index_select(0, torch.from_numpy(off))

    def _unit_members(self, u: int) -> np.ndarray:
        """Global rows of unit ``u`` (one sort of ``unit``, then a slice per call)."""
        if self._by_unit is None:
            order = np.argsort(self.unit, kind="stable")
            self._by_unit = (order, np.searchsorted(self.unit[order], np.arange(len(self.units) + 1)))
        order, starts = self._by_unit
        return order[starts[u]:starts[u + 1]]

    def fetch(self, rows: np.ndarray) -> torch.Tensor:
        """Tensors of ``rows`` in the order given, reading each unit they touch once (one at a time)."""
        rows = np.asarray(rows, dtype=np.int64)
        out: torch.Tensor | None = None
        for u in np.unique(self.unit[rows]):
            at = np.flatnonzero(self.unit[rows] == u)
            x = self._unit_tensor(int(u))
            if out is None:
                out = torch.empty((len(rows), *x.shape[1:]), dtype=x.dtype)
            out[torch.from_numpy(at)] = x.index_select(0, torch.from_numpy(self.offset[rows[at]]))
        return out if out is not None else torch.empty((0, *self.row_shape))

    def scan(self, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """``(global rows, tensors)`` unit by unit in stored order, for the selected ``rows`` (all by default)."""
        keep = None if rows is None else np.isin(np.arange(len(self)), rows)
        for u in range(len(self.units)):
            got, x = self.read_unit(u)
            if keep is not None:
                sel = keep[got]
                got, x = got[sel], x[torch.from_numpy(np.flatnonzero(sel))]
            if len(got):
                yield got, x


def open_versions(store: Store, manifests: list[Manifest]) -> Source:
    """A source over committed versions (oldest first); a sample in several keeps its newest row."""
    return merge([_open_one(store, m) for m in manifests])


def _open_one(store: Store, manifest: Manifest) -> Source:
    reader = store.read(manifest.stage, manifest.version)
    groups = reader.row_groups()
    unit = np.repeat(np.arange(len(groups), dtype=np.int64), [n for _, _, n in groups])
    offset = np.concatenate([np.arange(n, dtype=np.int64) for _, _, n in groups]) if groups else np.zeros(0, np.int64)
    return Source(manifest=manifest, meta=reader.meta, readers=[reader], units=[(0, s, g) for s, g, _ in groups],
                  unit=unit, offset=offset, versions=(manifest,))


def merge(parts: list[Source]) -> Source:
    """One source of several (oldest first) without reading anything again; a sample keeps its newest row."""
    if len(parts) == 1:
        return parts[0]
    readers, units, units_of, offsets, pinned = [], [], [], [], {}
    for p in parts:
        for u, (r, shard, group) in enumerate(p.units):
            if u in p.pinned:
                pinned[len(units)] = p.pinned[u]
            units.append((len(readers) + r, shard, group))
        units_of.append(p.unit + (len(units) - len(p.units)))
        offsets.append(p.offset)
        readers += p.readers
    meta = pa.concat_tables([p.meta for p in parts])
    ids = column_array(meta, "sample_id", np.int64, 0)
    _, first_from_end = np.unique(ids[::-1], return_index=True)  # the last occurrence of each sample
    keep = np.sort(len(ids) - 1 - first_from_end)
    return Source(manifest=parts[-1].manifest, meta=meta.take(pa.array(keep)).combine_chunks(), readers=readers,
                  units=units, unit=np.concatenate(units_of)[keep], offset=np.concatenate(offsets)[keep],
                  versions=tuple(m for p in parts for m in p.versions), pinned=pinned)


def open_source(store: Store, stage: str, version: int, config: dict, device: torch.device) -> Source:
    """Version ``version`` of ``stage``, materialized or not (a weights version becomes a ``recompute`` chain)."""
    stored, chain = stored_below(store, stage, version)
    src = open_versions(store, [stored])
    if chain:
        src.source, src.manifest = stored, chain[0]
        src.recompute = recompute_chain(store, chain, config, device)
        src.chain = tuple(reversed(chain))
    return src


def stored_below(store: Store, stage: str, version: int) -> tuple[Manifest, list[Manifest]]:
    """(the nearest stored activations, the weights versions above it top first) for ``stage`` v``version``.

    A weights version (``stack.<stage>.store.materialize: false``) is followed down its ``upstream``
    links; a linked version that retention removed is replaced by its stage's newest committed one.
    """
    manifest, chain = store.manifest(stage, version), []
    while manifest.codec == "weights":
        chain.append(manifest)
        below = manifest.upstream or {}
        if not below.get("stage"):
            raise StoreError(f"weights version {manifest.stage} v{manifest.version} names no upstream version",
                             "retrain the module; its weights version cannot be recomputed")
        committed = store.versions(below["stage"])
        if not committed:
            raise StoreError(f"{manifest.stage} v{manifest.version} is recomputed from {below['stage']}, "
                             "which has no committed version", "train the modules below first")
        pick = int(below["version"]) if int(below["version"]) in committed else committed[-1]
        manifest = store.manifest(below["stage"], pick)
    return manifest, chain


def recompute_chain(store: Store, chain: list[Manifest], config: dict, device: torch.device) -> torch.nn.Module:
    """The frozen modules of weights versions ``chain`` (top first), bottom to top as one network."""
    cfg = RunConfig.model_validate(config)
    plan = build_plan(cfg, check_paths=False, check_machine=False)  # shapes only: the stage may be read elsewhere
    layers = []
    for weights_version in reversed(chain):
        name = weights_version.stage
        module = build_module(cfg.stack[name], tuple(plan.module(name).in_shape))
        module.load_state_dict(st_load(store.read_weights(weights_version)))
        layers.append(module.eval().requires_grad_(False))
    return torch.nn.Sequential(*layers).to(device)


def stored_features(x: torch.Tensor, recompute, device: torch.device) -> torch.Tensor:
    """Stored rows -> float32 activations of the stage asked for, on ``device`` (through the frozen
    ``recompute`` chain when the stage below was not materialized)."""
    x = to_float(x, device)
    if recompute is None:
        return x
    with torch.no_grad():  # not inference_mode: the result feeds a module that trains
        return recompute(x)
