"""Starting module actors on Ray, watching them, and deciding what a failure means.

Workers report ``ModuleStatus`` data; ``decide`` (a pure function, tested
without a cluster) turns a set of statuses into actions; the loop here only
carries them out and draws one progress line per module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline import faults
from pipeline.errors import TrainingError
from pipeline.malloc import actor_environment
from schemas.config import RunConfig
from schemas.status import ModuleState, ModuleStatus
from pipeline.run.progress import Progress
from workers.epochs import reader_may_use
from pipeline.run.offload import ModuleTrainer  # the actor class; workers.trainer (torch) loads in the actor


# ---------------------------------------------------------------- decisions (pure)


@dataclass(frozen=True)
class Decision:
    action: str        # "stop": stop this module (its upstream can never become final)
    module: str
    reason: str


def decide(order: list[str], statuses: dict[str, ModuleStatus]) -> list[Decision]:
    """What to do given every module's status: modules above a failed one can never finish."""
    decisions = []
    for i, name in enumerate(order):
        st = statuses.get(name)
        if st is None or st.state != ModuleState.failed:
            continue
        for above in order[i + 1:]:
            other = statuses.get(above)
            if other is None or not other.state.done:
                decisions.append(Decision("stop", above, f"module {name} below it failed: {st.error}"))
        break
    return decisions


def resolve_gpus(cfg: RunConfig, cluster_gpus: float) -> float:
    """GPUs per module actor: 'auto' = 1 when the cluster has GPUs, else 0 (CPU)."""
    gpus = cfg.resources.gpus_per_module
    if gpus == "auto":
        return 1.0 if cluster_gpus >= 1 else 0.0
    return float(gpus)


# ---------------------------------------------------------------- Ray side


def ensure_ray(address: str | None, cfg: RunConfig) -> bool:
    """Connect to a cluster, or start a local instance sized for every module actor. True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or cfg.resources.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)  # no "Connecting to ..." INFO lines
        return False
    # A laptop may have fewer cores than modules: let Ray oversubscribe (each actor uses its own torch threads).
    # address="local": a new instance even when `ray start --head` runs on this machine (a bare ray.init()
    # would join that head, and refuse num_cpus); joining a cluster takes --address / RAY_ADDRESS.
    need = len(cfg.stack) * cfg.resources.cpus_per_module
    # The private instance keeps Ray's default authentication (token when ~/.ray/auth_token exists); Ray's notice
    # that it chose so, printed on every run, is dropped at its logger, like the "Started a local Ray" INFO line.
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_drop_auth_notice)
    # No idle workers started ahead (Ray starts one per CPU for tasks when the first driver connects): this
    # driver runs no tasks and starts its actors as it needs them; on this 2-core machine the idle workers were two
    # processes and ~1.8 CPU-s a run, on a 16-core node 16.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, log_to_driver=True,
             object_store_memory=256 * 1024 * 1024, logging_level=logging.WARNING,
             _system_config={"prestart_worker_first_driver": False})
    return True


def _drop_auth_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _actor_options(cfg: RunConfig, run_id: str, name: str, gpus: float, generation: int, pg=None,
                   bundle: int = 0) -> dict:
    res = cfg.resources
    opts = dict(num_cpus=res.cpus_per_module, num_gpus=gpus, max_restarts=res.max_restarts, max_task_retries=-1,
                max_concurrency=2, name=f"isostack/{run_id}/{name}/{generation}")
    if pg is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                       placement_group_bundle_index=bundle)
    elif res.placement == "spread":
        opts["scheduling_strategy"] = "SPREAD"  # best effort: Ray spreads the actors over the nodes that fit them
    # Injected faults and the malloc settings (the user's, else a CPU actor's kept heap) reach the actor on any
    # cluster: a raylet's workers do not inherit the driver's environment.
    env = faults.environment() | actor_environment(on_cpu=gpus == 0)
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return opts


def module_bundle(cfg: RunConfig, gpus: float) -> dict[str, float]:
    """The resources one module actor asks for (one placement-group bundle)."""
    bundle = {"CPU": float(cfg.resources.cpus_per_module)}
    if gpus > 0:
        bundle["GPU"] = gpus
    return bundle


def _reserve(cfg: RunConfig, run_id: str, names: list[str], gpus: float):
    """placement=pack: a placement group with one bundle per module (PACK), ready before any actor starts.

    Waits as long as the cluster needs (an autoscaler may be adding nodes), saying every 30 s what it waits for.
    """
    import ray
    from ray.util.placement_group import placement_group

    bundle = module_bundle(cfg, gpus)
    pg = placement_group([dict(bundle) for _ in names], strategy="PACK", name=f"isostack/{run_id}/{'+'.join(names)}")
    waited = 0.0
    while not ray.wait([pg.ready()], timeout=30.0)[0]:
        waited += 30.0
        total, free = _cpus_gpus(ray.cluster_resources()), _cpus_gpus(ray.available_resources())
        print(f"waiting {waited:.0f} s for a placement group of {len(names)} x {bundle} (resources.placement=pack); "
              f"cluster total {total}, free {free}", flush=True)
    return pg


def _cpus_gpus(resources: dict) -> dict:
    return {k: v for k, v in resources.items() if k in ("CPU", "GPU")}


@dataclass
class Launch:
    """Ray connected and the module actors created (``launched``): each actor's process starts and imports torch as
    soon as it is created, before anything asks it to train.

    Where the modules share one machine's cores (CPU actors whose threads exceed its cores: the turns of
    ``workers.runtime.CoreTurns``), an actor whose module reads another of this launch is created only once that
    one has committed a version (``create_due``): until then it has nothing to train on, and its process (torch
    loaded, ~0.55 GiB) would only add to the machine's peak. Created as the publish began, it sat beside the
    module stepping and the one publishing (the N=640 recipe's peak: m1 stepping 3.0, m2 publishing 0.7, m3 idle
    0.54 GiB); its start costs the same cores either way, since they are busy with that publish."""

    names: list[str]
    actors: dict
    deferred: list[str] = field(default_factory=list)
    create: Callable[[str], None] | None = None
    after: dict[str, tuple[int, bool]] = field(default_factory=dict)  # parked (``park``): version seen, final only

    def create_due(self, statuses: dict[str, ModuleStatus]) -> list[str]:
        """Create the deferred actors whose upstream has committed a version they can train on (a parked one's:
        newer than the one it trained on last; the final one where it trains on no other); the names created. One
        whose upstream ended without a final version is never created (``deferred_dead``)."""
        made = []
        for name in list(self.deferred):
            below = statuses.get(self.names[self.names.index(name) - 1])
            if below is None:
                continue
            seen, final_only = self.after.get(name, (0, False))
            final = below.state == ModuleState.final or below.final_version is not None
            if final or not final_only and max(below.published, default=0) > seen:
                self.deferred.remove(name)
                self.after.pop(name, None)
                self.create(name)
                made.append(name)
        return made

    def park(self, name: str, seen: int, *, final_only: bool) -> None:
        """``name``'s actor ended as it waited for its upstream (``workers.epochs.parks``) after training on the
        upstream's version ``seen``: create it again, to resume from its checkpoint, when the upstream commits a
        newer version (``final_only``: its final version, the only one the module's next epochs may train on)."""
        self.after[name] = (seen, final_only)
        self.deferred.append(name)

    def deferred_dead(self, statuses: dict[str, ModuleStatus]) -> list[str]:
        """Deferred modules that can never start: a module below them ended (failed, stopped) without a final
        version. Dropped from ``deferred``."""
        dead = []
        for name in list(self.deferred):
            below = self.names[:self.names.index(name)]
            if any(statuses[n].state.done and statuses[n].state != ModuleState.final for n in below if n in statuses):
                self.deferred.remove(name)
                dead.append(name)
        return dead


@contextlib.contextmanager
def launched(cfg: RunConfig, store_uri: str, run_id: str, names: list[str], *,
             generation: dict[str, int] | None = None, address: str | None = None):
    """Connect to (or start) Ray and create the module actors of ``names``; on leaving, end them (and the
    placement group). The driver enters this while its child process still plans and ingests (``driver.run``),
    so Ray's start and the actors' imports overlap that work; the actors touch the store only when told to
    train (``train_modules``), so a refused run still leaves the store as it was."""
    import ray

    generation = generation or {}
    started_here = ensure_ray(address, cfg)
    gpus = resolve_gpus(cfg, ray.cluster_resources().get("GPU", 0))
    _note_cpu_fallback(cfg, gpus, started_here)
    pg = _reserve(cfg, run_id, names, gpus) if cfg.resources.placement == "pack" else None
    stack = list(cfg.stack)
    # deferred: a module whose upstream is in this launch, when the modules share this machine's cores
    deferred = [n for n in names[1:] if stack[stack.index(n) - 1] in names] \
        if started_here and shares_cores(cfg, gpus) else []
    launch = Launch(names=list(names), actors={}, deferred=deferred)
    actor_cls, config = ray.remote(ModuleTrainer), cfg.model_dump(mode="json")

    made: dict[str, int] = {}

    def create(name: str) -> None:
        gen, made[name] = generation.get(name, 0), made.get(name, 0) + 1
        opts = _actor_options(cfg, run_id, name, gpus, gen, pg=pg, bundle=names.index(name))
        if made[name] > 1:  # again after a park: the ended actor's name may not be free yet
            opts["name"] += f"/{made[name]}"
        launch.actors[name] = actor_cls.options(**opts).remote(
            store_uri, run_id, name, config, generation=gen, threads=cfg.resources.cpus_per_module, use_gpu=gpus > 0)

    launch.create = create
    try:
        for name in names:
            if name not in deferred:
                create(name)
        yield launch
    finally:
        for actor in launch.actors.values():
            ray.kill(actor, no_restart=True)
        if pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(pg)  # also ends any actor still in it


def train_modules(cfg: RunConfig, store_uri: str, run_id: str, names: list[str], *, generation: dict[str, int] | None = None,
                  address: str | None = None, progress: bool = True, launch: Launch | None = None) -> dict[str, ModuleStatus]:
    """Train ``names`` (in stack order) on Ray actors until each is final, failed or stopped: the actors of
    ``launch`` (created ahead by ``launched`` for the same modules), or new ones."""
    import ray

    if launch is None:
        with launched(cfg, store_uri, run_id, names, generation=generation, address=address) as launch:
            return train_modules(cfg, store_uri, run_id, names, progress=progress, launch=launch)
    if launch.names != list(names):
        raise ValueError(f"the launched actors are for {launch.names}, not {names}")
    actors = launch.actors
    sequential = cfg.schedule.mode == "sequential"
    # Sequential mode: every module after the first sets up as soon as its actor exists (model build, resume), so
    # that mode does not pay it between modules; only now, as setup() reads the run from the store, which a refused
    # run never wrote.
    setups = {name: actors[name].setup.remote() for name in names[1:] if name in actors} if sequential else {}
    statuses: dict[str, ModuleStatus] = {n: ModuleStatus(module=n) for n in names}
    runs = {}
    view = Progress(names, progress)
    pending = list(names) if sequential else []
    for name in names if not pending else [pending.pop(0)]:
        if name in actors:  # async: the deferred ones start when created (Launch.create_due)
            runs[name] = actors[name].run.remote()
    try:
        while runs or launch.deferred:
            if not runs:  # only deferred modules left, waiting for their upstream's next version
                time.sleep(1.0)
            ready, _ = ray.wait(list(runs.values()), num_returns=1, timeout=1.0) if runs else ([], [])
            for ref in ready:
                name = next(n for n, r in runs.items() if r == ref)
                del runs[name]
                statuses[name] = _ended(name, ref, actors[name], statuses[name])
                if not statuses[name].state.done:  # parked as it waited: created again when its upstream commits
                    st = statuses[name]
                    launch.park(name, st.upstream_version or 0, final_only=not reader_may_use(
                        st.epoch, st.target_epochs or 0, cfg.schedule.settle_epochs))
                    continue
                if pending and statuses[name].state == ModuleState.final:
                    nxt = pending.pop(0)
                    if nxt not in actors:
                        launch.deferred.remove(nxt)
                        launch.create(nxt)
                    if nxt in setups:
                        ray.wait([setups[nxt]], timeout=None)  # never two setup() calls at once in one actor
                    runs[nxt] = actors[nxt].run.remote()
            _poll_statuses(actors, runs, statuses)
            for name in launch.create_due(statuses):
                if sequential:
                    setups[name] = actors[name].setup.remote()
                else:
                    runs[name] = actors[name].run.remote()
            _stop_decided(names, statuses, runs, pending, launch)
            view.update(statuses)
    finally:
        view.close(statuses)
        for actor in actors.values():  # done, failed or interrupted: none of them trains on (the caller gc's)
            ray.kill(actor, no_restart=True)
    return statuses


def _ended(name: str, ref, actor, status: ModuleStatus) -> ModuleStatus:
    """The status a finished ``run()`` returned (its error as a failed status), and the actor ended: its final
    version is committed, so its model, optimizer and buffers are freed for the modules still training (an idle
    actor kept ~5 GiB of the stl10-gim recipe in sequential mode)."""
    import ray

    try:
        status = ModuleStatus.model_validate(ray.get(ref))
    except Exception as exc:  # noqa: BLE001 - the actor's error becomes its status
        status = status.model_copy(update={"state": ModuleState.failed, "error": _cause(exc)})
    ray.kill(actor, no_restart=True)
    return status


def _stop_decided(names: list[str], statuses: dict[str, ModuleStatus], runs: dict, pending: list[str],
                  launch: Launch) -> None:
    """Stop the modules ``decide`` gives up on, and the deferred ones a module below them left without a final
    version (never created); in place."""
    import ray

    for d in decide(names, statuses):
        if d.module in runs:
            ray.kill(launch.actors[d.module], no_restart=True)
            del runs[d.module]
        statuses[d.module] = statuses[d.module].model_copy(update={"state": ModuleState.stopped, "error": d.reason})
        if d.module in pending:
            pending.remove(d.module)
        if d.module in launch.deferred:
            launch.deferred.remove(d.module)
    for name in launch.deferred_dead(statuses):  # below it stopped, not failed (decide): it never starts
        if name in pending:
            pending.remove(name)
        if not statuses[name].state.done:
            statuses[name] = statuses[name].model_copy(update={
                "state": ModuleState.stopped, "error": "a module below it ended without a final version"})


def _note_cpu_fallback(cfg: RunConfig, gpus: float, started_here: bool) -> None:
    if not started_here and gpus == 0 and cfg.resources.gpus_per_module == "auto":
        # An autoscaling cluster shows no GPU until a GPU worker is up: 'auto' would then train on CPUs.
        print("note: resources.gpus_per_module=auto found no GPU in the cluster, so modules train on CPU; "
              "set resources.gpus_per_module=1 to wait for GPU workers (an autoscaler starts them on demand)",
              file=sys.stderr, flush=True)


def shares_cores(cfg: RunConfig, gpus: float) -> bool:
    """Whether the module actors of ``cfg`` share this machine's cores: on CPU, more threads than its cores (the
    condition of ``workers.runtime.CoreTurns.for_module``, which imports torch)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return gpus == 0 and cfg.resources.cpus_per_module * len(cfg.stack) > cores


def _poll_statuses(actors: dict, runs: dict, statuses: dict[str, ModuleStatus]) -> None:
    import ray

    for name, actor in actors.items():
        if name in runs:
            try:
                statuses[name] = ModuleStatus.model_validate(ray.get(actor.status.remote(), timeout=5))
            except Exception:  # noqa: BLE001 - a restarting actor answers later
                pass


def _cause(exc: Exception) -> str:
    """The user-facing message inside a RayTaskError / ActorDiedError."""
    inner = getattr(exc, "cause", None)
    if isinstance(inner, Exception) and hasattr(inner, "message"):
        return inner.message
    if isinstance(exc, TrainingError):
        return exc.message
    text = str(exc)
    return text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
