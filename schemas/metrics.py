"""Metric events: one row per recorded value in ``metrics/<module>[.retrain-N].parquet``.

Names follow one prefix scheme: ``<module>/loss/train``, ``<module>/samples_per_s``,
``<module>/feed/partner_fetch_rate`` (the share of positives read from outside their row's
shuffle window), ``<module>/feed/rows_held`` (the feed's peak rows in memory), ...
"""

from __future__ import annotations

import pyarrow as pa

METRIC_SCHEMA = pa.schema([
    ("time", pa.float64()),        # unix seconds
    ("epoch", pa.int64()),         # epochs completed when recorded
    ("step", pa.int64()),          # optimizer steps completed when recorded
    ("name", pa.string()),
    ("value", pa.float64()),       # null where the value is unknown (e.g. a rate over zero seconds)
    ("generation", pa.int64()),    # 0, or N for the N-th retrain
])


def metrics_path(module: str, generation: int = 0) -> str:
    """Where a module's metric events live; a retrain writes beside the original."""
    return f"metrics/{module}{'' if generation == 0 else f'.retrain-{generation}'}.parquet"
