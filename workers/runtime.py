"""Where a worker runs: its node, its device in words, its peak memory (for status and summary.json), and
how module actors that share a node's cores take turns on them (``CoreTurns``)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import resource
import socket
import tempfile
import threading
import time
from collections.abc import Callable

import torch

from pipeline.feed.heap import release_free_memory

YIELD_SECONDS = 0.02  # after a long turn, time for a waiting actor to take the cores (a blocked flock wakes in <1 ms)
LONG_TURN = 0.05  # turns shorter than this do not yield (tiny test modules step thousands of times)
HOLD_SECONDS = 20.0  # a holder keeps the node's turn across consecutive steps this long before it yields
IDLE_SECONDS = 0.5  # a kept turn that no step takes up again within this is handed back (its actor went idle)
SERIES_SECONDS = 5.0  # a series of short turns (publishing chunks) keeps the cores at least this long
STALE_SECONDS = 3600.0  # turn files nobody holds and nobody made for this long are a dead run's: removed
TURNS_PREFIX = "isostack-turns-"


def device_text(device: torch.device) -> str:
    if device.type != "cuda":
        return str(device)
    # Ray narrows CUDA_VISIBLE_DEVICES to the GPU(s) it assigned: cuda:0 here is the node's GPU <ray id>.
    import ray

    ids = ",".join(str(i) for i in ray.get_gpu_ids()) if ray.is_initialized() else "-"
    return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()}, Ray GPU {ids})"


def peak_memory(device: torch.device) -> int:
    """Peak bytes: the GPU's allocations on CUDA, else this process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def node_name() -> str:
    try:
        import ray

        if ray.is_initialized():
            return f"{socket.gethostname()}:{ray.get_runtime_context().get_node_id()[:8]}"
    except Exception:  # noqa: BLE001 - outside Ray the host name is enough
        pass
    return socket.gethostname()


def node_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class CoreTurns:
    """Compute turns (a training step, a publishing chunk) among the module actors of one run that share a
    node's cores: ``slots`` at a time (the node's cores over ``resources.cpus_per_module``), each a slot file.

    When ``resources.cpus_per_module`` x modules exceeds the node's cores (a laptop, this project's 2-core
    machine), concurrent actors only oversubscribe the cores (each with its own torch threads) and hold
    their activations at the same time: taking turns gives each step every thread it was given and keeps
    one step's activations alive on the node instead of one per module, at the same total work. The turn
    is an exclusive ``flock`` on a file in the node's temp directory named by the run, so it is node-local
    (actors on other nodes never wait for each other) and the kernel frees it when its holder dies. Each actor
    holds a shared lock on the run's ``.members`` file from its first turn to ``close``: the last one out
    removes the files, and the files of runs that died without closing are swept by the next run's actors
    (``sweep_stale_turns``), so runs leave nothing in the temp directory.

    A holder keeps the turn across its consecutive steps for ``hold`` seconds (what its C heap kept of the
    last step is reused by the next instead of faulted in again), then, when another actor waits, hands
    its freed heap back to the OS and yields briefly so that
    the waiter gets the next turn (flock is not FIFO): an actor waiting for its turn holds no dead step. A
    kept turn that no step takes up within ``idle`` seconds (the actor is waiting for its upstream,
    checkpointing, publishing its last chunk) is handed back by a timer.
    """

    def __init__(self, key: str, shared: bool, *, slots: int = 1, hold: float = HOLD_SECONDS,
                 idle: float = IDLE_SECONDS) -> None:
        self.shared, self.waited, self.hold, self.idle, self.slots = shared, 0.0, hold, idle, max(1, slots)
        self.path = os.path.join(tempfile.gettempdir(), TURNS_PREFIX + hashlib.sha1(key.encode()).hexdigest()[:16])
        self._members: int | None = None  # held shared while this actor may take turns (see close)
        self._fd: int | None = None  # the turn held: one slot's file, exclusive
        self._slots: list[int] = []
        self._queue: int | None = None  # shared by the actors waiting for a turn, so a holder knows to yield
        self._depth = 0
        self._held_since: float | None = None  # when this actor took the node's turn, while it holds it
        self._keep = hold  # seconds the turn is kept across consecutive turns (longer inside series())
        self._state = threading.Lock()  # the turn's state, shared with the idle timer's thread
        self._idle_timer: threading.Timer | None = None  # one at a time, re-armed while turns keep coming
        self._last_turn = 0.0  # when the last turn ended

    @classmethod
    def for_module(cls, cfg, key: str, device: torch.device) -> "CoreTurns":
        """Turns for a module actor of ``cfg``: shared when its modules' threads exceed this node's cores on CPU,
        with as many at once as the cores hold actors of ``resources.cpus_per_module`` threads."""
        per = cfg.resources.cpus_per_module
        shared = device.type == "cpu" and per * len(cfg.stack) > node_cores()
        return cls(key, shared, slots=max(1, node_cores() // per))

    @contextlib.contextmanager
    def turn(self, on_wait: Callable[[], None] | None = None):
        """The node's turn for one step or chunk. ``on_wait`` is called once, before blocking, when another
        actor holds the turn (a trainer drops the rows it holds between steps: ``StreamingBatches.release``);
        the C heap's free pages are then handed back."""
        if not self.shared or self._depth:  # a turn inside a turn (a stream chunk after a step) is the same turn
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        with self._state:
            if self._held_since is None:
                self._acquire(on_wait)
            self._depth = 1  # under the lock: the idle timer, due now, must see the kept turn in use
        try:
            yield
        finally:
            with self._state:
                self._depth = 0
                if time.perf_counter() - self._held_since >= self._keep and self._others_waiting():
                    self._release()
                else:
                    self._arm_idle()

    @contextlib.contextmanager
    def series(self, seconds: float = SERIES_SECONDS):
        """Many short turns in a row (a publish's chunks): the node's turn is kept from one to the next for at
        least ``seconds``, so that short turns do not each wait behind another actor's whole turn."""
        self._keep = max(self.hold, seconds)
        try:
            yield
        finally:
            self._keep = self.hold

    def _files(self) -> list[str]:
        return [self.path + (f".{i}" if i else "") for i in range(self.slots)] + [self.path + ".queue"]

    def _open(self) -> None:
        with contextlib.suppress(OSError):  # housekeeping: never what stops a module from training
            sweep_stale_turns()
        while True:
            members = os.open(self.path + ".members", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(members, fcntl.LOCK_SH)
            if os.fstat(members).st_nlink:  # not removed by a last actor out between our open and our lock
                break
            os.close(members)
        self._members = members
        *slots, queue = (os.open(p, os.O_RDWR | os.O_CREAT, 0o600) for p in self._files())
        self._slots, self._queue = slots, queue

    def _acquire(self, on_wait: Callable[[], None] | None = None) -> None:
        if not self._slots:
            self._open()
        t0 = time.perf_counter()
        fcntl.flock(self._queue, fcntl.LOCK_SH)
        blocked = False
        while self._fd is None:  # the first free slot (flock cannot wait on any of several files)
            for fd in self._slots:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self._fd = fd
                    break
                except BlockingIOError:
                    continue
            else:
                if not blocked:  # first time round: about to wait for another actor's turn
                    blocked = True
                    if on_wait is not None:
                        on_wait()
                    release_free_memory()  # a waiting actor holds no freed heap (nor, after on_wait, its rows)
                if self.slots == 1:
                    fcntl.flock(self._slots[0], fcntl.LOCK_EX)
                    self._fd = self._slots[0]
                else:
                    time.sleep(0.002)
        fcntl.flock(self._queue, fcntl.LOCK_UN)
        self._held_since = time.perf_counter()
        self.waited += self._held_since - t0

    def _release(self) -> None:
        long = time.perf_counter() - self._held_since > LONG_TURN
        self._held_since = None
        if long:
            release_free_memory()  # before the next actor's turn allocates its own step
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._fd = None
        if long and self._others_waiting():
            time.sleep(YIELD_SECONDS)

    def _arm_idle(self, delay: float | None = None) -> None:
        """Watch for idleness after a turn: one timer thread at a time, not one per step (tiny steps come by
        the thousand); it re-arms itself while turns keep coming."""
        self._last_turn = time.perf_counter()
        if self._idle_timer is None:
            self._idle_timer = threading.Timer(self.idle if delay is None else delay, self._release_if_idle)
            self._idle_timer.daemon = True
            self._idle_timer.start()

    def _disarm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _release_if_idle(self) -> None:
        with self._state:
            self._idle_timer = None
            if self._held_since is None:
                return
            quiet = time.perf_counter() - self._last_turn
            if self._depth or quiet < self.idle:  # a turn is running or ended lately: look again later
                last = self._last_turn
                self._arm_idle(self.idle - quiet if not self._depth else self.idle)
                self._last_turn = last
                return
            self._release()

    def _others_waiting(self) -> bool:
        try:
            fcntl.flock(self._queue, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._queue, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        """Hand back the turn; the last actor of the run on this node (no other holds ``.members``) removes the
        turn's files. A later turn opens them again."""
        with self._state:
            self._disarm_idle()
            if self._held_since is not None:
                self._release()
            if self._members is not None:
                with contextlib.suppress(BlockingIOError):
                    fcntl.flock(self._members, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    _remove([*self._files(), self.path + ".members"])
            for fd in (*self._slots, self._queue, self._members):
                if fd is not None:
                    os.close(fd)
            self._slots, self._fd, self._queue, self._members = [], None, None, None

    def __getstate__(self) -> dict:  # the descriptors, lock and timer stay in their process
        return {**self.__dict__, "_fd": None, "_slots": [], "_queue": None, "_members": None, "_held_since": None,
                "_depth": 0,
                "_state": None,
                "_idle_timer": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _state=threading.Lock())


NO_TURNS = CoreTurns("", shared=False)


def sweep_stale_turns(directory: str | None = None, *, older_than: float = STALE_SECONDS) -> list[str]:
    """Remove the turn files of runs whose actors died without closing (killed, crashed): a run's files that
    are all older than ``older_than`` seconds and whose ``.members`` no live actor holds. Returns what went."""
    directory = directory or tempfile.gettempdir()
    runs: dict[str, list[str]] = {}
    with os.scandir(directory) as entries:
        for e in entries:
            if e.name.startswith(TURNS_PREFIX) and e.is_file(follow_symlinks=False):
                runs.setdefault(e.name[:len(TURNS_PREFIX) + 16], []).append(e.path)
    gone, now = [], time.time()
    for prefix, paths in runs.items():
        with contextlib.suppress(OSError):
            if any(now - os.stat(p).st_mtime < older_than for p in paths):
                continue
            members = os.path.join(directory, prefix + ".members")
            fd = os.open(members, os.O_RDWR) if members in paths else None
            try:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: an actor holds it
                gone += _remove(sorted(paths, key=lambda p: p == members))
            finally:
                if fd is not None:
                    os.close(fd)
    return gone


def _remove(paths: list[str]) -> list[str]:
    gone = []
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
            gone.append(p)
    return gone
