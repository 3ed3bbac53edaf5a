"""How a module commits its activations: full versions (streamed unit by unit) and stream chunks.

Both run the module in eval mode over rows read from its ``Source`` one row group at a time, in
slices of ``chunk`` rows, so publishing holds one row group and one slice of outputs whatever the
version's size.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import save as st_save

from pipeline.feed import Source
from pipeline.store import Store
from pipeline.store.stream import StreamRing, chunk_rows
from pipeline.store.writer import VersionWriter
from schemas.config import RunConfig
from schemas.manifest import Manifest


def publish_version(store: Store, cfg: RunConfig, name: str, src: Source, module: torch.nn.Module,
                    device: torch.device, *, final: bool, epoch: int, out_shape: list[int], producer: dict,
                    upstream: dict) -> Manifest:
    """Commit one version of ``name``: its outputs on ``src`` (a ``schedule.publish_fraction`` sample of rows
    for an intermediate version), or its weights alone when ``stack.<name>.store.materialize`` is false."""
    mcfg, train = cfg.stack[name], cfg.module_train(name)
    if not mcfg.store.materialize:
        weights = st_save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()})
        return store.commit_weights(name, weights, shape=out_shape, final=final, producer=producer, upstream=upstream)
    rows, n = None, len(src)
    fraction = 1.0 if final else cfg.schedule.publish_fraction
    if fraction < 1.0:
        rng = np.random.default_rng(train.seed + epoch)
        rows = np.sort(rng.choice(n, size=max(1, int(round(fraction * n))), replace=False))
    writer = store.begin_version(name, codec=cfg.module_codec(name), zstd_level=mcfg.store.zstd_level, final=final,
                                 rows_per_shard=cfg.store.rows_per_shard,
                                 sample_fraction=(len(rows) if rows is not None else n) / n,
                                 producer=producer, upstream=upstream)
    try:
        write_rows(writer, src, module, device, rows, chunk=max(256, 4 * train.batch_size))
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def write_rows(writer: VersionWriter, src: Source, module: torch.nn.Module, device: torch.device,
               rows: np.ndarray | None, chunk: int) -> None:
    """Module outputs of ``rows`` (all when None) in stored order into ``writer``."""
    module.eval()
    try:
        with torch.inference_mode():
            for idx, x in src.scan(rows):
                for lo in range(0, len(idx), chunk):
                    z = module(src.features(x[lo:lo + chunk], device))  # (chunk, *out_shape)
                    writer.write(src.meta.take(pa.array(idx[lo:lo + chunk])), z.cpu())
    finally:
        module.train()


def write_fetched(writer: VersionWriter, src: Source, module: torch.nn.Module, device: torch.device,
                  rows: np.ndarray) -> None:
    """Module outputs of ``rows`` (sorted) read by ``fetch``: a stream chunk of a few units."""
    module.eval()
    try:
        with torch.inference_mode():
            z = module(src.features(src.fetch(rows), device))
        writer.write(src.meta.take(pa.array(rows)), z.cpu())
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

    def __init__(self, ring: StreamRing, cfg: RunConfig, name: str, seed: list[int]) -> None:
        self.ring, self.cfg, self.name, self.seed = ring, cfg, name, seed
        self.train = cfg.module_train(name)
        self._since, self._cursor, self._order = 0, 0, None

    def tick(self, up: Source, module: torch.nn.Module, device: torch.device, *, step: int, producer: dict,
             upstream: dict) -> Manifest | None:
        """After one training step: the chunk committed now, or None when it is not yet time."""
        rows_total = len(up.train_rows())
        chunk = min(chunk_rows(self.cfg.store.window_samples, self.cfg.store.rows_per_shard), rows_total)
        self._since += 1
        if self._since * self.train.batch_size * self.cfg.schedule.publish_fraction < chunk:
            return None
        self._since = 0
        if self._order is None or self._cursor + chunk > len(self._order) or len(self._order) != rows_total:
            self._order, self._cursor = chunk_order(up, np.random.default_rng([*self.seed, step])), 0
        rows = np.sort(self._order[self._cursor:self._cursor + chunk])
        self._cursor += chunk
        store_cfg = self.cfg.stack[self.name].store
        return self.ring.append(lambda writer: write_fetched(writer, up, module, device, rows),
                                codec=self.cfg.module_codec(self.name), rows=len(rows), total_rows=len(up),
                                rows_per_shard=self.cfg.store.rows_per_shard, zstd_level=store_cfg.zstd_level,
                                producer=producer, upstream=upstream)
