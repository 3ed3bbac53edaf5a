"""The store's file system: one run root on a local disk or an object store.

Every path the store touches goes through ``RunFS`` as a path relative to the
run root, so the rest of the store never sees URIs. On a local file system a
file appears under its final name only once it is complete and fsynced
(temp name in the same directory + rename); on object stores one PUT (or a
multipart upload that completes on close) gives the same guarantee.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import mmap
import os
import posixpath
import uuid
import urllib.parse
from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import StoreError
from schemas.config import uri_credentials_problem


# How many times a listing that raced a directory's creation is taken again before it is an error (RunFS.listdir).
_LIST_RETRIES = 4
_OVERLAP_BYTES = 1 << 20
_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _hash_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="isostack-sha256")
    return _POOL


class HashingFile:
    """A write-only file object that hashes (sha256) what passes through it."""

    def __init__(self, sink) -> None:
        self._sink = sink
        self._hash = hashlib.sha256()
        self.nbytes = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        if view.nbytes >= _OVERLAP_BYTES:
            # Hash on a helper thread while this one writes: both release the GIL,
            # so a page costs max(hash, write) instead of their sum.
            hashed = _hash_pool().submit(self._hash.update, view)
            self._sink.write(view)
            hashed.result()
        else:
            self._hash.update(view)
            self._sink.write(view)
        self.nbytes += view.nbytes
        return view.nbytes

    @property
    def sink(self) -> "HashingFile":
        return self

    def tell(self) -> int:
        return self.nbytes

    def flush(self) -> None:
        self._sink.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        # The owner closes the sink (after fsync); writers that close us just stop.
        self.closed = True

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class LocalShardFile:
    """A native (C++) file for Parquet to write into; size and sha256 are taken after it is complete.

    Parquet written through a Python file object pays a GIL round trip per page
    (about a quarter of the native speed, measured in benchmarks/README.md); here
    pyarrow writes natively and the hash is computed from the finished file (page
    cache, mmap) on a helper thread while this one fsyncs it.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.sink = pa.OSFile(path, "wb")
        self.nbytes = 0
        self._digest: str | None = None
        self._hashed: concurrent.futures.Future | None = None

    def finish(self) -> None:
        """Close and fsync; the hash starts on a helper thread and is collected by ``hexdigest``.

        The file is complete and never written again, so its hash can overlap the
        fsync here and whatever the caller does next (encoding the next shard).
        """
        self.sink.close()
        self.nbytes = os.path.getsize(self.path)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            # The helper hashes through its own descriptor, so the caller may rename the file at once.
            self._hashed = _hash_pool().submit(_sha256_of_fd, os.dup(fd))
            os.fsync(fd)
        finally:
            os.close(fd)

    def hexdigest(self) -> str:
        """The sha256, waiting for the helper thread if it is still hashing."""
        if self._digest is None:
            if self._hashed is None:
                raise RuntimeError("LocalShardFile.hexdigest() before finish()")
            self._digest = self._hashed.result()
        return self._digest


def _sha256_of_fd(fd: int) -> str:
    """sha256 of the whole file open as ``fd`` (closed here), read through the page cache."""
    h = hashlib.sha256()
    try:
        if os.fstat(fd).st_size:
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
                h.update(m)
    finally:
        os.close(fd)
    return h.hexdigest()


class RunFS:
    """Paths relative to ``<uri>/<run_id>`` on the file system ``uri`` names."""

    def __init__(self, uri: str, run_id: str, *, create: bool = True) -> None:
        if not run_id or "/" in run_id or run_id in (".", ".."):
            raise StoreError(f"run id {run_id!r} is not a plain name", "use letters, digits, '.', '_' or '-'")
        self.uri = uri
        problem = uri_credentials_problem(uri)
        if problem:
            raise StoreError(problem, "pass the URI without credentials (--store / store.uri)")
        try:
            if "://" in uri:
                self.fs, base = pafs.FileSystem.from_uri(uri)
            else:
                self.fs, base = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
        except (OSError, ValueError) as e:
            raise StoreError(f"store URI {uri!r} cannot be opened: {e}",
                             "pass a local path or a URI pyarrow.fs understands (s3://bucket/prefix, gs://, file://)") from None
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.root = posixpath.join(base.rstrip("/") or "/", run_id)
        self.root_uri = self.root if "://" not in uri else _join_uri(uri, run_id)
        if create:
            self._create_root()

    def _create_root(self) -> None:
        try:
            self.fs.create_dir(self.root, recursive=True)
        except OSError as e:
            raise StoreError(f"store root {self.root_uri} (from URI {self.uri!r}) cannot be created: {e}",
                             "point the store at a writable directory or bucket (--store / store.uri)") from None
        if self.local and not (os.path.isdir(self.root) and os.access(self.root, os.W_OK)):
            raise StoreError(f"store root {self.root_uri} (from URI {self.uri!r}) is not a writable directory",
                             "point the store at a writable directory (--store / store.uri)")

    # ------------------------------------------------------------ paths

    def path(self, rel: str) -> str:
        """The file-system path of ``rel``; refuses paths that leave the run root."""
        norm = posixpath.normpath(rel) if rel else "."
        if norm.startswith("/") or norm == ".." or norm.startswith("../"):
            raise StoreError(f"store path {rel!r} leaves the run root {self.root_uri}", "pass a path relative to the run root")
        return self.root if norm == "." else posixpath.join(self.root, norm)

    def uri_of(self, rel: str) -> str:
        return _join_uri(self.root_uri, rel) if rel else self.root_uri

    @contextlib.contextmanager
    def errors(self, action: str, rel: str) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except OSError as e:
            raise StoreError(f"cannot {action} {self.uri_of(rel)}: {e}",
                             "check that the store is reachable and writable (permissions, disk space, credentials)") from None

    # ------------------------------------------------------------ small files

    def write_atomic(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        with self.errors("write", rel):
            parent = posixpath.dirname(path)
            if not self.local:
                with self.fs.open_output_stream(path) as f:
                    f.write(data)
                return
            os.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
            self.fsync_dir(parent)

    def read(self, rel: str) -> bytes | None:
        path = self.path(rel)
        with self.errors("read", rel):
            try:
                with self.fs.open_input_stream(path) as f:
                    return f.readall()
            except FileNotFoundError:
                return None
            except OSError:
                # Some file systems report a missing key with a plain IOError.
                if self.info(rel).type == pafs.FileType.NotFound:
                    return None
                raise

    @contextlib.contextmanager
    def write_stream(self, rel: str) -> Iterator[HashingFile | LocalShardFile]:
        """A file for a large file that appears under ``rel`` only when complete.

        Write into ``.sink``; after the block ``.nbytes`` and ``.hexdigest()`` (sha256) describe it.
        """
        path = self.path(rel)
        with self.errors("write", rel):
            if not self.local:
                with self.fs.open_output_stream(path) as stream:
                    f = HashingFile(stream)
                    yield f
                return
            tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp")
            f = LocalShardFile(tmp)
            try:
                yield f
                f.finish()
                os.replace(tmp, path)
            except BaseException:
                f.sink.close()
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise

    def fsync_dir(self, parent: str) -> None:
        """Make renames in ``parent`` (a file-system path) durable; local only."""
        if not self.local:
            return
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------ listing, deleting

    def info(self, rel: str) -> pafs.FileInfo:
        with self.errors("inspect", rel):
            return self.fs.get_file_info(self.path(rel))

    def infos(self, rels: list[str]) -> list[pafs.FileInfo]:
        with self.errors("inspect", rels[0] if rels else ""):
            return self.fs.get_file_info([self.path(r) for r in rels])

    def listdir(self, rel: str, recursive: bool = False) -> list[pafs.FileInfo]:
        """Entries under ``rel`` (empty when it does not exist).

        A directory created while it is listed (a stage's first version, written by another process) can make
        pyarrow's local listing fail with "not found" although the directory exists when pyarrow looks again:
        the listing is taken again, a few times, before that is an error."""
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=recursive)
        for _ in range(_LIST_RETRIES):
            with contextlib.suppress(FileNotFoundError):
                return self.fs.get_file_info(selector)
        with self.errors("list", rel):
            return self.fs.get_file_info(selector)

    def makedirs(self, rel: str) -> None:
        with self.errors("create", rel):
            self.fs.create_dir(self.path(rel), recursive=True)

    def mkdir_exclusive(self, rel: str) -> bool:
        """Create ``rel``; False if it already existed (local). Object stores have no dirs: True."""
        if not self.local:
            return True
        with self.errors("create", rel):
            os.makedirs(posixpath.dirname(self.path(rel)), exist_ok=True)
            try:
                os.mkdir(self.path(rel))
            except FileExistsError:
                return False
            return True

    def delete(self, rel: str) -> None:
        """Delete a file or a whole directory; nothing if it is not there."""
        path = self.path(rel)
        with self.errors("delete", rel):
            kind = self.fs.get_file_info(path).type
            if kind == pafs.FileType.Directory:
                self.fs.delete_dir(path)
            elif kind == pafs.FileType.File:
                self.fs.delete_file(path)


def _join_uri(uri: str, rel: str) -> str:
    """``uri`` with ``rel`` appended to its path (a query such as ?endpoint_override= stays last)."""
    if "://" not in uri:
        return posixpath.join(uri, rel)
    parts = urllib.parse.urlsplit(uri)
    return urllib.parse.urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{rel}"))
