"""A module's metric events, kept in memory and rewritten to the store after each epoch."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store import Store
from schemas.metrics import METRIC_SCHEMA, metrics_path


class MetricLog:
    """Events of one module generation (schema: ``schemas.metrics.METRIC_SCHEMA``)."""

    def __init__(self, store: Store, module: str, generation: int) -> None:
        self.store, self.generation = store, generation
        self.path = metrics_path(module, generation)
        self.rows: list[dict] = []

    def load(self, up_to_epoch: int) -> None:
        """The events already written, minus those a crash left after the checkpoint resumed from."""
        data = self.store.read_bytes(self.path)
        rows = pq.read_table(pa.BufferReader(data)).to_pylist() if data is not None else []
        self.rows = [r for r in rows if r["epoch"] <= up_to_epoch]

    def record(self, name: str, value, *, epoch: int, step: int) -> None:
        self.rows.append({"time": time.time(), "epoch": epoch, "step": step, "name": name,
                          "value": None if value is None else float(value), "generation": self.generation})

    def write(self) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(self.rows, schema=METRIC_SCHEMA), sink)
        self.store.write_bytes(self.path, sink.getvalue().to_pybytes())
