"""Local objectives compared the way the seed thesis's Table 4 does: single-module vs multi-module stacks,
objective x learning rate, train and test nearest-centroid accuracy, on ``synthetic_norb`` and ``digits``.

Every cell is a real run through ``pipeline.run.driver.run`` (the path of ``isostack run``: ingest into the
store, one Ray actor per module, async schedule, the final stage on the top module's final version), tiny
and short so the whole grid fits in ~10-15 minutes on 2 cores: 16x16 images, a subset of samples, 8 epochs
of batch 32 per module (~130 steps on synthetic_norb), 2 learning rates for the single-module stacks; each multi-module stack runs once, at the
learning rate whose single-module run of its bottom objective had the better *train* accuracy (no
selection on test; it keeps the grid to ~56 runs). The numbers rank objectives on this budget; they are
not the objectives' converged accuracies.

Stacks (same layers for every objective, so only the loss differs):

- 1 module:  m1 = conv 5x5 -> 16, maxpool 2   (output (16, 8, 8), pooled to 16-d by the final stage)
- 2 modules: m1 as above, m2 = conv 3x3 -> 32, maxpool 2   (output (32, 4, 4), 32-d)

Pairings: same_instance on synthetic_norb; on digits (no instances) augment for m1 and patch_grid above.
An objective that cannot run on m2 (aet reads images; moco needs sample pairs, which digits' m2 cannot
get) keeps m2 at infonce_pair: the row is labelled "aet + infonce_pair". Two mixed stacks per dataset
show objectives mixing per module. The learning rate reported per objective in the summary rows is the
one with the better *train* accuracy.
"""

from __future__ import annotations

import os
import time

from benchmarks import Row, quiet
from benchmarks.schedules import start_ray

LRS = (1e-3, 1e-2)
OBJECTIVES = ["infonce_pair", "sfa", "vinfonce", "supervised_local", "cpc_ar", "dim", "moco", "autoencoder", "aet"]
# (m1, m2) objective pairs beyond the uniform stacks.
MIXED = {"synthetic_norb": [("aet", "moco")], "digits": [("autoencoder", "dim")]}
DATASETS = {
    "synthetic_norb": ["dataset.kind=synthetic_norb", "dataset.image_size=16", "dataset.instances=[0,1,2,4,6,7]",
                       "dataset.azimuths=[0,3,6,9,12,15]", "dataset.elevations=[0,4,8]", "dataset.lightings=[0,3]"],
    "digits": ["dataset.kind=digits", "dataset.image_size=16", "dataset.max_per_split=500"],
}
_PAIRED = {"infonce_pair", "sfa", "vinfonce", "moco"}
_FIRST_ONLY = {"aet"}
# Per-objective settings for 2-epoch runs (temperatures of the presets; SFA's projection keeps the
# whitened width below the batch).
_EXTRA = {"infonce_pair": {"temperature": 0.1, "projection_dim": 32}, "sfa": {"projection_dim": 16},
          "vinfonce": {"temperature": 0.1, "projection_dim": 32}, "supervised_local": {},
          "cpc_ar": {"steps": 2, "negatives": 16}, "dim": {"projection_dim": 32}, "moco": {"queue_size": 512},
          "autoencoder": {"hidden": 32}, "aet": {"hidden": 64}}


def objective_for(kind: str, dataset: str, index: int) -> dict | None:
    """The objective config of module ``index`` (0 = m1), or None when ``kind`` cannot run there."""
    obj = {"kind": kind, **_EXTRA[kind]}
    if kind in _FIRST_ONLY and index > 0:
        return None
    if kind in _PAIRED:
        if dataset == "digits":
            if kind == "moco" and index > 0:
                return None  # augment is first-module only and moco cannot pair patch_grid positions
            obj["pairing"] = "augment" if index == 0 else "patch_grid"
        else:
            obj["pairing"] = "same_instance"
    return obj


def stack(dataset: str, objectives: list[str]) -> tuple[dict, str]:
    """The ``stack`` mapping for these per-module objectives (falling back to infonce_pair) and its label."""
    layers = [[{"type": "conv", "channels": 16, "kernel": 5}, {"type": "maxpool", "kernel": 2}],
              [{"type": "conv", "channels": 32, "kernel": 3}, {"type": "maxpool", "kernel": 2}]]
    out, used = {}, []
    for i, kind in enumerate(objectives):
        obj = objective_for(kind, dataset, i)
        if obj is None:
            kind, obj = "infonce_pair", objective_for("infonce_pair", dataset, i)
        out[f"m{i + 1}"] = {"layers": layers[i], "objective": obj}
        used.append(kind)
    label = used[0] if len(set(used)) == 1 else " + ".join(used)
    return out, label


def config(dataset: str, objectives: list[str], lr: float, workdir: str, quick: bool):
    from pipeline.planning.config import load_config

    import yaml

    mods, label = stack(dataset, objectives)
    path = os.path.join(workdir, "cfg.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"name": "objectives", "stack": mods}, f)
    epochs = 1 if quick else 8
    sets = DATASETS[dataset] + [
        f"train.epochs={epochs}", "train.batch_size=32", f"train.lr={lr}", "schedule.poll_seconds=0.1",
        "schedule.settle_epochs=1", "resources.cpus_per_module=1", "evaluate.linear_probe_epochs=50",
        "export.plots=false", "export.report=false", "export.model=false"]
    return load_config(path, sets, store=os.path.join(workdir, "store")), label


def one_run(cfg, run_id: str, log: str) -> dict:
    from pipeline.run import driver

    t0 = time.perf_counter()
    with quiet(log):
        rc = driver.run(cfg, run_id=run_id)
    seconds = time.perf_counter() - t0
    if rc != 0:
        return {"error": f"rc {rc}; see {log}", "seconds": round(seconds, 1)}
    from pipeline.store import Store

    summary = Store(cfg.store.uri, run_id).read_json("summary.json")
    ev = summary["evaluation"]
    out = {"train": ev["nearest_centroid"]["train_accuracy"], "test": ev["nearest_centroid"]["test_accuracy"],
           "gmm": ev.get("gmm", {}).get("test_accuracy"), "kmeans": ev["kmeans"]["test_accuracy"],
           "seconds": round(seconds, 1)}
    raw = ev.get("baselines", {}).get("raw_pixels")
    if raw:
        out["raw_pixels"] = {"train": raw["nearest_centroid"]["train_accuracy"],
                             "test": raw["nearest_centroid"]["test_accuracy"], "gmm": raw["gmm"]["test_accuracy"]}
    return out


def _cell(r: dict | None, lr: str | None = None) -> str:
    if r is None:
        return ""
    if "error" in r:
        return "failed"
    return f"{r['train']:.1%} / {r['test']:.1%}" + (f" (lr {lr})" if lr else "")


def markdown(details: dict) -> str:
    """The Table-4-style grid: one row per (dataset, objective), 'train / test' nearest-centroid accuracy."""
    lines = []
    for dataset, by_depth in details["grid"].items():
        raw = details["raw_pixels"].get(dataset)
        head = f"**{dataset}**" + (f" (raw pixels: nearest centroid train {raw['train']:.1%} / test {raw['test']:.1%})"
                                    if raw else "")
        lines += ["", head, "",
                  "| objective (m1 + m2) | " + " | ".join(f"1 module, lr {lr:g}" for lr in LRS)
                  + " | 2 modules (lr of the better 1-module train) |", "|---|" + "---:|" * (len(LRS) + 1)]
        shown_as_fallback = {f"{k} + infonce_pair" for k in by_depth["1"] if k not in by_depth["2"]}
        for label in dict.fromkeys([*by_depth["1"], *(k for k in by_depth["2"] if k not in shown_as_fallback)]):
            cells = [_cell(by_depth["1"].get(label, {}).get(f"{lr:g}")) for lr in LRS]
            two = by_depth["2"].get(label) or by_depth["2"].get(f"{label} + infonce_pair") or {}
            lr2 = next(iter(two), None)
            cells.append(_cell(two.get(lr2), lr2) + (" (m2: infonce_pair)" if label not in by_depth["2"] and two else ""))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines).strip() + "\n"


def run(quick: bool, workdir: str) -> dict:
    ray = start_ray()
    log = os.path.join(workdir, "runs.log")
    grid: dict = {}
    raw_pixels: dict = {}
    datasets = ["synthetic_norb"] if quick else list(DATASETS)
    try:
        for dataset in datasets:
            grid[dataset] = {"1": {}, "2": {}}
            stacks = [([k], "1") for k in OBJECTIVES] + [([k, k], "2") for k in OBJECTIVES]
            stacks += [(list(pair), "2") for pair in MIXED[dataset]]
            if quick:
                stacks = [s for s in stacks if s[0][0] in ("infonce_pair", "moco")]
            for objectives, depth in stacks:
                lrs = LRS[:1] if quick else LRS
                if depth == "2":  # the lr of the better single-module train accuracy of the bottom objective
                    single = {lr: r for lr, r in grid[dataset]["1"].get(objectives[0], {}).items() if "error" not in r}
                    lrs = [float(max(single, key=lambda k: single[k]["train"]))] if single else lrs[:1]
                for lr in lrs:
                    cfg, label = config(dataset, objectives, lr, workdir, quick)
                    if label in grid[dataset][depth] and f"{lr:g}" in grid[dataset][depth][label]:
                        continue  # e.g. "aet + infonce_pair" is both the uniform aet and a fallback
                    # Raw pixels need scoring once per dataset; skip the baseline classifiers elsewhere.
                    first = dataset not in raw_pixels
                    cfg = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"baselines": first})})
                    run_id = f"{dataset}-{depth}-{'_'.join(objectives)}-{lr:g}".replace(".", "p")
                    res = one_run(cfg, run_id, log)
                    if first and "raw_pixels" in res:
                        raw_pixels[dataset] = res.pop("raw_pixels")
                    grid[dataset][depth].setdefault(label, {})[f"{lr:g}"] = res
    finally:
        ray.shutdown()
    details = {"grid": grid, "raw_pixels": raw_pixels, "lrs": list(LRS), "datasets": {d: DATASETS[d] for d in datasets}}
    details["markdown"] = markdown(details)
    with open(os.path.join(os.path.dirname(__file__), "results", "compare_objectives.md"), "w") as f:
        f.write(details["markdown"])
    return {"rows": summary_rows(details), "details": details}


def summary_rows(details: dict) -> list[Row]:
    """One row per (dataset, depth, stack): test NC accuracy at its best-train lr vs infonce_pair's, ratio."""
    rows = []
    for dataset, by_depth in details["grid"].items():
        for depth, by_label in by_depth.items():
            def best(label):
                ok = {lr: r for lr, r in by_label.get(label, {}).items() if "error" not in r}
                if not ok:
                    return None, None
                lr = max(ok, key=lambda k: ok[k]["train"])
                return ok[lr], lr
            base, base_lr = best("infonce_pair")
            for label in by_label:
                r, lr = best(label)
                if r is None:
                    rows.append(Row("compare_objectives", f"{dataset}, {depth} module(s): {label}", None, None, None,
                                    note="failed"))
                    continue
                ratio = r["test"] / base["test"] if base and base["test"] else None
                rows.append(Row("compare_objectives", f"{dataset}, {depth} module(s): {label} (NC test acc)",
                                r["test"], base["test"] if base else None, ratio,
                                note=f"lr {lr} (best train), train {r['train']:.1%}, GMM {r['gmm'] or 0:.1%}; "
                                     f"infonce_pair lr {base_lr}"))
    return rows
