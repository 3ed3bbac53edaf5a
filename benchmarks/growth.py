"""How wall time and store size grow with the number of modules and of samples (async, retention on).

The norb-synthetic stack cut to 1, 2, 3 modules, on two dataset sizes (NORB instances: the sample count
doubles), trained with ``driver.run`` on one local Ray. Retention is what ``isostack gc`` applies
(``schedule.keep_versions`` newest versions per stage plus final ones and the versions they were built on);
the driver applies it when a run ends, so the store is measured as the run leaves it and again after a
second ``gc`` pass (which should find nothing left to drop). The trainers do not apply it while they run,
so the peak during training is larger. Bytes are those of
``<run>/store/`` (activation versions, including the ingested input) and of the whole run folder
(checkpoints, metrics). Ratios are against the smallest case (1 module, small data).
"""

from __future__ import annotations

import os

from benchmarks import Row
from benchmarks.schedules import NO_EXPORTS, TINY_NORB, stack_config, start_ray, timed_run


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def run(quick: bool, workdir: str) -> dict:
    keep = 1
    modules = (1, 2) if quick else (1, 2, 3)
    data = {"small": "dataset.instances=[0,4]", "large": "dataset.instances=[0,1,4,6]"} if quick else \
        {"small": "dataset.instances=[0,1,4,6]", "large": "dataset.instances=[0,1,2,3,4,6,7,8]"}
    base = TINY_NORB[:1] + TINY_NORB[2:] + NO_EXPORTS + ["train.epochs=2", "train.batch_size=32",
                                                          f"schedule.keep_versions={keep}"]
    ray = start_ray()
    log = os.path.join(workdir, "runs.log")
    cases = {}
    try:
        for size, inst in data.items():
            for n in modules:
                cfg = stack_config(workdir, n, base + [inst])
                res = timed_run(cfg, f"growth-{n}-{size}", log)
                store = res.pop("store")
                root = os.path.join(cfg.store.uri, store.run_id)
                before = du(os.path.join(root, "store"))
                versions = {s: len(store.versions(s)) for s in store.stages()}
                for stage in store.stages():
                    store.apply_retention(stage, keep)
                cases[f"{n}x{size}"] = {
                    "modules": n, "size": size, "rows": store.final("input").rows, "seconds": res["seconds"],
                    "versions": versions, "store_bytes": before, "store_bytes_retained": du(os.path.join(root, "store")),
                    "run_bytes_retained": du(root), "nearest_centroid": res["nearest_centroid"]}
    finally:
        ray.shutdown()
    ref = cases["1xsmall"]
    rows = []
    for key, c in cases.items():
        if key == "1xsmall":
            continue
        rows.append(Row("growth", f"{c['modules']} module{'s' * (c['modules'] > 1)}, {c['rows']} samples: wall s vs 1 module, "
                        f"{ref['rows']} samples", c["seconds"], ref["seconds"], c["seconds"] / ref["seconds"],
                        note=f"store {c['store_bytes_retained'] / 1e6:.1f} MB after a second gc "
                             f"({c['store_bytes'] / 1e6:.1f} MB as the run left it; x{c['store_bytes_retained'] / ref['store_bytes_retained']:.1f} "
                             f"of the smallest), run folder {c['run_bytes_retained'] / 1e6:.1f} MB"))
    rows.insert(0, Row("growth", f"1 module, {ref['rows']} samples: wall s (the unit)", ref["seconds"], None, None,
                       note=f"store {ref['store_bytes_retained'] / 1e6:.1f} MB after a second gc "
                            f"({ref['store_bytes'] / 1e6:.1f} MB as the run left it), keep_versions={keep}"))
    return {"rows": rows, "details": {"keep_versions": keep, "cases": cases}}
