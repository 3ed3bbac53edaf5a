"""Real small runs on this machine, read back into the simulator's costs, and the simulation compared to them.

A run is ``driver.run`` of norb-synthetic cut to 2 or 3 modules (``benchmarks.schedules``' sizes), async and
sequential, on one local Ray with one torch thread per actor. From the store afterwards, per module:

- ``train_s``: mean of ``<m>/epoch_seconds`` (metrics/<m>.parquet);
- ``post_s``: the time from an epoch's end (the ``epoch_seconds`` record) to the ``<m>/publish/version``
  record after it: checkpoint + metrics + status writes + inference + encode + write + commit;
- ``gap_s``: from a publish to the next epoch's start when no upstream load falls between (the loop's
  manifest polls, batches set-up);
- ``load_s``: ``load_source`` of each committed version of its upstream, timed here after the run (the trainer
  records only when a load ends, not when it starts);
- ``start_s``: actor start to its first upstream load, less that load (driver.run's call to the first
  ``<m>/upstream/version`` record; in sequential, the module below's ``finished_at`` to it).

- ``cpu_cores``: CPU seconds of the actor's process over its span / the span (``/proc/<pid>/stat``, sampled every
  0.1 s from a thread here): the cores a busy actor keeps busy, torch's one thread plus its helpers.

Measured training phase: the first epoch's start to the last final commit (status ``started_at`` /
``finished_at``, as ``benchmarks.schedules`` measures its span).
"""

from __future__ import annotations

import os
import statistics
import threading
import time

from benchmarks.schedules import iso_seconds
from benchmarks.simulate.model import Cluster, ModuleCost, Schedule, simulate


class CpuSampler:
    """CPU seconds of every ``ray::ModuleTrainer`` process (the module actors this run started), sampled over time."""

    def __init__(self, every: float = 0.1) -> None:
        self.every, self.samples, self.machine = every, {}, []  # pid -> [(time, cpu seconds)]; [(time, busy s)]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            try:
                with open("/proc/stat") as f:
                    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
                self.machine.append((now, (user + nice + system + irq + softirq + steal) / self._tick))
            except (OSError, ValueError):
                pass
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if not f.read(64).startswith(b"ray::ModuleTrainer"):
                            continue
                    with open(f"/proc/{pid}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                cpu = (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime
                self.samples.setdefault(int(pid), []).append((now, cpu))
            self._stop.wait(self.every)

    def cores(self, pid: int | None, start: float, end: float) -> float | None:
        """Mean cores the process (None: the whole machine, steal included) used between ``start`` and ``end``."""
        pts = [p for p in (self.machine if pid is None else self.samples.get(pid, [])) if start <= p[0] <= end]
        if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
            return None
        return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


def measured_run(cfg, run_id: str, log: str) -> dict:
    """Train ``cfg`` through ``driver.run`` and return its timeline and per-module costs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from benchmarks import quiet
    from pipeline.run import driver
    from pipeline.feed import load_source

    with quiet(log):
        store, _, _ = driver.prepare_run(cfg, run_id)
        with CpuSampler() as cpu:
            t0 = time.time()
            rc = driver.run(cfg, run_id=run_id, final_stage=False)
            t1 = time.time()
    if rc != 0:
        raise RuntimeError(f"run {run_id} failed (rc {rc}); see {log}")
    names = list(cfg.stack)
    config = cfg.model_dump(mode="json")
    modules, prev_final = {}, None
    for i, name in enumerate(names):
        rows = pq.read_table(pa.BufferReader(store.read_bytes(f"metrics/{name}.parquet"))).to_pylist()
        st = store.read_json(f"status/{name}.json")
        ends = [(r["time"], r["value"]) for r in rows if r["name"] == f"{name}/epoch_seconds"]
        up_loads = [[r["epoch"], int(r["value"])] for r in rows if r["name"] == f"{name}/upstream/version"]
        pubs = [r["time"] for r in rows if r["name"] == f"{name}/publish/version"]
        loads = [r["time"] for r in rows if r["name"] == f"{name}/upstream/version"]
        upstream = "input" if i == 0 else names[i - 1]
        load_times = []
        for v in store.versions(upstream):
            t = time.perf_counter()
            load_source(store, upstream, v, config, torch.device("cpu"))
            load_times.append(time.perf_counter() - t)
        load_s = statistics.mean(load_times)
        post, gap = [], []
        for k, (end, _) in enumerate(ends):
            after = [p for p in pubs if p >= end]
            if after and (k + 1 >= len(ends) or after[0] <= ends[k + 1][0] - ends[k + 1][1]):
                post.append(after[0] - end)
                if k + 1 < len(ends):
                    nstart = ends[k + 1][0] - ends[k + 1][1]
                    if not any(after[0] <= u <= nstart for u in loads):
                        gap.append(nstart - after[0])
        first_load = loads[0] if loads else t0
        begin = t0 if (cfg.schedule.mode == "async" or prev_final is None) else prev_final
        modules[name] = {
            "epochs": len(ends), "epoch_seconds": [round(s, 4) for _, s in ends], "post_seconds": [round(p, 4) for p in post],
            "upstream_loads": up_loads,
            "cpu_cores": cpu.cores(int(st["pid"]), iso_seconds(st["started_at"]), iso_seconds(st["finished_at"])),
            "train_s": statistics.mean(s for _, s in ends), "post_s": statistics.mean(post) if post else 0.0,
            "gap_s": statistics.median(gap) if gap else 0.0, "load_s": load_s, "loads": len(loads),
            "start_s": max(0.0, first_load - begin - load_s), "published": len(pubs),
            "started": iso_seconds(st["started_at"]), "finished": iso_seconds(st["finished_at"]),
        }
        if cfg.schedule.mode == "async" and i > 0:  # its first load waited for m1's first version: not start-up
            modules[name]["start_s"] = modules[names[0]]["start_s"]
        prev_final = modules[name]["finished"]
    first = min(m["started"] for m in modules.values())
    last = max(m["finished"] for m in modules.values())
    for m in modules.values():
        m["started_rel_s"], m["finished_rel_s"] = m.pop("started") - first, m.pop("finished") - first
    busy = cpu.cores(None, first, last)
    actors = sum(cpu.cores(int(store.read_json(f"status/{n}.json")["pid"]), first, last) or 0.0 for n in names)
    return {"run_id": run_id, "mode": cfg.schedule.mode, "driver_s": t1 - t0, "span_s": last - first,
            "machine_busy_cores": busy, "background_cores": None if busy is None else max(0.0, busy - actors),
            "modules": modules}


def costs_from(run: dict, epochs: int, *, replay: bool = False, demand: dict | None = None) -> list[ModuleCost]:
    """The simulator's costs from one measured run (everything on the CPU: inference + write are in post_s).

    ``replay``: each epoch and publish costs what it measured (then their mean); else the first epoch and the
    first publish cost what they measured (warm-up: first kernels, first writes) and every later one the mean of
    the rest.
    ``demand``: cores a busy actor uses, by module (default 1).
    """
    demand = demand or {}
    def cost(xs: list[float]) -> tuple[float, ...]:
        return tuple(xs) if replay or len(xs) < 2 else (xs[0], statistics.mean(xs[1:]))

    return [ModuleCost(name, train_s=cost(m["epoch_seconds"]), epochs=epochs,
                       infer_s=cost(m["post_seconds"]) if m["post_seconds"] else 0.0,
                       load_host_s=m["load_s"], epoch_host_s=m["gap_s"], start_s=m["start_s"],
                       cpu_demand=demand.get(name) or 1.0)
            for name, m in run["modules"].items()]


def predict(run: dict, costs: list[ModuleCost], cfg, cores: int | None) -> dict:
    """Simulate ``run``'s schedule with ``costs``; ``cores`` None = one device per module (no contention)."""
    sch = cfg.schedule
    schedule = Schedule(mode=sch.mode, publish_every=sch.publish_every or 1, publish_fraction=sch.publish_fraction or 1.0,
                        settle_epochs=sch.settle_epochs, track_upstream=sch.track_upstream, poll_s=sch.poll_seconds)
    cluster = Cluster(devices=cores, pooled=True, host_on_device=cores is not None)
    res = simulate(costs, cluster, schedule)
    return {"span_s": res.span_s, "measured_span_s": run["span_s"], "error": res.span_s / run["span_s"] - 1.0,
            "epochs": {m.name: m.epochs for m in res.modules}, "staleness": res.staleness,
            "utilisation": {m.name: round(m.utilisation, 3) for m in res.modules}}
