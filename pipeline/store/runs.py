"""Run directories: ids, ``run.json`` and resolving ``RUN`` arguments of the CLI."""

from __future__ import annotations

import datetime as dt
import os
import re
import warnings

import pyarrow.fs as pafs

from pipeline.errors import RunError
from pipeline.store import Store
from schemas.config import RunConfig

DEFAULT_STORE = "./isostack-runs"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def new_run_id(name: str) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}"


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise RunError(f"run id {run_id!r} is not a plain name", "use letters, digits, '.', '_' or '-' (at most 128)")
    return run_id


def split_run(run: str, store: str | None) -> tuple[str, str]:
    """``RUN`` is a run id (under --store) or a path/URI of the run's folder."""
    run, _, query = run.partition("?")  # s3://bucket/runs/ID?endpoint_override=... keeps its query on the root
    run = run.rstrip("/")
    if "/" in run or "://" in run:
        uri, _, run_id = run.rpartition("/")
        uri = f"{uri}?{query}" if query else uri
        if store is not None and os.path.abspath(store) != os.path.abspath(uri) and "://" not in run:
            raise RunError(f"RUN {run!r} lies outside --store {store!r}", "pass either a run id with --store, or the run's path alone")
        return uri or "/", check_run_id(run_id)
    return store or os.environ.get("ISOSTACK_STORE", DEFAULT_STORE), check_run_id(run)


def abs_uri(uri: str) -> str:
    """A local store path made absolute: Ray workers do not share the driver's working directory."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def open_run(run: str, store: str | None = None) -> tuple[Store, dict]:
    """The store of an existing run and its ``run.json``; RunError when there is none."""
    uri, run_id = split_run(run, store)
    st = Store(abs_uri(uri), run_id, create=False)
    info = st.read_json("run.json")
    if info is None:
        raise RunError(f"no run {run_id!r} under store {uri!r} (no run.json at {st.root_uri}/run.json)",
                       "check the run id with `ls` of the store, or pass --store with the store the run was started on")
    if info.get("run_id") != run_id:
        raise RunError(f"{st.root_uri}/run.json belongs to run {info.get('run_id')!r}, not {run_id!r}",
                       "the store folder was copied or renamed; pass the run's own folder")
    return st, info


def run_config(info: dict) -> RunConfig:
    return RunConfig.model_validate(info["config"])


def list_runs(store: str | None = None) -> list[dict]:
    """Every run under a store root (folders holding a run.json), oldest first: id, status, modules, headline
    accuracy (nearest centroid, test; None before the final stage), created and last updated (ISO 8601)."""
    root = abs_uri(store or os.environ.get("ISOSTACK_STORE", DEFAULT_STORE))
    fs, base = pafs.FileSystem.from_uri(root) if "://" in root else (pafs.LocalFileSystem(), root)
    entries = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    rows = []
    for entry in sorted((e for e in entries if e.type == pafs.FileType.Directory), key=lambda e: e.base_name):
        st = Store(root, entry.base_name, create=False)
        info = st.read_json("run.json")
        if info is None or info.get("run_id") != entry.base_name:
            continue  # not a run folder (or a copied one): `open_run` would refuse it too
        summary = st.read_json("summary.json") or {}
        nc = (summary.get("evaluation") or {}).get("nearest_centroid") or {}
        rows.append({"run_id": info["run_id"], "status": info.get("status"), "modules": list(info["config"]["stack"]),
                     "test_accuracy": nc.get("test_accuracy"), "created_at": info.get("created_at"),
                     "updated_at": info.get("updated_at"), "cause": info.get("cause")})
    return sorted(rows, key=lambda r: r["created_at"] or "")


def stale_modules(store, names: list[str]) -> dict[str, str]:
    """Module -> why it is stale: its final version was built on an older final of the module below."""
    out, below = {}, store.final("input")
    for name in names:
        final = store.final(name)
        if final is not None and below is not None and final.upstream \
                and int(final.upstream["version"]) != below.version:
            out[name] = (f"{name} v{final.version} was built on {below.stage} v{final.upstream['version']}, "
                         f"but {below.stage}'s final is v{below.version}")
        below = final
    return out


def warn_stale(store, names: list[str], what: str) -> dict[str, str]:
    """Warn (once per call) that ``what`` combines a retrained module with stale ones above it."""
    stale = stale_modules(store, names)
    if stale:
        warnings.warn(f"{what} uses a stack with stale modules: {'; '.join(stale.values())}. "
                      f"Retrain them (`isostack retrain {store.run_id} --module {next(iter(stale))}`) so the composed "
                      "stack matches its stored activations", StaleStackWarning, stacklevel=3)
    return stale


class StaleStackWarning(UserWarning):
    """A module above a retrained one still sits on that module's previous final."""
