"""The columns of a shard: per-sample metadata plus the tensor column ``x``."""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import StoreError

META_COLUMNS: tuple[str, ...] = ("sample_id", "split", "label", "instance", "azimuth", "elevation", "lighting")
TENSOR_COLUMN = "x"
REQUIRED_COLUMNS = ("sample_id", "split")

# Schema-metadata keys of a shard (all values are strings; shape and params as JSON).
MD_CODEC, MD_DTYPE, MD_SHAPE, MD_PARAMS = b"codec", b"dtype", b"shape", b"codec_params"


def column_array(table: pa.Table, name: str, dtype, fill) -> np.ndarray:
    """Metadata column ``name`` of ``table`` as a numpy array of ``dtype``, nulls as ``fill``."""
    return np.asarray(table.column(name).fill_null(fill).to_numpy(zero_copy_only=False), dtype=dtype)


def meta_schema() -> pa.Schema:
    """Arrow schema of the metadata columns (azimuth/elevation in degrees)."""
    return pa.schema([
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # "train" / "test"
        pa.field("label", pa.int64()),
        pa.field("instance", pa.int64()),
        pa.field("azimuth", pa.float32()),
        pa.field("elevation", pa.float32()),
        pa.field("lighting", pa.int64()),
    ])


def shard_schema(codec_name: str, dtype: str, shape: tuple[int, ...], row_bytes: int,
                 params: dict[str, Any]) -> pa.Schema:
    """``meta_schema()`` + ``x: fixed_size_binary(row_bytes)``, codec recorded in the metadata."""
    fields = list(meta_schema()) + [pa.field(TENSOR_COLUMN, pa.binary(row_bytes), nullable=False)]
    return pa.schema(fields, metadata={
        MD_CODEC: codec_name, MD_DTYPE: dtype, MD_SHAPE: json.dumps(list(shape)), MD_PARAMS: json.dumps(params),
    })


def codec_fields(schema: pa.Schema) -> tuple[str, tuple[int, ...], dict[str, Any]]:
    """(codec name, row shape, codec params) from a shard's schema metadata."""
    md = schema.metadata or {}
    if MD_CODEC not in md or MD_SHAPE not in md:
        raise StoreError("shard schema has no codec/shape metadata", "the file was not written by isostack's store")
    params = json.loads(md[MD_PARAMS]) if MD_PARAMS in md else {}
    return md[MD_CODEC].decode(), tuple(json.loads(md[MD_SHAPE])), params


def conform_meta(meta: pa.Table | Mapping[str, Any], n: int) -> pa.Table:
    """``meta`` with exactly ``META_COLUMNS`` in ``meta_schema()`` types.

    Nullable columns a dataset lacks are filled with nulls; ``sample_id`` and
    ``split`` must be present and non-null; unknown columns are an error
    (they would be silently dropped otherwise).
    """
    table = meta if isinstance(meta, pa.Table) else pa.table(dict(meta))
    if table.num_rows != n:
        raise StoreError(f"metadata has {table.num_rows} rows but the tensor has {n}",
                         "pass one metadata row per tensor row")
    unknown = sorted(set(table.column_names) - set(META_COLUMNS))
    if unknown:
        raise StoreError(f"unknown metadata columns {unknown}", f"keep only {list(META_COLUMNS)}")
    columns = []
    for field in meta_schema():
        if field.name not in table.column_names:
            if field.name in REQUIRED_COLUMNS:
                raise StoreError(f"metadata lacks the required column {field.name!r}",
                                 f"add {field.name!r} ({field.type}) to the metadata table")
            columns.append(pa.nulls(n, field.type))
            continue
        col = table.column(field.name)
        try:
            # safe=False: float64 degrees -> float32 loses digits by design.
            col = pc.cast(col, field.type, safe=field.type != pa.float32())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise StoreError(f"metadata column {field.name!r} of type {col.type} cannot become {field.type}: {e}",
                             f"pass {field.name!r} as {field.type}") from None
        if field.name in REQUIRED_COLUMNS and col.null_count:
            raise StoreError(f"metadata column {field.name!r} has {col.null_count} nulls",
                             f"give every row a {field.name}")
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=meta_schema())
