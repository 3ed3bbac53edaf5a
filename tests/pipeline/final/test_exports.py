"""The export files read as documented: DuckDB sees `embedding` as an array, pandas as one vector per row."""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.final import exports
from pipeline.store import META_COLUMNS


def _meta(n: int) -> pa.Table:
    rng = np.random.default_rng(0)
    return pa.table({
        "sample_id": pa.array(np.arange(n), pa.int64()),
        "split": pa.array(["train", "test"] * (n // 2)),
        "label": pa.array(rng.integers(0, 5, n), pa.int64()),
        "instance": pa.array(rng.integers(0, 10, n), pa.int64()),
        "azimuth": pa.array(rng.integers(0, 18, n) * 20.0, pa.float32()),
        "elevation": pa.array(30 + 5.0 * rng.integers(0, 9, n), pa.float32()),
        "lighting": pa.array(rng.integers(0, 6, n), pa.int64()),
    })


@pytest.fixture
def embeddings_file(tmp_path):
    emb = np.random.default_rng(1).standard_normal((8, 5)).astype(np.float32)
    table = exports.sample_embeddings(_meta(8), emb, {"run_id": "r1", "stage": "m4", "version": 3, "codec": "float16"})
    path = tmp_path / "embeddings.parquet"
    path.write_bytes(exports.parquet_bytes(table))
    return path, emb


def test_duckdb_reads_the_embedding_as_a_float_array(embeddings_file):
    path, emb = embeddings_file
    rows = duckdb.sql(f"select typeof(embedding), embedding, len(embedding) from read_parquet('{path}') "
                      "order by sample_id").fetchall()
    # Parquet has no fixed-size list type: DuckDB reads a list of float32 (one value per row, not 5 columns).
    assert rows[0][0] == "FLOAT[]" and {r[2] for r in rows} == {5}
    assert np.allclose(np.array([r[1] for r in rows], dtype=np.float32), emb)
    # The README's snippets: list functions directly, array functions after a cast to the width in the metadata.
    sims = duckdb.sql(f"select list_cosine_similarity(embedding, embedding), "
                      f"array_cosine_similarity(embedding::FLOAT[5], embedding::FLOAT[5]) "
                      f"from read_parquet('{path}') limit 1").fetchall()
    assert sims[0] == (pytest.approx(1.0, abs=1e-5), pytest.approx(1.0, abs=1e-5))
    kv = dict(duckdb.sql(f"select decode(key), decode(value) from parquet_kv_metadata('{path}')").fetchall())
    assert kv["isostack.run_id"] == "r1" and kv["isostack.dim"] == "5" and kv["isostack.codec"] == "float16"


def test_pyarrow_sees_a_fixed_size_list_and_the_provenance(embeddings_file):
    path, emb = embeddings_file
    table = pq.read_table(path)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 5)  # Arrow's own schema travels along
    assert np.array_equal(table.column("embedding").combine_chunks().flatten().to_numpy().reshape(-1, 5), emb)
    provenance = exports.read_provenance(str(path))
    assert {k: provenance[k] for k in ("run_id", "stage", "version", "dim", "embedding_dtype")} == {
        "run_id": "r1", "stage": "m4", "version": "3", "dim": "5", "embedding_dtype": "float32"}


def test_pandas_gets_one_vector_per_row(embeddings_file):
    path, emb = embeddings_file
    df = pq.read_table(path).to_pandas()
    assert list(df.columns) == list(META_COLUMNS) + ["embedding"]
    assert np.array_equal(np.stack(df["embedding"].to_numpy()), emb)


def test_pose_table_holds_the_figure_s_coordinates_and_predictions():
    meta = _meta(6)
    xyz = np.arange(18, dtype=np.float32).reshape(6, 3)
    table = exports.pose_table(meta, xyz, np.full(6, 40.0), np.full(6, 35.0), {"run_id": "r1", "stage": "m4"})
    assert table.column_names == list(META_COLUMNS) + exports.POSE_COLUMNS
    assert table.column("y").to_pylist() == xyz[:, 1].tolist()
    assert table.column("azimuth_pred").to_pylist() == [40.0] * 6
    assert b"isostack.coordinates" in table.schema.metadata
    assert b"the embedding itself" in table.schema.metadata[b"isostack.coordinates"]
    spectral = exports.pose_table(meta, xyz, np.full(6, 40.0), np.full(6, 35.0), {"run_id": "r1"}, projection="spectral")
    assert b"spectral embedding" in spectral.schema.metadata[b"isostack.coordinates"]
