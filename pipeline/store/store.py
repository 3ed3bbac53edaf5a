"""The activation store of one run: small files, and versioned, manifest-committed stages.

Layout under ``<uri>/<run_id>/``: ``store/<stage>/v<NNNN>/part-<uuid>.parquet``
shards and ``_MANIFEST.json`` (written last, the commit), next to the run's
small files (``run.json``, ``summary.json``, checkpoints' JSON). A version
directory without a manifest belongs to a writer that has not committed (or
died); readers never see it and ``gc`` removes it.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any, Iterable

import pyarrow.fs as pafs
from pydantic import ValidationError

from pipeline.errors import IntegrityError, StoreError
from pipeline.store.fs import RunFS
from pipeline.store.reader import VersionReader, sha256_of
from pipeline.store.writer import MANIFEST, VersionWriter, version_dir
from schemas.manifest import Manifest, ShardEntry

MANIFEST_FORMAT = 1
_COUNTER = "_LAST_VERSION.json"  # per stage: the highest version number ever begun
_STAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
WEIGHTS_CODEC = "weights"  # the codec of a weights version (no rows; one safetensors file)
WEIGHTS_FILE = "weights.safetensors"
_VERSION_DIR = re.compile(r"^v(\d{4,})$")


class Store:
    """The run root ``<uri>/<run_id>`` on a local path or any ``pyarrow.fs`` URI."""

    def __init__(self, uri: str, run_id: str, *, create: bool = True) -> None:
        """``create=False`` opens an existing run without making its directory."""
        self.uri = uri
        self.run_id = run_id
        self._fs = RunFS(uri, run_id, create=create)

    @property
    def root_uri(self) -> str:
        return self._fs.root_uri

    def __repr__(self) -> str:
        return f"Store({self.root_uri!r})"

    def __reduce__(self):  # actors get the same store by URI, not a pickled file system
        return (_open_store, (self.uri, self.run_id))

    # ------------------------------------------------------------ small files

    def write_json(self, relpath: str, obj: dict[str, Any]) -> None:
        self._fs.write_atomic(relpath, json.dumps(obj, indent=2).encode())

    def read_json(self, relpath: str) -> dict[str, Any] | None:
        data = self._fs.read(relpath)
        if data is None:
            return None
        try:
            return json.loads(data)
        except ValueError as e:
            raise StoreError(f"{self._fs.uri_of(relpath)} is not valid JSON: {e}",
                             "restore or delete the file; the store writes JSON atomically, so something else wrote it") from None

    def write_bytes(self, relpath: str, data: bytes) -> None:
        self._fs.write_atomic(relpath, data)

    def read_bytes(self, relpath: str) -> bytes | None:
        return self._fs.read(relpath)

    def exists(self, relpath: str) -> bool:
        return self._fs.info(relpath).type != pafs.FileType.NotFound

    def delete(self, relpath: str) -> None:
        """Delete a file or directory (recursively); nothing if it is absent."""
        self._fs.delete(relpath)

    def local_path(self, relpath: str) -> str | None:
        """The OS path of ``relpath`` on a local or mounted root (for os-level atomics); None on object stores."""
        return self._fs.path(relpath) if self._fs.local else None

    def list_dir(self, relpath: str) -> list[str]:
        """Names (files and directories) directly under ``relpath``; [] if it is absent."""
        return sorted(info.base_name for info in self._fs.listdir(relpath))

    # ------------------------------------------------------------ versions

    def begin_version(self, stage: str, *, codec: str = "float16", final: bool = False,
                      producer: dict[str, Any] | None = None, upstream: dict[str, Any] | None = None,
                      sample_fraction: float = 1.0, rows_per_shard: int = 4096,
                      zstd_level: int | None = None, split_row_groups: bool = True) -> VersionWriter:
        """A writer for the next version of ``stage`` (never a number a dead writer used).

        ``codec``: how tensors become bytes (``codec_names()``); ``zstd_level``: compress the tensor column;
        ``split_row_groups``: no row group mixes splits (the default; rows are then not in the order written
        inside a shard, see ``VersionWriter``).
        """
        _check_stage(stage)
        # A number is never handed out twice, even after gc or retention removed
        # its directory: lineage (checkpoints, upstream fields) names versions by number.
        counter = f"store/{stage}/{_COUNTER}"
        last = (self.read_json(counter) or {}).get("last", 0)
        version = max([last, *self._version_dirs(stage)]) + 1
        # mkdir is the reservation on a local disk: two writers of one stage never share a number.
        while not self._fs.mkdir_exclusive(version_dir(stage, version)):
            version += 1
        self.write_json(counter, {"last": version})
        return VersionWriter(self._fs, stage, version, codec=codec, final=final, producer=producer, upstream=upstream,
                             sample_fraction=sample_fraction, rows_per_shard=rows_per_shard, zstd_level=zstd_level,
                             split_row_groups=split_row_groups)

    def commit_weights(self, stage: str, weights: bytes, *, shape: list[int], final: bool = False,
                       producer: dict[str, Any] | None = None, upstream: dict[str, Any] | None = None) -> Manifest:
        """Commit a *weights version*: the module's frozen weights instead of its activations.

        For a stage that is not materialized (``stack.<m>.store.materialize: false``): the
        module above recomputes this stage's activations from the version ``upstream``
        names. The weights file is the version's one entry in ``shards`` (rows 0), so
        ``verify``, ``gc`` and retention treat it like any shard; codec ``"weights"``
        tells readers there are no rows to read. ``shape`` is the per-sample output shape.
        """
        import hashlib

        _check_stage(stage)
        counter = f"store/{stage}/{_COUNTER}"
        version = max([(self.read_json(counter) or {}).get("last", 0), *self._version_dirs(stage)]) + 1
        while not self._fs.mkdir_exclusive(version_dir(stage, version)):
            version += 1
        self.write_json(counter, {"last": version})
        vdir = version_dir(stage, version)
        try:
            with self._fs.errors("write", f"{vdir}/{WEIGHTS_FILE}"):
                self._fs.write_atomic(f"{vdir}/{WEIGHTS_FILE}", weights)
            manifest = Manifest(
                stage=stage, version=version, final=final, created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
                codec=WEIGHTS_CODEC, dtype="safetensors", shape=list(shape), rows=0,
                shards=[ShardEntry(path=WEIGHTS_FILE, rows=0, bytes=len(weights),
                                   sha256=hashlib.sha256(weights).hexdigest())],
                splits={}, sample_fraction=1.0, producer=dict(producer or {}), upstream=upstream, arrow_schema="")
            self._fs.write_atomic(f"{vdir}/{MANIFEST}", json.dumps(manifest.model_dump(mode="json"), indent=1).encode())
        except BaseException:
            for rel in (f"{vdir}/{WEIGHTS_FILE}", vdir):
                try:
                    self._fs.delete(rel)
                except StoreError:
                    pass  # gc lists what is left
            raise
        return manifest

    def read_weights(self, manifest: Manifest) -> bytes:
        """The weights file of a weights version, checked against its sha256."""
        import hashlib

        if manifest.codec != WEIGHTS_CODEC:
            raise StoreError(f"{manifest.stage} v{manifest.version} holds activations (codec {manifest.codec!r}), not weights",
                             "read it with Store.read(); weights versions come from stages with materialize: false")
        entry = manifest.shards[0]
        rel = f"{version_dir(manifest.stage, manifest.version)}/{entry.path}"
        data = self._fs.read(rel)
        if data is None:
            raise IntegrityError(f"weights file {self._fs.uri_of(rel)} listed in {manifest.stage} v{manifest.version} is missing",
                                 "the version cannot be used; retrain the module or restore the file")
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise IntegrityError(f"weights file {self._fs.uri_of(rel)} does not match its sha256 in the manifest",
                                 "the file was damaged; retrain the module or restore the file")
        return data

    def versions(self, stage: str) -> list[int]:
        """Committed versions of ``stage``, ascending."""
        _check_stage(stage)
        candidates = sorted(self._version_dirs(stage))
        if not candidates:
            return []
        infos = self._fs.infos([f"{version_dir(stage, v)}/{MANIFEST}" for v in candidates])
        return [v for v, info in zip(candidates, infos) if info.type == pafs.FileType.File]

    def manifest(self, stage: str, version: int) -> Manifest:
        """The manifest of a committed version; StoreError if it is not committed."""
        _check_stage(stage)
        m = self._manifest_if_committed(stage, version)
        if m is None:
            have = self.versions(stage)
            raise StoreError(f"stage {stage!r} has no committed version {version} under {self.root_uri} "
                             f"(committed: {have or 'none'})",
                             "pick a committed version (`isostack status RUN`); a version without _MANIFEST.json was never committed")
        return m

    def _manifest_if_committed(self, stage: str, version: int) -> Manifest | None:
        """The manifest, or None where there is none: never committed, or removed since it was listed (a stream
        ring's trim, retention). A manifest that exists but cannot be read raises."""
        rel = f"{version_dir(stage, version)}/{MANIFEST}"
        data = self._fs.read(rel)
        if data is None:
            return None
        try:
            raw = json.loads(data)
            if raw.get("format_version", 1) > MANIFEST_FORMAT:
                raise StoreError(f"{self._fs.uri_of(rel)} has manifest format {raw['format_version']}, "
                                 f"this isostack reads up to {MANIFEST_FORMAT}", "upgrade isostack to read this run")
            m = Manifest.model_validate(raw)
        except (ValueError, ValidationError) as e:
            raise IntegrityError(f"manifest {self._fs.uri_of(rel)} is unreadable: {e}",
                                 "the version cannot be trusted; delete its directory or re-create the stage") from None
        if m.stage != stage or m.version != version:
            raise IntegrityError(f"manifest {self._fs.uri_of(rel)} names stage {m.stage!r} v{m.version}",
                                 "a version directory was copied or renamed by hand; restore it or delete it")
        return m

    def newest(self, stage: str) -> Manifest | None:
        for v in reversed(self.versions(stage)):
            m = self._manifest_if_committed(stage, v)
            if m is not None:
                return m
        return None

    def final(self, stage: str) -> Manifest | None:
        """The newest committed version marked final, or None."""
        for v in reversed(self.versions(stage)):
            m = self._manifest_if_committed(stage, v)
            if m is not None and m.final:
                return m
        return None

    def stages(self) -> list[str]:
        """Stages with at least one committed version."""
        names = [i.base_name for i in self._fs.listdir("store") if i.type == pafs.FileType.Directory]
        return sorted(n for n in names if _STAGE.match(n) and self.versions(n))

    def read(self, stage: str, version: int, verify: bool = False) -> VersionReader:
        """A reader of a committed version; ``verify`` checks every shard's sha256 first."""
        manifest = self.manifest(stage, version)
        if manifest.codec == WEIGHTS_CODEC:
            raise StoreError(f"{stage} v{version} is a weights version (stack.{stage}.store.materialize: false): "
                             "it holds the module's weights, not activations",
                             "recompute its activations with pipeline.feed.load_source, or set materialize: true")
        return VersionReader(self._fs, self.manifest(stage, version), version_dir(stage, version), verify=verify)

    # ------------------------------------------------------------ upkeep

    def verify(self, stage: str | None = None) -> list[str]:
        """Damage in committed versions: an unreadable manifest, a missing or corrupt shard.

        Leftovers (uncommitted version directories, stray files) are not damage: ``orphans()`` names
        them and ``gc`` removes them.
        """
        problems: list[str] = []
        for st in [stage] if stage is not None else self._stage_dirs():
            for v in self.versions(st):
                try:
                    m = self.manifest(st, v)
                except StoreError as e:
                    problems.append(e.cause)
                    continue
                for shard in m.shards:
                    rel = f"{version_dir(st, v)}/{shard.path}"
                    if self._fs.info(rel).type != pafs.FileType.File:
                        problems.append(f"missing shard {rel} (listed in {st} v{v})")
                        continue
                    found = sha256_of(self._fs, rel)
                    if found != shard.sha256:
                        problems.append(f"corrupt shard {rel} ({st} v{v}): sha256 {found}, manifest expects {shard.sha256}")
        return problems

    def orphans(self, older_than_s: float = 0.0, stages: Iterable[str] | None = None) -> list[str]:
        """Relpaths of uncommitted version dirs, and of files in committed ones that no manifest lists.

        ``older_than_s`` skips anything modified more recently (a writer may
        still be at work there); ``stages`` limits the search to those stages.
        """
        found: list[str] = []
        now = dt.datetime.now(dt.timezone.utc)
        for stage in self._stage_dirs() if stages is None else [s for s in self._stage_dirs() if s in set(stages)]:
            for v in sorted(self._version_dirs(stage)):
                vdir = version_dir(stage, v)
                try:
                    m = self.manifest(stage, v)
                except IntegrityError:
                    continue  # a bad manifest is verify()'s to report, not gc's to delete
                except StoreError:
                    entries = self._fs.listdir(vdir, recursive=True)
                    if _age_s(self._fs.info(vdir), entries, now) >= older_than_s:
                        found.append(vdir)
                    continue
                listed = {s.path for s in m.shards} | {MANIFEST}
                for info in self._fs.listdir(vdir):
                    if info.base_name not in listed and _age_s(info, [], now) >= older_than_s:
                        found.append(f"{vdir}/{info.base_name}")
        return sorted(set(found))

    def gc(self, older_than_s: float = 0.0, stages: Iterable[str] | None = None) -> list[str]:
        """Delete ``orphans(older_than_s, stages)``; returns what it removed. Committed versions are never touched.

        Callers that do not know every writer of the run is stopped pass a grace period
        (``pipeline.run.driver.collect_garbage`` does, after checking the run's leases).
        """
        removed = []
        for rel in self.orphans(older_than_s, stages):
            if self._fs.info(rel).type == pafs.FileType.NotFound:
                continue  # inside a directory already removed
            self._fs.delete(rel)
            removed.append(rel)
        return removed

    def apply_retention(self, stage: str, keep: int, pinned: Iterable[int] = frozenset()) -> list[int]:
        """Delete committed versions beyond the newest ``keep``, except final and pinned ones.

        Returns the deleted version numbers. The manifest goes first, so a
        version half deleted by a crash is simply not committed (gc finishes it).
        """
        if keep < 0:
            raise StoreError(f"retention keep={keep} for stage {stage!r}", "keep at least 0 versions")
        vs = self.versions(stage)
        protected = set(vs[max(0, len(vs) - keep):] if keep else []) | set(pinned)
        doomed = [v for v in vs if v not in protected and not self.manifest(stage, v).final]
        for v in doomed:
            self._fs.delete(f"{version_dir(stage, v)}/{MANIFEST}")
            self._fs.delete(version_dir(stage, v))
        return doomed

    # ------------------------------------------------------------ internals

    def _stage_dirs(self) -> list[str]:
        return sorted(i.base_name for i in self._fs.listdir("store")
                      if i.type == pafs.FileType.Directory and _STAGE.match(i.base_name))

    def _version_dirs(self, stage: str) -> list[int]:
        """Every version number with a directory, committed or not."""
        out = []
        for info in self._fs.listdir(f"store/{stage}"):
            m = _VERSION_DIR.match(info.base_name)
            if m and info.type == pafs.FileType.Directory:
                out.append(int(m.group(1)))
        return out


def _open_store(uri: str, run_id: str) -> Store:
    return Store(uri, run_id)


def _check_stage(stage: str) -> None:
    if not isinstance(stage, str) or not _STAGE.match(stage):
        raise StoreError(f"stage name {stage!r} is not a plain name", "use letters, digits, '.', '_' or '-' (e.g. 'input', 'm1')")


def _age_s(info: pafs.FileInfo, entries: list[pafs.FileInfo], now: dt.datetime) -> float:
    """Seconds since the newest modification of ``info`` and ``entries`` (inf when unknown)."""
    times = [e.mtime for e in [info, *entries] if e.mtime is not None]
    if not times:
        return float("inf")
    newest = max(t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc) for t in times)
    return (now - newest).total_seconds()
