"""Wall time of the same tiny 2- and 3-module stack trained `async`, `sequential` (both through
``pipeline.run.driver.run`` on one local Ray) and by the single-process GIM loop of ``reference_gim``,
each with its final nearest-centroid test accuracy.

Timed: ``driver.run(final_stage=False)`` after the dataset is ingested (actor start, training, checkpoints,
publishing, settle epochs), and the reference loop's load + training. Not timed: Ray start, ingest, and
the evaluation that gives the accuracy. Actors get 1 torch thread each (``cpus_per_module=1``), so
`sequential` trains on one core at a time and `async` on both; the reference loop is given both cores.
Both modes create every actor when the run starts (`sequential` sets each up while the one below trains), so
the comparison is not one of actor start-up; ``train.epochs`` is each module's whole budget in both.
"""

from __future__ import annotations

import datetime as dt
import os
import time

from benchmarks import cpu_threads, goal_row, quiet, regrouped_stack
from benchmarks.reference_gim import train_reference
from pipeline.planning.config import overridden_config, read_source
from schemas.config import RunConfig

TINY_NORB = [  # tests/conftest.py's TINY_NORB
    "dataset.image_size=16", "dataset.instances=[0,1,4,6]", "dataset.azimuths=[0,3,6,9,12,15]",
    "dataset.elevations=[0,4,8]", "dataset.lightings=[0,3]",
]
NO_EXPORTS = ["export.plots=false", "export.report=false", "export.model=false", "schedule.poll_seconds=0.1"]


def stack_config(workdir: str, n_modules: int, overrides: list[str]) -> RunConfig:
    """norb-synthetic's four-module stack (``regrouped_stack``: the one these benchmarks were recorded on) cut to
    its first ``n_modules``, one thread a module, with ``overrides``, storing under ``workdir``."""
    raw, _ = read_source("norb-synthetic")
    stack = regrouped_stack(raw, (2, 4, 6))
    if not 1 <= n_modules <= len(stack):
        raise ValueError(f"norb-synthetic's layers make 1 to {len(stack)} modules, not {n_modules}")
    raw["stack"] = dict(list(stack.items())[:n_modules])
    raw.pop("resources", None)
    return overridden_config(raw, overrides, store=os.path.join(workdir, "store"))


def sizes(quick: bool) -> list[str]:
    if quick:
        return TINY_NORB + ["train.epochs=2", "train.batch_size=32"]
    return TINY_NORB[1:] + ["dataset.image_size=32", "train.epochs=3", "train.batch_size=32"]


def start_ray():
    import ray

    if not ray.is_initialized():
        # 4 CPUs on 2 cores as the ray test tier does: up to 4 one-thread actors oversubscribe the cores.
        ray.init(num_cpus=4, include_dashboard=False, object_store_memory=128 * 1024 * 1024, log_to_driver=False)
    return ray


def timed_run(cfg: RunConfig, run_id: str, log: str) -> dict:
    """Wall seconds of training one run (after ingest), per-module spans, nearest-centroid accuracy."""
    from pipeline.run import driver
    from pipeline.run.final_stage import final_stage

    with quiet(log):
        store, info, _ = driver.prepare_run(cfg, run_id)
        t0 = time.perf_counter()
        rc = driver.run(cfg, run_id=run_id, final_stage=False)
        seconds = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"run {run_id} failed (rc {rc}); see {log}")
        summary = final_stage(store, store.read_json("run.json"), cfg, evaluate=True, export=False)
    status = {name: store.read_json(f"status/{name}.json") or {} for name in cfg.stack}
    spans = {name: iso_seconds(st["finished_at"]) - iso_seconds(st["started_at"])
             for name, st in status.items() if st.get("started_at") and st.get("finished_at")}
    return {"seconds": seconds, "module_spans": spans, "store": store,
            "started": min(iso_seconds(st["started_at"]) for st in status.values()),
            "finished": max(iso_seconds(st["finished_at"]) for st in status.values()),
            "nearest_centroid": summary["evaluation"]["nearest_centroid"]["test_accuracy"]}


def iso_seconds(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


def run(quick: bool, workdir: str) -> dict:
    ray = start_ray()
    log = os.path.join(workdir, "runs.log")
    rows, details = [], {}
    try:
        for n in (2, 3):
            base = sizes(quick) + NO_EXPORTS
            res = {}
            for mode in ("async", "sequential"):
                cfg = stack_config(workdir, n, base + [f"schedule.mode={mode}"])
                res[mode] = timed_run(cfg, f"sched-{mode}-{n}", log)
            ref_store = res["sequential"].pop("store")
            res["async"].pop("store")
            if n == 2:  # warm-up of the loop (first torch ops, oneDNN kernels), as the actors had theirs
                warm = stack_config(workdir, n, base + ["train.epochs=1", "train.max_steps_per_epoch=1"])
                train_reference(warm, ref_store, threads=cpu_threads())
            res["reference"] = train_reference(cfg, ref_store, threads=cpu_threads())
            a, s, r = res["async"], res["sequential"], res["reference"]
            slowest = max(s["module_spans"].values())
            span_async = a["finished"] - a["started"]
            res["slowest_module_alone_s"] = slowest
            res["async_span_s"] = span_async
            details[f"{n}_modules"] = res
            acc = lambda d: f"NC acc {d['nearest_centroid']:.1%}"  # noqa: E731
            rows.append(goal_row("schedules", f"{n} modules: wall s, async vs sequential", a["seconds"], s["seconds"],
                                 at_most=0.6 if n == 2 else None,
                                 note=f"async {acc(a)}, sequential {acc(s)}"))
            rows.append(goal_row("schedules", f"{n} modules: wall s, async vs single-process GIM loop", a["seconds"],
                                 r["seconds"], note=f"loop {acc(r)}, {r['epochs']} epochs, {r['threads']} threads"))
            rows.append(goal_row("schedules", f"{n} modules: async span vs slowest module alone (s)", span_async,
                                 slowest, at_most=1.2 if n == 2 else None,
                                 note="first training start to last final, vs the longest module span in sequential"))
        if not quick:
            # The same 2-module stack trained longer: how far the fixed costs per run and per epoch (actor start,
            # checkpoints, publishing, the upper module's settle epochs) dilute once epochs are not this short.
            base = sizes(quick) + NO_EXPORTS + ["train.epochs=10"]
            res = {mode: timed_run(stack_config(workdir, 2, base + [f"schedule.mode={mode}"]),
                                   f"sched-{mode}-2-e10", log) for mode in ("async", "sequential")}
            a, s = res["async"], res["sequential"]
            a.pop("store"), s.pop("store")
            slowest = max(s["module_spans"].values())
            res["slowest_module_alone_s"], res["async_span_s"] = slowest, a["finished"] - a["started"]
            details["2_modules_10_epochs"] = res
            rows.append(goal_row("schedules", "2 modules, 10 epochs: wall s, async vs sequential", a["seconds"],
                                 s["seconds"], at_most=0.6, note=f"async NC acc {a['nearest_centroid']:.1%}, "
                                 f"sequential NC acc {s['nearest_centroid']:.1%}"))
            rows.append(goal_row("schedules", "2 modules, 10 epochs: async span vs slowest module alone (s)",
                                 res["async_span_s"], slowest, at_most=1.2,
                                 note="first training start to last final, vs the longest module span in sequential"))
    finally:
        ray.shutdown()
    cfg_note = " ".join(sizes(quick))
    for d in details.values():
        for k in ("async", "sequential"):
            d[k]["module_spans"] = {m: round(v, 2) for m, v in d[k]["module_spans"].items()}
    details["overrides"] = cfg_note
    return {"rows": rows, "details": details}
