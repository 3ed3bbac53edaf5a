"""What the driver does for `run`, `resume`, `retrain` and `status`.

The driver owns ``run.json`` and ``summary.json``; the module actors own their
checkpoints, versions, metrics and ``status/<module>.json``. Everything the
driver needs to continue lives in the store, so a killed driver loses nothing.

The driver itself never imports torch: planning, ingest and the final stage run in a
child process and each module in its actor (``pipeline.run.offload``), so while the
modules train this process holds only Ray, pyarrow and the store's bookkeeping.
"""

from __future__ import annotations

import contextlib
import sys

from pipeline.planning.config import overridden_config
from pipeline.errors import ConfigError, RunError
from pipeline.run import offload
from pipeline.run.ingest import ingest, is_ingested
from pipeline.run.lease import live_leases, module_lease, module_leases
from pipeline.run.scheduler import launched, train_modules
from pipeline.store.runs import abs_uri, check_run_id, new_run_id, now_iso, open_run, run_config
from pipeline.store import Store
from schemas.config import RunConfig
from schemas.status import ModuleState, ModuleStatus


GC_GRACE_S = 600.0  # `gc` never deletes an uncommitted directory modified more recently than this


def prepare_run(cfg: RunConfig, run_id: str | None = None, address: str | None = None):
    """Plan, load the dataset, then create the run folder (run.json) and ingest. Returns (store, info, input manifest).

    Everything that can fail on bad input (config, plan, data files) happens before
    the first byte is written, so a refused run leaves the store as it was. Runs in a
    child process (``pipeline.run.prepare`` imports torch).
    """
    return offload.in_child(offload.prepare_run, cfg, run_id, address)


def _set_status(store: Store, info: dict, status: str, **extra) -> dict:
    info = {**info, "status": status, "updated_at": now_iso(), **extra}
    store.write_json("run.json", info)
    return info


def _train(store: Store, info: dict, cfg: RunConfig, names: list[str], address: str | None,
           launch=None) -> tuple[dict, dict]:
    # The leases say "someone trains these modules" to a retrain, a second driver and `gc`.
    with module_leases(store, names):
        info = _set_status(store, info, "training")
        try:
            statuses = train_modules(cfg, store.uri, store.run_id, names, generation=info.get("generations", {}),
                                     address=address, launch=launch)
        except KeyboardInterrupt:
            _set_status(store, info, "interrupted")
            raise
        # Every actor is gone now: what a crashed attempt left uncommitted in these stages is ours to remove.
        store.gc(stages=names)
    apply_retention(store, cfg)
    failed = {n: s for n, s in statuses.items() if s.state != ModuleState.final}
    status = "trained" if not failed else "failed"
    cause = "; ".join(f"{n}: {s.error or s.state.value}" for n, s in failed.items()) or None
    info = _set_status(store, info, status, cause=cause)
    write_summary(store, info)
    return info, statuses


def _finish(store: Store, info: dict, cfg: RunConfig, final_stage: bool) -> int:
    if info["status"] != "trained":
        print(f"run {info['run_id']} failed: {info.get('cause')}\n  checkpoints and committed versions are kept in "
              f"{store.root_uri}; fix the cause and continue with `isostack resume {info['run_id']}`", file=sys.stderr)
        return 1
    if final_stage:
        offload.in_child(offload.final_stage, store, info, cfg)
        info = store.read_json("run.json")
    info = _set_status(store, info, "finished")
    write_summary(store, info)
    print(f"run {info['run_id']} finished: {store.root_uri}/summary.json")
    return 0


def run(cfg: RunConfig, *, run_id: str | None = None, address: str | None = None, final_stage: bool = True) -> int:
    run_id = check_run_id(run_id or new_run_id(cfg.name))
    names, uri = list(cfg.stack), abs_uri(cfg.store.uri)
    # A new run: Ray starts and the module actors import torch while the child plans and ingests (the default
    # run took 22 s from the command to its first step: 6 s of planning and ingest, then 6 s of Ray, then 9 s of
    # actors). An existing one (this command again) checks its leases before any actor of it is created.
    new = Store(uri, run_id, create=False).read_json("run.json") is None
    with offload.started(offload.prepare_run, cfg, run_id, address) as prepared, \
            (launched(cfg, uri, run_id, names, address=address) if new else contextlib.nullcontext()) as launch:
        store, info, manifest = prepared()
        print(f"run {info['run_id']}: {manifest.rows} samples {manifest.splits} in {store.root_uri}", flush=True)
        info, _ = _train(store, info, cfg, names, address, launch=launch)
    return _finish(store, info, cfg, final_stage)


def resume(run_ref: str, *, store_uri: str | None = None, address: str | None = None, final_stage: bool = True) -> int:
    """Continue a run: modules without a final version restart from their newest checkpoint."""
    store, info = open_run(run_ref, store_uri)
    cfg = run_config(info)
    if not is_ingested(store, cfg.dataset):  # loading and writing the images imports torch
        offload.in_child(ingest, store, cfg.dataset, rows_per_shard=cfg.store.rows_per_shard)
    report = status_report(store, info)
    todo = [n for n, m in report["modules"].items() if m["final_version"] is None]
    if todo:
        print(f"resuming {', '.join(todo)} of run {info['run_id']}", flush=True)
        info, _ = _train(store, info, cfg, todo, address)
    else:
        info = _set_status(store, info, "trained")
    return _finish(store, info, cfg, final_stage)


def retrain(run_ref: str, module: str, *, store_uri: str | None = None, overrides: list[str] = (),
            address: str | None = None) -> int:
    """Train one module again from its upstream's final version; nothing else is touched."""
    store, info = open_run(run_ref, store_uri)
    cfg = run_config(info)
    if module not in cfg.stack:
        raise ConfigError([("--module", f"no module {module!r} in run {info['run_id']}; modules: {', '.join(cfg.stack)}")])
    names = list(cfg.stack)
    upstream = "input" if names.index(module) == 0 else names[names.index(module) - 1]
    if store.final(upstream) is None:
        raise RunError(f"{upstream} has no final version in {store.root_uri}, so {module} has nothing final to train on",
                       f"finish the run first with `isostack resume {info['run_id']}`")
    new_cfg = retrain_config(cfg, module, overrides)
    offload.in_child(offload.check_plan, new_cfg, address)
    with module_lease(store, module):
        generations = dict(info.get("generations", {}))
        generations[module] = int(generations.get(module, 0)) + 1
        retrains = list(info.get("retrains", [])) + [{"module": module, "generation": generations[module],
                                                       "overrides": list(overrides), "at": now_iso()}]
        info = _set_status(store, info, "retraining", generations=generations, retrains=retrains,
                           config=new_cfg.model_dump(mode="json"))
        statuses = train_modules(new_cfg, store.uri, store.run_id, [module], generation=generations, address=address)
        store.gc(stages=[module])
    st = statuses[module]
    if st.state != ModuleState.final:
        _set_status(store, info, "failed", cause=f"retrain of {module}: {st.error}")
        write_summary(store, store.read_json("run.json"))
        print(f"retrain of {module} failed: {st.error}", file=sys.stderr)
        return 1
    info = _set_status(store, info, "finished")
    write_summary(store, info)
    stale = [n for n, m in status_report(store, info)["modules"].items() if m["stale"]]
    print(f"{module} retrained: final v{st.final_version}" + (f"; stale above it: {', '.join(stale)}" if stale else ""))
    return 0


def retrain_config(cfg: RunConfig, module: str, overrides: list[str]) -> RunConfig:
    """The run's config with ``overrides`` applied to ``module`` alone: ``train.X`` means ``stack.<module>.train.X``,
    so a later resume or retrain of another module trains with the settings it had."""
    problems, items = [], []
    for item in overrides:
        key = item.split("=", 1)[0]
        if key.startswith("train."):
            items.append(f"stack.{module}.{item}")
        elif key.startswith(f"stack.{module}."):
            items.append(item)
        else:
            problems.append((key, f"retrain may only change stack.{module}.* or train.* keys"))
    return overridden_config(cfg.model_dump(mode="json"), items, problems=problems)


def collect_garbage(store: Store, cfg: RunConfig, grace_s: float = GC_GRACE_S) -> tuple[list[str], dict]:
    """`isostack gc`: refuse a run someone is training; remove uncommitted leftovers older than ``grace_s``."""
    live = live_leases(store)
    if live:
        owners = ", ".join(f"{m} by {o}" for m, o in sorted(live.items()))
        raise RunError(f"run {store.run_id} is being trained right now ({owners}); gc would delete versions its "
                       "writers are still filling", "run `isostack gc` after that run or retrain has finished")
    removed = store.gc(older_than_s=grace_s)
    return removed, {k: v for k, v in apply_retention(store, cfg).items() if v}


def apply_retention(store: Store, cfg: RunConfig) -> dict[str, list[int]]:
    """Once the actors are done: keep the newest K versions, the finals and every version a final was built on."""
    pinned: dict[str, set[int]] = {}
    for stage in store.stages():
        final = store.final(stage)
        if final is not None and final.upstream:
            pinned.setdefault(final.upstream["stage"], set()).add(int(final.upstream["version"]))
    return {stage: store.apply_retention(stage, cfg.schedule.keep_versions, pinned.get(stage, set()))
            for stage in store.stages()}


def status_report(store: Store, info: dict) -> dict:
    """Each module's state, versions, lineage and staleness, from the store alone."""
    cfg = run_config(info)
    modules, below_final = {}, store.final("input")
    for name in cfg.stack:
        st = _module_status(store, name)
        final = store.final(name)
        upstream_version = final.upstream["version"] if final is not None and final.upstream else None
        stale = bool(final is not None and below_final is not None and upstream_version != below_final.version)
        state = st.state.value if st else "not started"
        if final is not None and state not in ("training", "publishing", "waiting_upstream"):
            state = "final"
        modules[name] = {
            "state": "stale" if stale else state, "stale": stale, "versions": store.versions(name),
            "final_version": final.version if final is not None else None, "upstream_version": upstream_version,
            "epoch": st.epoch if st else 0, "loss": st.loss if st else None, "node": st.node if st else None,
            "device": st.device if st else None, "error": st.error if st else None,
        }
        below_final = final
    return {"run_id": info["run_id"], "status": info.get("status"), "cause": info.get("cause"), "modules": modules}


def _module_status(store: Store, name: str) -> ModuleStatus | None:
    data = store.read_json(f"status/{name}.json")
    return ModuleStatus.model_validate(data) if data else None


def write_summary(store: Store, info: dict) -> dict:
    """summary.json: the keys DESIGN.md fixes, merged with what the final stage added."""
    cfg = run_config(info)
    summary = store.read_json("summary.json") or {}
    modules = {}
    for name in cfg.stack:
        st = _module_status(store, name)
        final = store.final(name)
        modules[name] = {
            "final_version": final.version if final is not None else None,
            "epochs": st.epoch if st else 0, "final_loss": st.loss if st else None,
            "train_seconds": st.train_seconds if st else 0.0,
            "samples_per_second": st.samples_per_second if st else None,
            "peak_memory_bytes": st.peak_memory_bytes if st else None,
            "started_at": st.started_at if st else None, "finished_at": st.finished_at if st else None,
            "node": st.node if st else None, "state": st.state.value if st else "not started",
            "error": st.error if st else None,
        }
    summary.update({"run_id": info["run_id"], "status": info.get("status"), "cause": info.get("cause"),
                    "modules": modules, "updated_at": now_iso()})
    store.write_json("summary.json", summary)
    return summary
