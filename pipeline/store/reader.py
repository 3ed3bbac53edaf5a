"""Reading one committed version: metadata, the whole tensor, batches, or one row group at a time.

Every read goes through ``pq.ParquetFile(..., page_checksum_verification=True)``, so a flipped byte in
a page is an IntegrityError at read time, not a silently wrong activation (``verify`` adds the
manifest's sha256 over whole shards). Row groups are the streaming unit: ``row_groups`` lists them
from the shard footers and ``read_row_group`` decodes one, so a feed never holds more than the row
groups it asked for.

torch is imported where tensors are made, not when this module loads, so the run driver's bookkeeping
through the store (manifests, JSON) never loads it (see codec.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import IntegrityError, StoreError
from pipeline.store.codec import Codec, get_codec
from pipeline.store.columns import META_COLUMNS, TENSOR_COLUMN, codec_fields
from pipeline.store.fs import RunFS
from schemas.manifest import Manifest

_CHUNK = 8 << 20


@dataclasses.dataclass
class Batch:
    """One batch of rows; nulls are NaN (azimuth, elevation) or -1 (integer columns)."""

    x: torch.Tensor  # (B, *shape)
    sample_id: torch.Tensor  # (B,) int64
    label: torch.Tensor  # (B,) int64, -1 = unknown
    instance: torch.Tensor  # (B,) int64, -1 = unknown
    azimuth: torch.Tensor  # (B,) float32 degrees, NaN = unknown
    elevation: torch.Tensor  # (B,) float32 degrees, NaN = unknown
    lighting: torch.Tensor  # (B,) int64, -1 = unknown
    split: np.ndarray  # (B,) str

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """The tensors moved to ``device`` (split stays a numpy array)."""
        import torch

        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=non_blocking)
        return Batch(**moved)


def sha256_of(fs: RunFS, rel: str) -> str:
    h = hashlib.sha256()
    with fs.fs.open_input_stream(fs.path(rel)) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class VersionReader:
    """A committed version of a stage; shards are read lazily and in manifest order."""

    def __init__(self, fs: RunFS, manifest: Manifest, version_dir: str, *, verify: bool = False) -> None:
        self.manifest = manifest
        self._fs = fs
        self._rels = [f"{version_dir}/{s.path}" for s in manifest.shards]
        self._offsets = np.cumsum([0] + [s.rows for s in manifest.shards])  # shard i holds rows [o[i], o[i+1])
        self._meta: pa.Table | None = None
        self._columns: dict[str, np.ndarray] | None = None
        self._files: dict[int, pq.ParquetFile] = {}
        self._groups: list[tuple[int, int, int]] | None = None
        self._check_present()
        if verify:
            self.verify()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.manifest.shape)

    def __len__(self) -> int:
        return self.manifest.rows

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest; IntegrityError on the first mismatch."""
        for rel, entry in zip(self._rels, self.manifest.shards):
            with self._fs.errors("read", rel):
                found = sha256_of(self._fs, rel)
            if found != entry.sha256:
                raise IntegrityError(
                    f"shard {self._fs.uri_of(rel)} of {self._name()} is corrupt: sha256 {found}, manifest expects {entry.sha256}",
                    "re-create the version (re-run or `isostack retrain` the module, or re-ingest the input) "
                    "and run `isostack gc` to drop the bad one")

    @property
    def meta(self) -> pa.Table:
        """Metadata columns of all rows, in shard order."""
        if self._meta is None:
            tables = [self._read_shard(i, list(META_COLUMNS)) for i in range(len(self._rels))]
            self._meta = pa.concat_tables(tables).combine_chunks() if tables else pa.table({})
        return self._meta

    def tensor(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole version as one ``(N, *shape)`` tensor of ``dtype`` (default float32)."""
        import torch

        out = torch.empty((self.manifest.rows, *self.shape), dtype=dtype or torch.float32)
        # The next shard is read (pyarrow, GIL released) while this one is copied out.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="isostack-read") as pool:
            ahead = pool.submit(self._read_shard, 0, [TENSOR_COLUMN]) if self._rels else None
            for i in range(len(self._rels)):
                table = ahead.result()
                ahead = pool.submit(self._read_shard, i + 1, [TENSOR_COLUMN]) if i + 1 < len(self._rels) else None
                lo = int(self._offsets[i])
                for part in self._table_tensors(table, i):
                    n = part.shape[0]
                    out[lo:lo + n].copy_(part)  # the one copy: Arrow buffer -> out, casting
                    lo += n
                del table
        return out

    def batches(self, batch_size: int, *, split: str | None = None, sample_ids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
                shuffle: bool = False, seed: int = 0, dtype: torch.dtype | None = None,
                drop_last: bool = False) -> Iterator[Batch]:
        """Batches of the selected rows.

        ``split`` keeps one split; ``sample_ids`` keeps those samples, in the
        order given; ``shuffle`` permutes the selection with ``seed``. Without
        shuffling a row order that only moves forward is streamed shard by
        shard (memory: about two shards); otherwise the shards the selection
        touches are held for the whole pass and each batch is gathered from them. ``dtype``: of the
        batches' ``x`` (default float32).
        """
        import torch

        dtype = dtype or torch.float32
        if batch_size < 1:
            raise StoreError(f"batch_size={batch_size}", "pass batch_size >= 1")
        order = self._select(split, sample_ids)
        if shuffle:
            order = order[np.random.default_rng(seed).permutation(len(order))]
        forward = bool(np.all(np.diff(order) >= 0))
        cols = self._meta_columns()
        loaded: dict[int, torch.Tensor] = {}
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            shard_of = np.searchsorted(self._offsets, idx, side="right") - 1
            if forward:  # shards before this batch are done with
                for s in [s for s in loaded if s < shard_of[0]]:
                    del loaded[s]
            x = torch.empty((len(idx), *self.shape), dtype=dtype)
            for s in np.unique(shard_of):
                if s not in loaded:
                    loaded[s] = self._shard_storage(int(s))
                src = loaded[s]
                pos = np.nonzero(shard_of == s)[0]
                local = idx[pos] - self._offsets[s]
                if np.all(np.diff(pos) == 1) and np.all(np.diff(local) == 1):
                    # A run of consecutive rows (the streaming case): slice, copy once while casting.
                    x[pos[0]:pos[-1] + 1].copy_(src[local[0]:local[-1] + 1])
                elif len(pos) == len(idx) and src.dtype == dtype:
                    torch.index_select(src, 0, torch.from_numpy(local), out=x)
                else:
                    x.index_copy_(0, torch.from_numpy(pos), src[torch.from_numpy(local)].to(dtype))
            t = torch.from_numpy
            yield Batch(x=x, sample_id=t(cols["sample_id"][idx]), label=t(cols["label"][idx]),
                        instance=t(cols["instance"][idx]), azimuth=t(cols["azimuth"][idx]),
                        elevation=t(cols["elevation"][idx]), lighting=t(cols["lighting"][idx]), split=cols["split"][idx])

    # ------------------------------------------------------------ internals

    def _name(self) -> str:
        return f"stage {self.manifest.stage!r} v{self.manifest.version}"

    def _check_present(self) -> None:
        if not self._rels:
            return
        for rel, info in zip(self._rels, self._fs.infos(self._rels)):
            if info.type != pafs.FileType.File:
                raise IntegrityError(f"shard {self._fs.uri_of(rel)} listed in the manifest of {self._name()} is missing",
                                     "re-create the version (re-run the module or re-ingest) and run `isostack gc`; "
                                     "do not delete files inside store/ by hand")

    def _open(self, i: int) -> pq.ParquetFile:
        """Shard ``i`` as a ParquetFile whose every page read checks its CRC (cached per reader)."""
        cached = self._files.get(i)
        if cached is not None:
            return cached
        rel = self._rels[i]
        with self._read_errors(rel):
            source = self._fs.path(rel) if self._fs.local else self._fs.fs.open_input_file(self._fs.path(rel))
            # pre_buffer hands each read to Arrow's I/O thread pool (coalescing ranges: what an object store
            # wants); on a local file a row group's one column chunk is one read either way, and the hand-off
            # cost the streamed feed ~0.3 s of CPU a GB (the pool's thread and the waiting reader's system time).
            pf = pq.ParquetFile(source, page_checksum_verification=True, memory_map=False,
                                pre_buffer=not self._fs.local)
        expected = self.manifest.shards[i].rows
        if pf.metadata.num_rows != expected:
            raise IntegrityError(f"shard {self._fs.uri_of(rel)} of {self._name()} has {pf.metadata.num_rows} rows, "
                                 f"manifest says {expected}", "re-create the version and run `isostack gc`")
        if len(self._files) >= 4:  # a few open footers at most: a scan moves forward
            self._files.pop(next(iter(self._files)))
        self._files[i] = pf
        return pf

    @contextlib.contextmanager
    def _read_errors(self, rel: str):
        try:
            yield
        except FileNotFoundError:
            raise IntegrityError(f"shard {self._fs.uri_of(rel)} of {self._name()} is missing",
                                 "re-create the version and run `isostack gc`") from None
        except (OSError, pa.ArrowInvalid) as e:
            raise IntegrityError(f"shard {self._fs.uri_of(rel)} of {self._name()} cannot be read: {e}",
                                 "run `isostack verify` on the run; re-create the version if its checksum fails") from None

    def _read_shard(self, i: int, columns: list[str]) -> pa.Table:
        pf = self._open(i)
        with self._read_errors(self._rels[i]):
            return pf.read(columns=columns)

    def row_groups(self) -> list[tuple[int, int, int]]:
        """``(shard, row group, rows)`` of every row group in stored order (from the shard footers)."""
        if self._groups is None:
            groups = []
            for i in range(len(self._rels)):
                md = self._open(i).metadata
                groups += [(i, g, md.row_group(g).num_rows) for g in range(md.num_row_groups)]
            self._groups = groups
        return self._groups

    def read_row_group(self, shard: int, group: int) -> torch.Tensor:
        """One row group's rows, ``(rows, *shape)`` in the codec's storage dtype (uint8, float16, ...)."""
        import torch

        pf = self._open(shard)
        with self._read_errors(self._rels[shard]):
            # Decoded on the calling (readahead) thread: Arrow's pool costs the same CPU in more threads
            # contending with the trainer for the same cores.
            table = pf.read_row_group(group, columns=[TENSOR_COLUMN], use_threads=False)
        table = table.replace_schema_metadata(pf.schema_arrow.metadata)
        parts = list(self._table_tensors(table, shard))
        if not parts:
            return torch.empty((0, *self.shape))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _shard_tensors(self, i: int) -> Iterator[torch.Tensor]:
        """Zero-copy storage-dtype views of shard ``i``'s tensor column, one per Arrow chunk."""
        return self._table_tensors(self._read_shard(i, [TENSOR_COLUMN]), i)

    def _table_tensors(self, table: pa.Table, i: int) -> Iterator[torch.Tensor]:
        codec = self._codec_for(table.schema, i)
        for chunk in table.column(TENSOR_COLUMN).chunks:
            n = len(chunk)
            if n == 0:
                continue
            data = chunk.buffers()[1].slice(chunk.offset * codec.row_bytes, n * codec.row_bytes)
            # The view keeps ``data`` (and so the table's memory) alive through numpy's base.
            yield codec.decode(data, n)

    def _shard_storage(self, i: int) -> torch.Tensor:
        """Shard ``i``'s rows in the codec's dtype, as one tensor (a view when the shard is one chunk)."""
        import torch

        parts = list(self._shard_tensors(i))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _codec_for(self, schema: pa.Schema, i: int) -> Codec:
        name, shape, params = codec_fields(schema)
        if name != self.manifest.codec or list(shape) != self.manifest.shape:
            raise IntegrityError(f"shard {self._fs.uri_of(self._rels[i])} holds codec {name} shape {list(shape)}, "
                                 f"manifest of {self._name()} says {self.manifest.codec} {self.manifest.shape}",
                                 "re-create the version and run `isostack gc`")
        return get_codec(name, shape, params)

    def _meta_columns(self) -> dict[str, np.ndarray]:
        """Metadata as numpy arrays with nulls filled (-1 / NaN), computed once."""
        if self._columns is None:
            meta = self.meta
            cols: dict[str, np.ndarray] = {}
            for name in META_COLUMNS:
                col = meta.column(name)
                if name == "split":
                    cols[name] = np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)
                elif pa.types.is_floating(col.type):
                    cols[name] = col.fill_null(float("nan")).to_numpy().astype(np.float32)
                else:
                    cols[name] = col.fill_null(-1).to_numpy().astype(np.int64)
            self._columns = cols
        return self._columns

    def _select(self, split: str | None, sample_ids) -> np.ndarray:
        """Global row indices of the selection, in row order (or in ``sample_ids`` order)."""
        cols = self._meta_columns()
        if sample_ids is not None:
            import torch

            wanted = np.asarray(sample_ids.cpu() if isinstance(sample_ids, torch.Tensor) else sample_ids, dtype=np.int64).reshape(-1)
            ids = cols["sample_id"]
            sorter = np.argsort(ids, kind="stable")
            pos = np.searchsorted(ids, wanted, sorter=sorter)
            pos = np.minimum(pos, len(ids) - 1) if len(ids) else pos
            hit = (ids[sorter[pos]] == wanted) if len(ids) else np.zeros(len(wanted), bool)
            if not hit.all():
                missing = wanted[~hit]
                raise StoreError(f"{len(missing)} sample_ids are not in {self._name()} (e.g. {missing[:5].tolist()})",
                                 "ask only for sample ids of this stage (sample_fraction < 1 versions hold a subset)")
            order = sorter[pos]
        else:
            order = np.arange(self.manifest.rows)
        if split is not None:
            order = order[cols["split"][order] == split]
        return order.astype(np.int64)
