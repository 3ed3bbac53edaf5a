"""The export files a user loads elsewhere: ``embeddings.parquet``, ``pose.parquet`` and ``isostack embed``'s output.

One row per sample. The embedding is one ``embedding`` column, a fixed-size list of float32 (pyarrow reads it
back as fixed_size_list<float>[D], pandas as a numpy array per row, DuckDB as a ``FLOAT[]`` list per row: cast
to ``FLOAT[D]`` for DuckDB's array functions), so the width is part of the schema. Each file carries Parquet key-value metadata (``isostack.*``: run id, stage, version, the
store codec the activations were decoded from, dimension, isostack version), so a copied file still says
where it came from.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store import META_COLUMNS

POSE_COLUMNS = ["x", "y", "z", "azimuth_pred", "elevation_pred"]


def isostack_version() -> str:
    try:
        return importlib.metadata.version("isostack")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


def embedding_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) -> a fixed-size list<float32>[D] array of N rows."""
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])


def embeddings_table(columns: dict[str, pa.Array], emb: np.ndarray, provenance: dict) -> pa.Table:
    """The given columns, then ``embedding``; ``provenance`` (run_id, stage, version, codec, ...) as key-value metadata.

    emb: (N, D) float32, the pooled activations of ``provenance['stage']``.
    """
    table = pa.table({**columns, "embedding": embedding_array(emb)})
    return _with_metadata(table, {**provenance, "dim": int(emb.shape[1]), "embedding_dtype": "float32"})


def sample_embeddings(meta: pa.Table, emb: np.ndarray, provenance: dict) -> pa.Table:
    """``embeddings.parquet``: every sample's metadata (META_COLUMNS) and its embedding."""
    return embeddings_table({c: meta.column(c) for c in META_COLUMNS}, emb, provenance)


def pose_table(meta: pa.Table, xyz: np.ndarray, azimuth_pred: np.ndarray, elevation_pred: np.ndarray,
               provenance: dict, *, projection: str = "") -> pa.Table:
    """``pose.parquet``: what the pose figure draws, one row per test sample.

    meta: the test rows (META_COLUMNS); xyz: (M, 3) the figure's coordinates (``plots.project_3d``: the
    embedding, or ``projection`` "PCA" / "spectral" of it to 3 dimensions); azimuth_pred / elevation_pred: (M,)
    degrees, the kNN pose prediction from the train split.
    """
    columns = {c: meta.column(c) for c in META_COLUMNS}
    xyz = np.asarray(xyz, dtype=np.float32)
    for j, axis in enumerate("xyz"):
        columns[axis] = pa.array(xyz[:, j])
    columns["azimuth_pred"] = pa.array(np.asarray(azimuth_pred, dtype=np.float32))
    columns["elevation_pred"] = pa.array(np.asarray(elevation_pred, dtype=np.float32))
    how = {"PCA": "the PCA of the test embeddings to 3 dimensions",
           "spectral": "a spectral embedding (Laplacian eigenmaps) of the test embeddings' nearest-neighbour graph "
                       "to 3 dimensions"}.get(projection, "the embedding itself")
    return _with_metadata(pa.table(columns), {**provenance, "coordinates": f"x, y, z: {how}"})


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def read_provenance(path: str) -> dict:
    """The ``isostack.*`` key-value metadata of an export file (plain strings), keys without the prefix."""
    kv = pq.read_schema(path).metadata or {}
    return {k.decode()[len("isostack."):]: v.decode() for k, v in kv.items() if k.startswith(b"isostack.")}


def _with_metadata(table: pa.Table, provenance: dict) -> pa.Table:
    kv = {f"isostack.{k}": str(v) for k, v in {**provenance, "isostack_version": isostack_version()}.items()}
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **kv})
