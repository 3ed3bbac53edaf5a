"""A discrete-event model of the module actors' schedule (pure Python: no torch, no Ray).

Each module is a process that follows ``workers/trainer.py``'s ``run`` loop step by step: what it does at an
epoch boundary (train, wait, commit the final version) and when it publishes are decided by the trainer's own
``workers.epochs.next_step`` / ``publishes_after``, so the model cannot drift from the epoch policy; what each
step costs comes from ``ModuleCost``, and the resources it holds are shared by processor sharing:

- ``device``: a module's training and inference. One device per module by default; with
  ``Cluster.devices`` < M the modules time-slice: ``pooled`` (an OS scheduler over cores: n busy tasks on
  D devices each run at min(1, D/n)) or pinned (module i on device ``assignment[i]``, n busy tasks there
  run at 1/n each).
  With pooled cores a busy actor may want more than one (``ModuleCost.cpu_demand``: torch's thread plus
  the batch prefetch and Arrow threads); n busy actors then run at min(1, D / sum of their demands).
- ``host``: the actor's CPU work besides the device (Parquet encode/decode, checkpoints, actor start).
  Unlimited, unless ``Cluster.host_on_device`` (a CPU-only machine: the cores are the devices), then it
  competes for the device pool like training does.
- ``read`` / ``write``: store bandwidth in bytes/s. With ``shared_store`` concurrent transfers split it
  (one pool per direction, or one pool for both with ``duplex=False``); otherwise each transfer gets it all.
- ``delay``: a poll sleep, which holds nothing.

Everything is in seconds and bytes; ``simulate`` returns a ``SimResult``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from workers.epochs import Boundary, Step, next_step, publishes_after, reader_may_use


@dataclass(frozen=True)
class ModuleCost:
    """What one module's steps cost. Device and host amounts are seconds at full speed."""

    name: str
    train_s: float | tuple[float, ...]  # one training epoch on the device (a tuple: epoch by epoch, then its mean)
    epochs: int                     # train.epochs of this module
    infer_s: float | tuple[float, ...] = 0.0  # inference over all samples for a full version (device; tuple: by publish)
    publish_host_s: float = 0.0     # encode + hash a full version, plus the checkpoint before it (host)
    publish_bytes: float = 0.0      # bytes written by a full version
    load_bytes: float = 0.0         # bytes read when loading a full upstream version
    load_host_s: float = 0.0        # decode a full upstream version (host)
    epoch_host_s: float = 0.0       # per epoch, outside the training loop: batches set-up, status, manifest polls
    start_s: float = 0.0            # actor start: process, imports, build, resume check (host)
    cpu_demand: float = 1.0         # cores one busy actor keeps busy (pooled cores: torch plus its helper threads)


@dataclass(frozen=True)
class Cluster:
    devices: int | None = None      # None: one device per module
    pooled: bool = True             # devices < M: a shared pool (cores) rather than pinned devices
    assignment: tuple[int, ...] | None = None  # pinned: device of each module (default i % devices)
    host_on_device: bool = False    # host work competes for the devices (a CPU-only machine)
    read_bw: float = math.inf       # store read bytes/s
    write_bw: float = math.inf      # store write bytes/s
    shared_store: bool = True       # concurrent transfers share the bandwidth
    duplex: bool = True             # separate read and write pools (False: one pool, read_bw for both)


@dataclass(frozen=True)
class Schedule:
    """The ``schedule.*`` keys, as ``schemas.config.ScheduleConfig`` defines them."""

    mode: str = "async"
    publish_every: int = 1
    publish_fraction: float = 1.0
    settle_epochs: int = 1
    track_upstream: bool = True
    poll_s: float = 0.5


@dataclass
class ModuleResult:
    name: str
    started_s: float | None = None      # first training epoch starts
    final_s: float | None = None        # final version committed
    epochs: int = 0
    published: int = 0                  # versions committed, the final one included
    device_work_s: float = 0.0          # device-seconds done (training + inference)
    train_work_s: float = 0.0
    elapsed: dict = field(default_factory=dict)   # label -> seconds spent in that step (slowdowns included)
    staleness_start: list = field(default_factory=list)  # upstream versions behind the newest, per epoch start
    staleness_end: list = field(default_factory=list)    # ... and at that epoch's end
    upstream_used: list = field(default_factory=list)    # (epoch, upstream version)
    final_upstream: int | None = None   # the upstream version loaded when the final version was committed
    utilisation: float = 0.0            # device_work_s / span

    def as_dict(self) -> dict:
        st, se = self.staleness_start or [0], self.staleness_end or [0]
        return {"name": self.name, "started_s": self.started_s, "final_s": self.final_s, "epochs": self.epochs,
                "published": self.published, "device_work_s": self.device_work_s, "train_work_s": self.train_work_s,
                "utilisation": self.utilisation, "elapsed": dict(self.elapsed),
                "staleness_start_mean": sum(st) / len(st), "staleness_start_max": max(st),
                "staleness_end_mean": sum(se) / len(se), "staleness_end_max": max(se)}


@dataclass
class SimResult:
    wall_s: float                       # t = 0 (all actors asked to start / the run starts) to the last final
    span_s: float                       # first training epoch start to the last final (the measured "training phase")
    modules: list[ModuleResult]
    devices: int

    @property
    def staleness(self) -> dict:
        st = [s for m in self.modules for s in m.staleness_start] or [0]
        se = [s for m in self.modules for s in m.staleness_end] or [0]
        return {"start_mean": sum(st) / len(st), "start_max": max(st), "end_mean": sum(se) / len(se), "end_max": max(se)}

    def bottleneck(self) -> tuple[str, dict]:
        """Where the modules' time went, summed: the largest of compute / store / host / contention, with shares."""
        total: dict[str, float] = {}
        for m in self.modules:
            for label, s in m.elapsed.items():
                total[_CATEGORY[label]] = total.get(_CATEGORY[label], 0.0) + s
        busy = {k: v for k, v in total.items() if k != "waiting"}
        whole = sum(total.values()) or 1.0
        shares = {k: v / whole for k, v in sorted(total.items())}
        return (max(busy, key=busy.get) if busy else "-"), shares

    def as_dict(self) -> dict:
        name, shares = self.bottleneck()
        return {"wall_s": self.wall_s, "span_s": self.span_s, "devices": self.devices, "staleness": self.staleness,
                "bottleneck": name, "time_shares": shares, "modules": [m.as_dict() for m in self.modules]}


# Step labels -> the resource a table names as the bottleneck. "contention": time lost to time-slicing devices.
_CATEGORY = {"start": "host", "train": "compute", "infer": "compute", "publish_host": "host", "write": "store write",
             "load": "store read", "load_host": "host", "epoch_host": "host", "poll": "waiting",
             "contention": "device sharing"}


@dataclass
class _Version:
    number: int
    final: bool
    fraction: float


@dataclass
class _Task:
    kind: str           # device | host | read | write | delay
    amount: float       # seconds at full speed, or bytes
    label: str
    full_rate: float = 1.0


class _Sim:
    def __init__(self, costs: list[ModuleCost], cluster: Cluster, schedule: Schedule) -> None:
        self.costs, self.cluster, self.schedule = costs, cluster, schedule
        self.t = 0.0
        self.versions: list[list[_Version]] = [[] for _ in costs]  # committed versions of each module
        self.results = [ModuleResult(c.name) for c in costs]
        m = len(costs)
        self.ndev = m if cluster.devices is None else cluster.devices
        self.assign = cluster.assignment or tuple(i % max(self.ndev, 1) for i in range(m))

    # ------------------------------------------------ the store as the modules see it

    def newest(self, i: int) -> _Version | None:
        """Newest committed version of module i's upstream (the input is one final version from t = 0)."""
        if i == 0:
            return _Version(1, True, 1.0)
        return self.versions[i - 1][-1] if self.versions[i - 1] else None

    def commit(self, i: int, final: bool, fraction: float) -> None:
        self.versions[i].append(_Version(len(self.versions[i]) + 1, final, fraction))
        self.results[i].published += 1
        if final:
            self.results[i].final_s = self.t

    # ------------------------------------------------ one module: workers/trainer.py's run loop

    def _start(self, i: int):
        """Actor start: process, imports, build, resume check (both modes create every actor at t = 0)."""
        yield _Task("host", self.costs[i].start_s, "start")

    def _body(self, i: int):
        """``ModuleTrainer.run``: the decisions are ``workers.epochs``' own (the one epoch policy), the costs ours."""
        c, sch, res = self.costs[i], self.schedule, self.results[i]
        used: list[int] = []               # lineage["upstream_versions"]: the upstream version of each epoch
        loaded: list[_Version | None] = [None]
        n_pub = 0

        def switch():  # _switch_upstream: move to the newest committed upstream version, loading it
            newest = self.newest(i)
            if newest is None or (loaded[0] is not None and loaded[0].number == newest.number):
                return
            yield _Task("read", c.load_bytes * newest.fraction, "load")
            yield _Task("host", c.load_host_s * newest.fraction, "load_host")
            loaded[0] = newest

        def publish(final: bool):
            nonlocal n_pub
            fraction = 1.0 if final else sch.publish_fraction
            yield _Task("device", _nth(c.infer_s, n_pub) * fraction, "infer")
            n_pub += 1
            yield _Task("host", c.publish_host_s * fraction, "publish_host")
            yield _Task("write", c.publish_bytes * fraction, "write")
            self.commit(i, final, fraction)

        while True:
            yield from switch()
            up = loaded[0]
            step = next_step(Boundary(epoch=res.epochs, budget=c.epochs, settle=sch.settle_epochs,
                                      track=sch.track_upstream, loaded=up is not None,
                                      upstream_final=up is not None and up.final,
                                      trained_on_loaded=bool(up is not None and used and used[-1] == up.number)))
            if step == Step.wait:
                yield _Task("delay", sch.poll_s, "poll")
                continue
            if step == Step.finish:
                break
            # train_until(epoch + 1): switch again (the upstream exists by now), then one epoch
            yield from switch()
            up = loaded[0]
            yield _Task("host", c.epoch_host_s, "epoch_host")
            if res.started_s is None:
                res.started_s = self.t
            res.staleness_start.append(self.newest(i).number - up.number)
            yield _Task("device", _nth(c.train_s, res.epochs), "train")
            res.staleness_end.append(self.newest(i).number - up.number)
            res.epochs += 1
            used.append(up.number)
            res.upstream_used.append((res.epochs, up.number))
            above = i + 1 < len(self.costs)
            wanted = not above or reader_may_use(self.results[i + 1].epochs, self.costs[i + 1].epochs, sch.settle_epochs)
            if publishes_after(res.epochs, c.epochs, sch.publish_every, up.final, wanted):
                yield from publish(final=False)
        res.final_upstream = loaded[0].number
        yield from publish(final=True)

    # ------------------------------------------------ processor sharing over all running steps

    def _rates(self, active: dict[int, _Task]) -> dict[int, float]:
        cl = self.cluster
        on_dev = {i: t for i, t in active.items()
                  if t.kind == "device" or (t.kind == "host" and cl.host_on_device)}
        rates = {}
        for i, t in active.items():
            if i in on_dev:
                if self.ndev >= len(self.costs) and not cl.host_on_device:
                    rates[i] = 1.0
                elif cl.pooled:
                    rates[i] = min(1.0, self.ndev / sum(self.costs[j].cpu_demand for j in on_dev))
                else:
                    rates[i] = 1.0 / sum(1 for j in on_dev if self.assign[j] == self.assign[i])
            elif t.kind in ("host", "delay"):
                rates[i] = 1.0
            else:
                pool = [j for j, u in active.items() if u.kind in (("read", "write") if not cl.duplex else (t.kind,))]
                bw = cl.write_bw if (t.kind == "write" and cl.duplex) else cl.read_bw
                rates[i] = bw / (len(pool) if cl.shared_store else 1)
        return rates

    def run(self) -> SimResult:
        m = len(self.costs)
        # Both modes create every actor at t = 0 (pipeline/run/scheduler.py); async then runs them all, sequential
        # runs a module once it has started and the one below is final.
        gens = {i: self._start(i) for i in range(m)}
        phase = dict.fromkeys(range(m), "start")  # start -> ready (sequential, waiting its turn) -> body -> done
        active: dict[int, _Task] = {}

        def launch(i: int) -> None:
            phase[i], gens[i] = "body", self._body(i)
            advance(i)

        def advance(i: int) -> None:
            while True:
                try:
                    task = next(gens[i])
                except StopIteration:
                    del gens[i]
                    active.pop(i, None)
                    if phase[i] == "start":
                        phase[i] = "ready"
                        if self.schedule.mode == "async" or i == 0 or phase[i - 1] == "done":
                            launch(i)
                    else:
                        phase[i] = "done"
                        if i + 1 < m and phase[i + 1] == "ready":  # sequential: the scheduler runs the next one
                            launch(i + 1)
                    return
                if task.amount > 0:
                    if task.kind in ("read", "write") and math.isinf(self._rates({i: task})[i]):
                        continue  # free bandwidth: the transfer takes no time
                    task.full_rate = self._rates({i: task})[i] if task.kind in ("read", "write") else 1.0
                    active[i] = task
                    return

        for i in list(gens):
            advance(i)
        guard = 0
        while active:
            guard += 1
            if guard > 10_000_000:
                raise RuntimeError("simulation does not end (a module waits for an upstream that never finishes)")
            rates = self._rates(active)
            dt = min(t.amount / rates[i] for i, t in active.items())
            self.t += dt
            done = []
            for i, t in active.items():
                work = rates[i] * dt
                t.amount -= work
                res = self.results[i]
                # A shared store's slowdown stays with the transfer (the store is the bottleneck); a device's is split
                # off as time-slicing: elapsed minus the time this work takes when nothing competes.
                alone = dt if t.kind in ("read", "write") else work / t.full_rate
                res.elapsed[t.label] = res.elapsed.get(t.label, 0.0) + alone
                if dt - alone > 1e-12:
                    res.elapsed["contention"] = res.elapsed.get("contention", 0.0) + (dt - alone)
                if t.kind == "device":
                    res.device_work_s += work
                    if t.label == "train":
                        res.train_work_s += work
                if t.amount <= 1e-9 * max(1.0, work):
                    done.append(i)
            for i in sorted(done):  # same-instant completions in stack order: a commit is seen by the module above
                active.pop(i, None)
                advance(i)
        wall = max((r.final_s or 0.0) for r in self.results)
        first = min((r.started_s for r in self.results if r.started_s is not None), default=0.0)
        span = wall - first
        for r in self.results:
            r.utilisation = r.device_work_s / span if span > 0 else 0.0
        return SimResult(wall_s=wall, span_s=span, modules=self.results, devices=self.ndev)


def _nth(x: float | tuple[float, ...], k: int) -> float:
    if isinstance(x, (int, float)):
        return float(x)
    return float(x[k]) if k < len(x) else sum(x) / len(x)


def simulate(costs: list[ModuleCost], cluster: Cluster | None = None, schedule: Schedule | None = None) -> SimResult:
    """Run the schedule of ``costs`` (bottom module first) on ``cluster``; see the module docstring."""
    if not costs:
        raise ValueError("simulate needs at least one module")
    if schedule is not None and schedule.mode not in ("async", "sequential"):
        raise ValueError(f"schedule.mode must be 'async' or 'sequential', not {schedule.mode!r}")
    if (schedule or Schedule()).poll_s <= 0:
        raise ValueError("schedule.poll_s must be > 0")
    return _Sim(costs, cluster or Cluster(), schedule or Schedule()).run()
