"""The steps before training that need torch: the plan (shape inference on the meta device), loading and
resizing the dataset, and ingesting it.

The driver runs them in a child process (``pipeline.run.remote``), so torch never loads in the process that
then watches the module actors for the whole training.
"""

from __future__ import annotations

import os

from pipeline.data import load_dataset
from pipeline.errors import RunError
from pipeline.planning.plan import build_plan
from pipeline.run.ingest import ingest, is_ingested
from pipeline.store import Store
from pipeline.store.runs import abs_uri, check_run_id, new_run_id, now_iso
from schemas.config import RunConfig


def local_cluster(cfg: RunConfig, address: str | None) -> bool:
    """True when this run starts its own Ray instance, so local GPUs are what it will get."""
    return not (address or cfg.resources.address or os.environ.get("RAY_ADDRESS"))


def prepare_run(cfg: RunConfig, run_id: str | None = None, address: str | None = None):
    """Plan, load the dataset, then create the run folder (run.json) and ingest. Returns (store, info, input manifest).

    Everything that can fail on bad input (config, plan, data files) happens before
    the first byte is written, so a refused run leaves the store as it was.
    """
    plan = build_plan(cfg, local_cluster=local_cluster(cfg, address))
    run_id = check_run_id(run_id or new_run_id(cfg.name))
    uri = abs_uri(cfg.store.uri)
    probe = Store(uri, run_id, create=False)
    info = probe.read_json("run.json")
    if info is not None and info.get("config") != cfg.model_dump(mode="json"):
        raise RunError(f"run {run_id!r} already exists in {cfg.store.uri} with a different config",
                       f"continue it with `isostack resume {run_id} --store {cfg.store.uri}`, or pick another --run-id")
    dataset = None if info is not None and is_ingested(probe, cfg.dataset) else load_dataset(cfg.dataset)
    store = Store(uri, run_id)
    if info is None:
        info = {"run_id": run_id, "name": cfg.name, "created_at": now_iso(), "status": "created",
                "config": cfg.model_dump(mode="json"), "plan": plan.model_dump(mode="json"),
                "generations": {}, "retrains": []}
        store.write_json("run.json", info)
    manifest = ingest(store, cfg.dataset, rows_per_shard=cfg.store.rows_per_shard, dataset=dataset)
    return store, info, manifest


def check_plan(cfg: RunConfig, address: str | None = None) -> None:
    """Build the plan of a changed config (a retrain's) for its errors alone; the data is in the store already."""
    build_plan(cfg, check_paths=False, local_cluster=local_cluster(cfg, address))
