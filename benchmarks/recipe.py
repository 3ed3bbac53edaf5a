"""The `stl10-gim` recipe on one machine: isostack `async` and `sequential` (the real CLI) against the
single-process GIM loop of the same network (``benchmarks.reference_gim``), both sides in one run.

Data: N synthetic 96x96 gray images written in the small-NORB file format (smooth random fields, so the
codecs see image-like values), read by the `smallnorb` adapter and resized to the preset's 64x64; a test
split of N/4 images beside them (published by isostack as a real run would; the loop never touches it).
Each isostack side is ``python -m pipeline run stl10-gim --no-final-stage`` in a fresh process with its
own local Ray; the loop side is ``python -m benchmarks.reference_gim`` in a fresh process, fed from the
first isostack run's ingested input version.

Measured per side:
- img/s: N x epochs / training seconds. isostack: first module start to last module final (from
  summary.json: training, checkpoints, publishing, hand-offs); the CLI's whole wall time (Ray start,
  ingest) is kept as well. Loop: its load + training seconds.
- peak memory: PSS summed over the side's whole process tree (CLI, Ray's GCS, raylet, workers and the
  module actors; or the loop's one process), sampled from ``/proc/<pid>/smaps_rollup`` every
  ``interval`` seconds by a thread here; also the largest single process at that peak, each process's own
  peak (``process_peaks``) and each module actor's peak RSS from summary.json (``module_peak_rss_bytes``).
- parameters per module: isostack's from each module's newest checkpoint, the loop's from its modules;
  they must be equal (the same network).

``python -m benchmarks.recipe [--n 320] [--epochs 2] [--quick] [--keep DIR]`` writes ``recipe-<machine>-n<N>.{json,md}``
into benchmarks/results/; ``python -m benchmarks --only recipe`` runs it (N=320, or --quick) with the others.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from benchmarks import Row, cpu_threads, goal_row, python
from benchmarks.schedules import iso_seconds

NORB_TRAIN_INSTANCES, NORB_TEST_INSTANCES = (4, 6, 7, 8, 9), (0, 1, 2, 3, 5)
NORB_FILES = {"train": "smallnorb-5x46789x9x18x6x2x96x96-training-{}.mat",
              "test": "smallnorb-5x01235x9x18x6x2x96x96-testing-{}.mat"}
MODES = ("async", "sequential")
QUICK = {"n": 8, "epochs": 1, "batch_size": 4}  # 2 steps per epoch: the harness end to end in about 2 minutes


# ---------------------------------------------------------------- data


def write_norb(root: str, n_train: int, n_test: int, seed: int = 0) -> None:
    """Small-NORB-format files (camera 0 = a smooth random 96x96 field) with n_train / n_test distinct poses."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n, instances in (("train", n_train, NORB_TRAIN_INSTANCES), ("test", n_test, NORB_TEST_INSTANCES)):
        i = np.arange(n)
        obj = i % 25  # 5 categories x 5 instances, then azimuths, then elevations: every row a distinct pose
        info = np.column_stack([np.asarray(instances)[obj // 5], (i // 450) % 9, 2 * ((i // 25) % 18), np.zeros(n)])
        coarse = rng.random((n, 12, 12))
        field = np.kron(coarse, np.ones((8, 8))) + 0.15 * rng.random((n, 96, 96))  # (n, 96, 96) blocky + noise
        dat = np.zeros((n, 2, 96, 96), np.uint8)
        dat[:, 0] = np.clip(field / 1.15 * 255, 0, 255).astype(np.uint8)
        name = NORB_FILES[split]
        _write_mat(os.path.join(root, name.format("dat")), 0x1E3D4C55, dat)
        _write_mat(os.path.join(root, name.format("cat")), 0x1E3D4C54, obj % 5)
        _write_mat(os.path.join(root, name.format("info")), 0x1E3D4C54, info)


def _write_mat(path: str, magic: int, array: np.ndarray) -> None:
    dims = list(array.shape) + [1] * max(0, 3 - array.ndim)
    dtype = "<u1" if magic == 0x1E3D4C55 else "<i4"
    with open(path, "wb") as f:
        f.write(struct.pack("<ii", magic, array.ndim) + struct.pack(f"<{len(dims)}i", *dims))
        f.write(array.astype(dtype).tobytes())


def overrides(data: str, *, epochs: int, batch_size: int, cpus: int) -> list[str]:
    """The preset as it is, on the small-NORB files, on CPUs, without exports."""
    return ["dataset.kind=smallnorb", f"dataset.path={data}", f"train.epochs={epochs}",
            f"train.batch_size={batch_size}", f"resources.cpus_per_module={cpus}", "resources.gpus_per_module=0",
            "export.plots=false", "export.report=false", "export.model=false"]


# ---------------------------------------------------------------- memory


class PssSampler:
    """Peak PSS summed over a process and all its descendants, sampled every ``interval`` s in a thread.

    PSS (proportional set size) splits shared pages between the processes sharing them, so the sum over
    a tree of Ray workers counts torch's shared libraries once, not once per process.
    """

    def __init__(self, root_pid: int, interval: float = 0.5) -> None:
        self.root, self.interval = root_pid, interval
        self.peak, self.largest_at_peak, self.processes_at_peak, self.samples = 0, 0, 0, 0
        self.by_process: dict[int, int] = {}  # pid -> that process's own peak PSS (where the memory is)
        self.at_peak: dict[int, int] = {}  # pid -> its PSS in the sample of the summed peak (what adds up to it)
        self.names: dict[int, str] = {}  # pid -> its title when first seen (Ray retitles an actor per task)
        self.loads: list[float] = []  # the machine's 1-minute load average at each sample (others' work included)
        self.cpu: dict[int, float] = {}  # pid -> CPU seconds (user + system) when last seen: where the cores went
        self.busy0 = machine_busy_seconds()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "PssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.machine_busy = machine_busy_seconds() - self.busy0

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        pids = descendants(self.root)
        sizes = [pss_bytes(pid) for pid in pids]
        total = sum(sizes)
        for pid, size in zip(pids, sizes):
            self.names.setdefault(pid, process_name(pid))
            self.by_process[pid] = max(size, self.by_process.get(pid, 0))
            self.cpu[pid] = cpu_seconds(pid) or self.cpu.get(pid, 0.0)
        self.samples += 1
        self.loads.append(load_average())
        if total > self.peak:
            self.peak, self.largest_at_peak, self.processes_at_peak = total, max(sizes, default=0), len(sizes)
            self.at_peak = dict(zip(pids, sizes))


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far (0 when it has exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle since boot (all cores; /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def descendants(root: int) -> list[int]:
    """root and every process below it, from /proc/<pid>/stat's parent ids."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def process_name(pid: int) -> str:
    """A process's title (Ray names an actor's process ``ray::ModuleTrainer...``), cut to 60 characters."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:60]
    except OSError:
        return "?"


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # exited between listing and reading
        pass
    return 0


def measured(cmd: list[str], log_path: str, timeout: float, interval: float) -> dict:
    """Run cmd as a child, sampling its tree's PSS; returns rc, wall seconds, stdout, the memory peak."""
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        with PssSampler(proc.pid, interval) as mem:
            out, _ = proc.communicate(timeout=timeout)
        wall = time.perf_counter() - t0
        log.write(out)
    return {"rc": proc.returncode, "wall_s": wall, "stdout": out, "peak_pss_bytes": mem.peak,
            "largest_process_bytes": mem.largest_at_peak, "processes_at_peak": mem.processes_at_peak,
            "memory_samples": mem.samples,
            "process_peaks": {f"{pid} {mem.names[pid]}": peak
                              for pid, peak in sorted(mem.by_process.items(), key=lambda kv: -kv[1])[:12]},
            "at_peak": {f"{pid} {mem.names[pid]}": size
                        for pid, size in sorted(mem.at_peak.items(), key=lambda kv: -kv[1])[:12]},
            # CPU seconds of the side's processes (each as last sampled, so a process's last half second is missed)
            # and of the whole machine, against wall x cores: how much of the cores the side used.
            "cpu_seconds": round(sum(mem.cpu.values()), 1), "machine_busy_seconds": round(mem.machine_busy, 1),
            "cores": os.cpu_count(),
            "cpu_by_process": {f"{pid} {mem.names[pid]}": round(sec, 1)
                               for pid, sec in sorted(mem.cpu.items(), key=lambda kv: -kv[1])[:12]},
            "load_average": {"mean": float(np.mean(mem.loads)) if mem.loads else None,
                             "max": max(mem.loads, default=None)}}


# ---------------------------------------------------------------- sides


def isostack_side(mode: str, sets: list[str], store: str, log: str, *, timeout: float, interval: float) -> dict:
    """The real CLI, training only; the training span and parameters per module from the store."""
    from pipeline.store import Store
    from pipeline.store.checkpoint import checkpoint_dir, latest, load_tensors, module_weights

    run_id = f"recipe-{mode}"
    args = [a for s in sets + [f"schedule.mode={mode}"] for a in ("--set", s)]
    res = measured([python(), "-m", "pipeline", "run", "stl10-gim", *args, "--store", store, "--run-id", run_id,
                    "--no-final-stage"], log, timeout, interval)
    res.pop("stdout")
    st = Store(store, run_id, create=False)
    summary = st.read_json("summary.json") or {}
    mods = summary.get("modules", {})
    res["status"] = summary.get("status")
    if res["rc"] != 0 or not mods or any(not m.get("finished_at") for m in mods.values()):
        res["cause"] = summary.get("cause") or f"exit {res['rc']}; see {log}"
        return res
    span = (max(iso_seconds(m["finished_at"]) for m in mods.values())
            - min(iso_seconds(m["started_at"]) for m in mods.values()))
    # The span comes from the summary's wall-clock times, the CLI's wall from a monotonic clock. A span longer than
    # the whole CLI run means the wall clock was stepped (or the machine paused) during it (one N=640 run: span 1,581
    # s, CLI 1,491 s): the CLI's wall, which holds the span, is then the time counted.
    res["clock_stepped"] = span > res["wall_s"]
    res["train_span_s"] = min(span, res["wall_s"])
    res["module_seconds"] = {n: m.get("train_seconds") for n, m in mods.items()}
    res["module_epochs"] = {n: m.get("epochs") for n, m in mods.items()}  # must equal train.epochs
    res["module_final_version"] = {n: m.get("final_version") for n, m in mods.items()}
    res["module_peak_rss_bytes"] = {n: m.get("peak_memory_bytes") for n, m in mods.items()}  # each actor's own peak
    res["module_span_s"] = {n: iso_seconds(m["finished_at"]) - iso_seconds(m["started_at"]) for n, m in mods.items()}
    res["module_images"] = {n: trained_images(st, n) for n in mods}
    res["params"] = {n: sum(t.numel() for t in module_weights(load_tensors(st, latest(st, checkpoint_dir(n))["weights"])).values())
                     for n in mods}
    return res


def trained_images(st, name: str) -> int:
    """Images module ``name`` trained on, summed over its epochs (each epoch's samples/s x seconds, from its
    metrics). In async mode a wide module's intermediate versions cover a fraction of the images
    (``pipeline.planning.memory.publish_policy``), so the module above trains its early epochs on fewer
    images than N: the loop's modules each see N x epochs."""
    from workers.metric_log import MetricLog

    log = MetricLog(st, name, 0)
    log.load(up_to_epoch=sys.maxsize)
    per_epoch: dict[int, dict[str, float]] = {}
    for event in log.rows:
        if event["value"] is not None:
            per_epoch.setdefault(event["epoch"], {})[event["name"].split("/", 1)[-1]] = event["value"]
    return int(round(sum(e.get("samples_per_s", 0.0) * e.get("epoch_seconds", 0.0) for e in per_epoch.values())))


def reference_side(sets: list[str], store: str, run_id: str, workdir: str, log: str, *, timeout: float,
                   interval: float, retain: bool = False) -> dict:
    from pipeline.planning.config import load_config

    cfg = load_config("stl10-gim", sets)
    path = os.path.join(workdir, "reference-config.json")
    with open(path, "w") as f:
        json.dump(cfg.model_dump(mode="json"), f)
    res = measured([python(), "-m", "benchmarks.reference_gim", path, store, run_id, str(cpu_threads()),
                    *(["retain"] if retain else [])], log, timeout, interval)
    if res["rc"] != 0:
        res["cause"] = f"exit {res['rc']}; see {log}"
        return res
    res.update(json.loads(res.pop("stdout").strip().splitlines()[-1]))
    return res


# ---------------------------------------------------------------- the comparison


def measure(n: int, epochs: int, workdir: str, *, batch_size: int = 32, cpus: int | None = None,
            modes=MODES, timeout: float = 6 * 3600, interval: float = 0.5, loop_retained: bool = False,
            extra: tuple[str, ...] = ()) -> dict:
    """Both isostack modes and the loop on the same files (and, ``loop_retained``, the loop again with its freed
    heap kept, ``pipeline.feed.heap.retain_freed_memory``, for context); returns the raw measurements. ``extra``:
    more isostack overrides (``KEY=VALUE``, e.g. a trial of ``train.micro_batch``); the loop has none to take."""
    cpus = cpus or cpu_threads()
    data, store, log = (os.path.join(workdir, p) for p in ("norb", "store", "runs.log"))
    write_norb(data, n, max(n // 4, 4))
    sets = overrides(data, epochs=epochs, batch_size=batch_size, cpus=cpus)
    sides = {mode: isostack_side(mode, sets + list(extra), store, log, timeout=timeout, interval=interval)
             for mode in modes}
    sides["loop"] = reference_side(sets, store, f"recipe-{modes[0]}", workdir, log, timeout=timeout, interval=interval)
    if loop_retained:
        sides["loop_retained"] = reference_side(sets, store, f"recipe-{modes[0]}", workdir, log, timeout=timeout,
                                                interval=interval, retain=True)
    for name, side in sides.items():
        seconds = side.get("train_span_s", side.get("seconds"))
        side["img_per_s"] = n * epochs / seconds if seconds else None
    return {"n": n, "epochs": epochs, "batch_size": batch_size, "cpus_per_module": cpus, "loop_threads": cpu_threads(),
            "overrides": sets[2:] + list(extra), "sides": sides}


def _busy(side: dict) -> str:
    wall, cores = side.get("wall_s"), side.get("cores")
    return f"{side['machine_busy_seconds'] / (wall * cores):.0%}" if wall and cores and "machine_busy_seconds" in side else "?"


def rows(m: dict) -> list[Row]:
    loop, gib = m["sides"]["loop"], 2**30
    tag = f"stl10-gim N={m['n']}, {m['epochs']} ep"
    out = []
    for mode in MODES:
        side = m["sides"].get(mode)
        if side is None:
            continue
        if side.get("img_per_s") is None:
            out.append(Row("recipe", f"{tag}: {mode}", None, None, None, ">= 1", False, f"failed: {side.get('cause')}"))
            continue
        goal = mode == "async"
        out.append(goal_row("recipe", f"{tag}: img/s, {mode} vs single-process loop", side["img_per_s"],
                            loop.get("img_per_s") or 0, at_least=1.0 if goal else None,
                            note=f"train span {side['train_span_s']:.0f} s (CLI wall {side['wall_s']:.0f} s"
                                 f"{'; the wall clock stepped: the CLI wall counted' if side.get('clock_stepped') else ''}) vs "
                                 f"loop {loop.get('seconds', 0):.0f} s; epochs per module "
                                 f"{'/'.join(str(e) for e in side.get('module_epochs', {}).values())}; load average "
                                 f"{_load(side)} vs {_load(loop)}"))
        images = side.get("module_images")
        if images and loop.get("seconds"):
            work = sum(images.values()) / len(images)  # images a module trained on, on average
            out.append(goal_row("recipe", f"{tag}: images trained per module per s, {mode} vs loop",
                                work / side["train_span_s"], m["n"] * m["epochs"] / loop["seconds"],
                                note="images each module trained on: " + " / ".join(f"{n} {v:,}" for n, v in images.items())
                                     + f" (the loop: {m['n'] * m['epochs']:,} each); the row above counts N x epochs"))
        if side.get("cpu_seconds") and loop.get("cpu_seconds"):
            out.append(goal_row("recipe", f"{tag}: CPU seconds (all processes), {mode} vs loop", side["cpu_seconds"],
                                loop["cpu_seconds"], note=f"cores busy {_busy(side)} vs {_busy(loop)} of the CLI's "
                                                          f"wall (the whole machine, all cores)"))
        out.append(goal_row("recipe", f"{tag}: peak PSS GiB (all processes), {mode} vs loop", side["peak_pss_bytes"] / gib,
                            loop["peak_pss_bytes"] / gib, at_most=1.0 if goal else None,
                            note=f"largest process {side['largest_process_bytes'] / gib:.1f} vs "
                                 f"{loop['largest_process_bytes'] / gib:.1f} GiB; {side['processes_at_peak']} processes"))
        same = side["params"] == loop.get("params")
        out.append(Row("recipe", f"{tag}: parameters per module, {mode} = loop", None, None, None, "equal", same,
                       " / ".join(f"{n} {side['params'][n]:,}" + ("" if same else f" vs {loop.get('params', {}).get(n)}")
                                  for n in side["params"])))
    kept = m["sides"].get("loop_retained")
    if kept and kept.get("img_per_s") and m["sides"].get("async", {}).get("img_per_s"):
        a = m["sides"]["async"]
        out.append(goal_row("recipe", f"{tag}: img/s, async vs the loop with a kept heap (context)",
                            a["img_per_s"], kept["img_per_s"],
                            note=f"loop {kept['seconds']:.0f} s, peak PSS {kept['peak_pss_bytes'] / gib:.2f} GiB; the "
                                 "official code has glibc's default heap, as the loop above"))
    a, s = m["sides"].get("async", {}), m["sides"].get("sequential", {})
    if a.get("train_span_s") and s.get("train_span_s"):
        out.append(goal_row("recipe", f"{tag}: train span s, async vs sequential", a["train_span_s"], s["train_span_s"],
                            at_most=1.0))
    return out


def _load(side: dict) -> str:
    load = side.get("load_average") or {}
    return "-" if load.get("mean") is None else f"{load['mean']:.1f} (max {load['max']:.1f})"


def markdown(result: dict) -> str:
    lines = ["| measure | isostack | baseline | ratio | goal | met | note |", "|---|---:|---:|---:|---|---|---|"]
    for r in result["rows"]:
        num = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['measure']} | {num(r['isostack'])} | {num(r['baseline'])} | {num(r['ratio'])} | "
                     f"{r['goal'] or '-'} | {met} | {r['note']} |")
    return "\n".join(lines)


def run(quick: bool, workdir: str) -> dict:
    """`python -m benchmarks --only recipe`: N=320, 2 epochs (or the quick size)."""
    size = QUICK if quick else {"n": 320, "epochs": 2, "batch_size": 32}
    m = measure(size["n"], size["epochs"], workdir, batch_size=size["batch_size"])
    return {"rows": rows(m), "details": m}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.recipe", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=320, help="training images (default 320; the issue's sizes: 320, 640)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--quick", action="store_true", help=f"a smoke run of the harness: {QUICK}")
    p.add_argument("--cpus-per-module", type=int, default=None, help="resources.cpus_per_module (default: all cores)")
    p.add_argument("--modes", default=",".join(MODES), help="isostack schedule modes to run")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--loop-retained", action="store_true",
                   help="also run the loop with its freed C heap kept (context: what a kept heap alone buys it)")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="work in DIR and keep it (data, stores with each run's metrics and summary, runs.log)")
    p.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                   help="one more isostack override (repeatable), e.g. train.micro_batch=16")
    args = p.parse_args(argv)
    size = dict(QUICK) if args.quick else {"n": args.n, "epochs": args.epochs, "batch_size": 32}
    if args.keep:
        os.makedirs(args.keep, exist_ok=True)
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="isostack-recipe-")) \
            as workdir:
        m = measure(size["n"], size["epochs"], workdir, batch_size=size["batch_size"], cpus=args.cpus_per_module,
                    modes=tuple(x for x in args.modes.split(",") if x), loop_retained=args.loop_retained,
                    extra=tuple(args.extra))
        result = {"rows": [r.as_dict() for r in rows(m)], "details": m,
                  "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with open(os.path.join(workdir, "runs.log")) as f:
            log_tail = f.read()[-4000:]
    from benchmarks.__main__ import machine_name

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"recipe-{machine_name()}-n{size['n']}{'-quick' if args.quick else ''}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2, default=str)
    with open(stem + ".md", "w") as f:
        f.write(markdown(result) + "\n")
    print(markdown(result))
    print(f"\nwritten: {stem}.json, {stem}.md")
    failed = [s for s in m["sides"].values() if s.get("img_per_s") is None]
    if failed:
        print(log_tail, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
