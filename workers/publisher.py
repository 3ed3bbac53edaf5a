"""How a module commits its activations: full versions (streamed unit by unit) and stream chunks.

A full version runs the module in eval mode over rows read from its ``Source`` one row group at a time,
in chunks of ``ModulePlan.publish_chunk`` rows (sized from memory by ``pipeline.planning.memory``, not
from the dataset), casts each chunk's output to the stored dtype on the device, and hands it to one
writer thread that encodes and writes it while the next chunk is computed: at most two chunks are held.
An intermediate version covers (a ``publish_fraction`` sample of) the train rows only: the trainer above
trains on train rows, and the final stage reads final versions, which cover every row.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Iterator

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import save as st_save

from pipeline.errors import StoreError
from pipeline.feed.heap import release_free_memory
from pipeline.feed import Source
from pipeline.planning.memory import publish_shard_rows
from pipeline.planning.plan import ModulePlan
from pipeline.store.codec import get_codec
from pipeline.store import Store
from pipeline.store.stream import StreamRing, chunk_rows
from pipeline.store.writer import VersionWriter
from schemas.config import RunConfig
from schemas.manifest import Manifest
from schemas.status import ModuleStatus
from workers.epochs import reader_may_use
from workers.runtime import NO_TURNS, CoreTurns

# Codecs whose stored values are a plain float dtype: the cast happens on the device (int8 calibrates on float32).
MIN_BATCHES = 4  # an intermediate version holds at least this many batches of rows (or every train row)
STORED_DTYPE = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def publish_version(store: Store, cfg: RunConfig, plan: ModulePlan, src: Source, module: torch.nn.Module,
                    device: torch.device, *, final: bool, epoch: int, producer: dict, upstream: dict,
                    turns: CoreTurns = NO_TURNS) -> Manifest:
    """Commit one version of ``plan.name``: its outputs on ``src`` (every row for a final version; a
    ``plan.publish_fraction`` sample of the train rows for an intermediate one), or its weights alone when
    ``stack.<name>.store.materialize`` is false. A failure commits nothing."""
    name = plan.name
    mcfg = cfg.stack[name]
    if not mcfg.store.materialize:
        weights = st_save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
        return store.commit_weights(name, weights, shape=list(plan.out_shape), final=final, producer=producer,
                                    upstream=upstream)
    rows = None if final else intermediate_rows(src, plan.publish_fraction, seed=cfg.module_train(name).seed + epoch,
                                                least=MIN_BATCHES * plan.batch_size)
    codec = cfg.module_codec(name)
    shard_rows = publish_shard_rows(cfg, get_codec(codec, tuple(plan.out_shape)).row_bytes)  # the writer buffers one
    writer = store.begin_version(name, codec=codec, zstd_level=mcfg.store.zstd_level, final=final,
                                 rows_per_shard=shard_rows,
                                 sample_fraction=(len(rows) if rows is not None else len(src)) / len(src),
                                 producer=producer, upstream=upstream)
    try:
        write_rows(writer, src, module, device, rows, chunk=plan.publish_chunk, dtype=STORED_DTYPE.get(codec),
                   turns=turns)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def intermediate_rows(src: Source, fraction: float, seed: int, least: int = 1) -> np.ndarray:
    """(k,) sorted rows of an intermediate version: the train rows, a random ``fraction`` of them when < 1,
    but at least ``least`` (a thinned version of a thinned upstream must still fill a few batches above)."""
    train = src.train_rows()
    k = max(int(round(fraction * len(train))), least, 1)
    if k >= len(train):
        return train
    return np.sort(np.random.default_rng(seed).choice(train, size=k, replace=False))


def infer_chunks(src: Source, module: torch.nn.Module, device: torch.device, rows: np.ndarray | None, chunk: int,
                 dtype: torch.dtype | None, turns: CoreTurns = NO_TURNS) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """``(rows, outputs on the host)`` of at most ``chunk`` rows at a time, in stored order; outputs are cast
    to ``dtype`` (on the device first: half the copy for float16). Each chunk is one of ``turns`` (the actors
    sharing the node's cores compute one at a time).

    The outputs are views of two host buffers used in turn: a chunk's is overwritten two chunks later, so the
    consumer is done with it by then (``write_rows`` writes one chunk while the next is computed). Every chunk
    then allocates and frees the same blocks, and the C heap reuses them instead of growing around outputs held
    by the writer (stl10-gim m1: +0.8 GB over 200 rows without a trim; trimming each chunk instead cost a
    third of its CPU in the kernel's page faults)."""
    buffers: list[torch.Tensor] = []
    for idx, x in src.scan(rows):
        for lo in range(0, len(idx), chunk):
            with turns.turn():
                z = module(src.features(x[lo:lo + chunk], device))  # (<=chunk, *out_shape) float32
                want = dtype or z.dtype
                if dtype is not None and z.dtype != dtype:
                    _check_range(z, dtype)
                    if z.device.type != "cpu":
                        z = z.to(dtype)
                if not buffers:
                    buffers = [torch.empty((chunk, *z.shape[1:]), dtype=want) for _ in range(2)]
                out = buffers[0][:len(z)]
                out.copy_(z)  # on CPU the cast happens in this copy
                del z
                buffers.reverse()
            yield idx[lo:lo + chunk], out


def _check_range(z: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse finite values of ``z`` that ``dtype`` cannot hold (float16 tops out at 65504)."""
    if dtype == torch.float16 and z.numel():
        lo, hi = torch.aminmax(z)  # one pass, no temporaries; inf/NaN land here too and get the exact look
        if max(-lo.item(), hi.item()) > 65504 or hi.isnan():
            finite = torch.where(torch.isfinite(z), z.abs(), 0).amax().item()
            if finite > 65504:
                raise StoreError(f"activations up to {finite:.4g} exceed the float16 range (65504)",
                                 "set store.codec: float32, or normalise the module's output")


def _cast(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``z`` as ``dtype``, refusing finite values the dtype cannot hold (float16 tops out at 65504)."""
    _check_range(z, dtype)
    return z.to(dtype)


def write_rows(writer: VersionWriter, src: Source, module: torch.nn.Module, device: torch.device,
               rows: np.ndarray | None, chunk: int, dtype: torch.dtype | None = None,
               turns: CoreTurns = NO_TURNS) -> None:
    """Module outputs of ``rows`` (all when None) in stored order into ``writer``: chunk i is written by one
    writer thread while chunk i+1 is computed. On any error the thread is drained before this raises, so
    the caller can abort ``writer`` with nothing still writing into it."""
    module.eval()
    pending: Future | None = None
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="publish-writer") as pool, torch.inference_mode(), \
                turns.series():
            try:
                release_free_memory()  # what the training steps left free: a chunk's blocks would not fit its holes
                for idx, z in infer_chunks(src, module, device, rows, chunk, dtype, turns):
                    if pending is not None:
                        pending.result()  # chunk i written (its error raised here) before chunk i+1 is queued
                        # The free heap handed back after every chunk: a bound on its growth (FreeHeapBound, 12-04)
                        # saved ~10% of a publish's time but let m2's final publish at N=640 grow its actor from
                        # 2.3 to 3.4 GiB, the recipe's peak (README, "Publishing without a trim per chunk").
                        release_free_memory()
                    pending = pool.submit(writer.write, src.meta.take(pa.array(idx)), z)
                    del z  # a view of one of infer_chunks' two buffers: the writer copies what it keeps
                if pending is not None:
                    pending.result()
            except BaseException:
                if pending is not None:
                    wait([pending])  # drain: the writer must be idle before the caller aborts it
                raise
    finally:
        module.train()


def write_fetched(writer: VersionWriter, src: Source, module: torch.nn.Module, device: torch.device,
                  rows: np.ndarray, dtype: torch.dtype | None = None, turns: CoreTurns = NO_TURNS) -> None:
    """Module outputs of ``rows`` (sorted) read by ``fetch``: a stream chunk of a few units."""
    x = src.fetch(rows)  # read before the turn: the cores are not needed for it
    module.eval()
    try:
        with torch.inference_mode(), turns.turn():
            z = module(src.features(x, device))
            if dtype is not None and z.dtype != dtype:
                z = _cast(z, dtype)
            z = z.cpu()
        writer.write(src.meta.take(pa.array(rows)), z)
    finally:
        module.train()


def chunk_order(src: Source, rng: np.random.Generator) -> np.ndarray:
    """The train rows in a random order that keeps each unit's rows together (units permuted, rows
    shuffled within), so the next stream chunk reads one or two row groups, not many."""
    rows = src.train_rows()
    rank = rng.permutation(len(src.units))[src.unit[rows]]
    return rows[np.lexsort((rng.random(len(rows)), rank))]


class ChunkProducer:
    """``schedule.publish: stream``: every few steps, a chunk of the module's outputs into its ring."""

    def __init__(self, ring: StreamRing, cfg: RunConfig, name: str, seed: list[int],
                 turns: CoreTurns = NO_TURNS) -> None:
        self.ring, self.cfg, self.name, self.seed, self.turns = ring, cfg, name, seed, turns
        self.train = cfg.module_train(name)
        self._since, self._cursor, self._order = 0, 0, None

    def tick(self, up: Source, module: torch.nn.Module, device: torch.device, *, step: int, producer: dict,
             upstream: dict) -> Manifest | None:
        """After one training step: the chunk committed now, or None when it is not yet time."""
        rows_total = len(up.train_rows())
        chunk = min(chunk_rows(self.cfg.store.window_samples, self.cfg.store.rows_per_shard), rows_total)
        self._since += 1
        if self._since * self.train.batch_size * (self.cfg.schedule.publish_fraction or 1.0) < chunk:
            return None
        self._since = 0
        if self._order is None or self._cursor + chunk > len(self._order) or len(self._order) != rows_total:
            self._order, self._cursor = chunk_order(up, np.random.default_rng([*self.seed, step])), 0
        rows = np.sort(self._order[self._cursor:self._cursor + chunk])
        self._cursor += chunk
        store_cfg = self.cfg.stack[self.name].store
        dtype = STORED_DTYPE.get(self.cfg.module_codec(self.name))
        return self.ring.append(lambda writer: write_fetched(writer, up, module, device, rows, dtype, self.turns),
                                codec=self.cfg.module_codec(self.name), rows=len(rows), total_rows=len(up),
                                rows_per_shard=self.cfg.store.rows_per_shard, zstd_level=store_cfg.zstd_level,
                                producer=producer, upstream=upstream)


def wanted_above(store: Store, readers: list, settle: int) -> bool:
    """Whether an intermediate version now could be trained on: no module reads this one's versions (the plan
    alone decides), or one of ``readers`` (their ``ModulePlan``) may still train an epoch on a non-final version
    by its last status."""
    if not readers:
        return True
    for reader in readers:
        data = store.read_json(f"status/{reader.name}.json")
        if reader_may_use(ModuleStatus.model_validate(data).epoch if data else 0, reader.epochs, settle):
            return True
    return False
