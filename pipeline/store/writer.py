"""Writing one version of a stage: stream rows in, shards out, manifest last."""

from __future__ import annotations

import datetime as dt
import json
import uuid
import warnings
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import faults
from pipeline.errors import StoreError
from pipeline.store.codec import Codec, as_tensor, get_codec
from pipeline.store.columns import META_COLUMNS, TENSOR_COLUMN, conform_meta, shard_schema
from pipeline.store.fs import RunFS
from schemas.manifest import Manifest, ShardEntry

MANIFEST = "_MANIFEST.json"

# Parquet options: float activations barely compress and are unique per row, so
# dictionaries, statistics and (by default) compression would only cost time on
# the tensor column; a stage may still ask for zstd there (ReLU zeros, int8
# codes do compress). Large pages keep the per-page overhead small next to ~100 KB rows.
_WRITE_OPTIONS: dict[str, Any] = dict(
    compression={**{c: "zstd" for c in META_COLUMNS}, TENSOR_COLUMN: "none"},
    use_dictionary=["split"],
    write_statistics=["sample_id"],
    data_page_size=8 << 20,
    # CRC32 per data page, checked by every normal read (reader.py), so a flipped byte is refused there,
    # not only by `isostack verify`'s sha256.
    write_page_checksum=True,
)


def write_options(zstd_level: int | None) -> dict[str, Any]:
    """Parquet options of a shard; ``zstd_level`` compresses the tensor column too (None: stored raw)."""
    if zstd_level is None:
        return _WRITE_OPTIONS
    if not 1 <= zstd_level <= 22:
        raise StoreError(f"zstd_level={zstd_level}", "pass a zstd level from 1 to 22, or None for no compression")
    return {**_WRITE_OPTIONS, "compression": {**_WRITE_OPTIONS["compression"], TENSOR_COLUMN: "zstd"},
            "compression_level": {TENSOR_COLUMN: zstd_level}}


def version_dir(stage: str, version: int) -> str:
    return f"store/{stage}/v{version:04d}"


ROW_GROUP_BYTES = 64 << 20  # a feed reads one row group at a time (pipeline/feed); keep it a few MB..64 MB


class VersionWriter:
    """Streams ``(meta, tensor)`` batches into shards of ``rows_per_shard`` rows.

    Nothing is visible to readers until ``commit`` writes the manifest. A
    writer that dies leaves only shard files nobody lists (``Store.orphans``).

    ``split_row_groups`` (default): no row group mixes splits. Each shard's rows are stored one split
    after the other (each split's rows in the order written; the splits in the order they first appear
    in the shard), each split in row groups of its own, so a reader that wants the train rows (a
    trainer's streamed epoch reads whole row groups) never reads a test row. Which shard a row lands in
    does not change, only its place inside the shard: a row's position in a version is not the order
    written, nor its position in another version (shard sizes differ between stages), so readers pair
    rows by ``sample_id`` (``Source.merge``, ``concat_upstreams``, ``batches(sample_ids=...)``), never by
    position. ``False`` stores the rows exactly in the order written, train and test mixed in row groups
    (the old layout): kept for ``benchmarks/out_of_core.py --mixed-row-groups``, which measures what
    the split layout saves, and for tests that compare the two.
    """

    def __init__(self, fs: RunFS, stage: str, version: int, *, codec: str, final: bool,
                 producer: dict[str, Any] | None, upstream: dict[str, Any] | None,
                 sample_fraction: float, rows_per_shard: int, zstd_level: int | None = None,
                 split_row_groups: bool = True) -> None:
        if rows_per_shard < 1:
            raise StoreError(f"rows_per_shard={rows_per_shard} for stage {stage!r}", "pass rows_per_shard >= 1")
        if not 0 < sample_fraction <= 1:
            raise StoreError(f"sample_fraction={sample_fraction} for stage {stage!r}", "pass 0 < sample_fraction <= 1")
        get_codec(codec, ())  # unknown codec names fail here, before any data moves
        self._options = write_options(zstd_level)
        self.stage, self.version = stage, version
        self.dir = version_dir(stage, version)
        self._fs = fs
        self._codec_name = codec
        self._final = final
        self._producer = dict(producer or {})
        self._upstream = dict(upstream) if upstream is not None else None
        self._sample_fraction = sample_fraction
        self._rows_per_shard = rows_per_shard
        self._split_row_groups = split_row_groups
        self._codec: Codec | None = None  # the open shard's codec: a fresh one per shard (per-shard params)
        self._shard_schema: pa.Schema | None = None  # the open shard's schema (its codec params)
        self._schema: pa.Schema | None = None  # the version's schema as the manifest records it
        self._shape: tuple[int, ...] | None = None
        self._stats: dict[str, float] = {}
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self._shards: list[ShardEntry] = []  # complete entries (sha256 known)
        self._hashing: list[tuple[str, int, Any]] = []  # (name, rows, file) whose sha256 a helper thread computes
        self._written: list[str] = []  # relpaths, including ones that may be half written
        self._ids: list[np.ndarray] = []
        self._splits: dict[str, int] = {}
        self._state = "open"

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self._shards) + sum(r for _, r, _ in self._hashing) + self._pending_rows

    def write(self, meta: pa.Table | Mapping[str, Any], tensor: torch.Tensor | np.ndarray) -> None:
        """Append rows: ``meta`` (N rows of metadata columns), ``tensor: (N, *shape)``."""
        self._check_open("write to")
        x = as_tensor(tensor)
        if x.dim() < 1:
            raise StoreError(f"stage {self.stage!r}: a tensor of shape {tuple(x.shape)} has no row dimension",
                             "pass a tensor shaped (N, *shape)")
        n = x.shape[0]
        table = conform_meta(meta, n)
        if self._shape is None:
            self._shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != self._shape:
            raise StoreError(f"stage {self.stage!r} v{self.version}: rows of shape {tuple(x.shape[1:])} after rows of "
                             f"shape {self._shape}", "write tensors of one shape per version")
        self._ids.append(table.column("sample_id").to_numpy())
        for value, count in _value_counts(table.column("split")):
            self._splits[value] = self._splits.get(value, 0) + count
        # Fill the open shard. Rows that go into a shard now are written from the
        # caller's memory. Rows left pending must not share it (the caller may
        # reuse its tensor once write() returns): a tail of at least half a shard
        # becomes a short shard at once, a smaller one is copied. Rows are encoded
        # piece by piece with the open shard's codec, so a calibrating codec (int8)
        # fits each shard on that shard's first rows.
        start = 0
        while start < n:
            take = min(self._rows_per_shard - self._pending_rows, n - start)
            if self._pending_rows == 0:
                self._open_shard()
            xs = x[start:start + take]
            try:
                encoded = self._codec.encode(xs)
            except BaseException:
                self._state = "failed"  # rows of this call are half counted: the version cannot be committed
                raise
            if self._shard_schema is None:
                # After the shard's first encode: codecs with learned parameters have fixed them now.
                c = self._codec
                self._shard_schema = shard_schema(c.name, c.dtype, c.shape, c.row_bytes, c.params)
                if self._schema is None:  # per-shard params stay out of the manifest's copy
                    self._schema = shard_schema(c.name, c.dtype, c.shape, c.row_bytes, {})
            piece = pa.Table.from_arrays(list(table.slice(start, take).columns) + [encoded], schema=self._shard_schema)
            shared = _shares_memory(encoded, xs)
            start += take
            filled = self._pending_rows + take
            if filled == self._rows_per_shard or (shared and 2 * filled >= self._rows_per_shard):
                self._write_shard(pa.concat_tables(self._pending + [piece]))
                self._pending, self._pending_rows = [], 0
            else:
                self._pending.append(_owned(piece) if shared else piece)
                self._pending_rows = filled

    def commit(self) -> Manifest:
        """Write the remaining rows and then the manifest: the version now exists."""
        self._check_open("commit")
        if self._schema is None or self._codec is None:
            raise StoreError(f"stage {self.stage!r} v{self.version} has no rows to commit",
                             "call write() at least once before commit(), or abort() the version")
        ids = np.concatenate(self._ids)
        if len(np.unique(ids)) != len(ids):
            self._state = "failed"
            raise StoreError(f"stage {self.stage!r} v{self.version}: sample_id values repeat",
                             "write each sample once per version; abort() this writer and begin a new version")
        if self._pending_rows:
            self._write_shard(pa.concat_tables(self._pending))
            self._pending, self._pending_rows = [], 0
        self._collect_hashes()
        manifest = Manifest(
            stage=self.stage, version=self.version, final=self._final,
            created_at=dt.datetime.now(dt.timezone.utc).isoformat(), codec=self._codec.name, dtype=self._codec.dtype,
            shape=list(self._codec.shape), rows=len(ids), shards=list(self._shards), splits=dict(sorted(self._splits.items())),
            sample_fraction=self._sample_fraction, producer=self._producer, upstream=self._upstream,
            arrow_schema=self._schema.to_string(), codec_stats=self._codec_stats(),
        )
        if self._fs.local:
            self._fs.fsync_dir(self._fs.path(self.dir))  # the shard renames, before the commit
        faults.maybe_kill("kill_before_manifest", self.stage)
        faults.maybe_stall("slow_commit", self.stage)
        with self._fs.errors("commit", f"{self.dir}/{MANIFEST}"):
            faults.maybe_raise("eacces_manifest", self.stage)
        self._fs.write_atomic(f"{self.dir}/{MANIFEST}", json.dumps(manifest.model_dump(mode="json"), indent=1).encode())
        self._state = "committed"
        return manifest

    def abort(self) -> None:
        """Best effort: delete what this writer wrote; the version number stays used."""
        if self._state == "committed":
            return
        self._state = "aborted"
        self._pending, self._pending_rows = [], 0
        for rel in self._written:
            try:
                self._fs.delete(rel)
            except StoreError:
                pass  # left for Store.gc(); it lists files no manifest names

    def __enter__(self) -> "VersionWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # An exception aborts; a clean exit without commit() is also an abort, never an implicit commit.
        if self._state == "open":
            self.abort()

    # ------------------------------------------------------------ internals

    def _check_open(self, action: str) -> None:
        if self._state != "open":
            raise StoreError(f"cannot {action} stage {self.stage!r} v{self.version}: the writer is {self._state}",
                             "begin a new version with store.begin_version()")

    def _open_shard(self) -> None:
        self._codec = get_codec(self._codec_name, self._shape)
        self._shard_schema = None

    def _codec_stats(self) -> dict[str, Any]:
        """The codec's counters summed over shards (int8: clipped values), {} for codecs without any."""
        if not self._stats:
            return {}
        out: dict[str, Any] = {"calibration": "per shard, on its first written rows", **self._stats}
        if self._stats.get("values"):
            out["clipped_fraction"] = self._stats["clipped"] / self._stats["values"]
            if out["clipped_fraction"] > 1e-3:
                warnings.warn(f"stage {self.stage!r} v{self.version}: {out['clipped_fraction']:.2%} of the values "
                              f"fell outside the {self._codec_name} range calibrated on each shard's first rows and "
                              "were clipped; write larger batches or use codec float16", stacklevel=3)
        return out

    def _write_shard(self, shard: pa.Table) -> None:
        rows = shard.num_rows
        name = f"part-{uuid.uuid4().hex}.parquet"
        rel = f"{self.dir}/{name}"
        self._written.append(rel)
        try:
            with self._fs.write_stream(rel) as f:
                faults.maybe_raise("enospc_shard", self.stage)
                # Row groups are what a streaming reader holds at once: at most ROW_GROUP_BYTES of tensors each.
                group = max(1, min(rows, ROW_GROUP_BYTES // max(1, self._codec.row_bytes)))
                if self._split_row_groups:
                    with pq.ParquetWriter(f.sink, shard.schema, **self._options) as pw:
                        for part in _split_parts(shard):  # a split at a time (copied only where its rows are not one run)
                            pw.write_table(part, row_group_size=group)
                else:
                    pq.write_table(shard, f.sink, row_group_size=group, **self._options)
        except BaseException:
            self._state = "failed"
            raise
        stats = getattr(self._codec, "stats", None)
        if stats is not None:
            for k, v in stats().items():
                self._stats[k] = max(self._stats.get(k, 0), v) if k.startswith("max") else self._stats.get(k, 0) + v
        self._hashing.append((name, rows, f))  # the sha256 may still be computing: collected at commit

    def _collect_hashes(self) -> None:
        for name, rows, f in self._hashing:
            with self._fs.errors("hash", f"{self.dir}/{name}"):
                try:
                    digest = f.hexdigest()
                except BaseException:
                    self._state = "failed"
                    raise
            self._shards.append(ShardEntry(path=name, rows=rows, bytes=f.nbytes, sha256=digest))
        self._hashing = []


def _shares_memory(encoded: pa.FixedSizeBinaryArray, x: torch.Tensor) -> bool:
    if x.device.type != "cpu":
        return False
    storage = x.untyped_storage()
    lo, hi = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    buf = encoded.buffers()[1]
    return buf.address < hi and buf.address + buf.size > lo


def _owned(table: pa.Table) -> pa.Table:
    """``table`` with its tensor column copied out of whatever memory it shares."""
    col = table.column(TENSOR_COLUMN).combine_chunks()
    width = col.type.byte_width
    data = pa.allocate_buffer(len(col) * width)  # from Arrow's pool, not the C heap the caller's next chunk reuses
    np.frombuffer(data, dtype=np.uint8)[:] = np.frombuffer(col.buffers()[1], dtype=np.uint8, count=len(col) * width,
                                                          offset=col.offset * width)
    x = pa.FixedSizeBinaryArray.from_buffers(col.type, len(col), [None, data])
    return table.set_column(table.schema.get_field_index(TENSOR_COLUMN), table.schema.field(TENSOR_COLUMN), x)


def _split_parts(shard: pa.Table):
    """The rows of ``shard`` one split at a time (in the order each split first appears; rows in written order).

    A split whose rows are one run already is a zero-copy slice; otherwise its rows are taken (copied).
    """
    rows: dict[Any, list[int]] = {}
    for i, value in enumerate(shard.column("split").to_pylist()):
        rows.setdefault(value, []).append(i)
    if len(rows) <= 1:
        yield shard
        return
    for at in rows.values():
        if at[-1] - at[0] + 1 == len(at):
            yield shard.slice(at[0], len(at))
        else:
            yield shard.take(pa.array(at, pa.int64()))


def _value_counts(col: pa.ChunkedArray) -> list[tuple[str, int]]:
    counts = pc.value_counts(col)
    return [(v.as_py(), c.as_py()) for v, c in zip(counts.field("values"), counts.field("counts"))]
