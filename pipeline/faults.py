"""Fault injection for the reliability tests: real failures at chosen points of real processes.

``ISOSTACK_FAULTS`` holds comma-separated ``point:stage[:epoch]`` items, e.g.
``nan_loss:m2:2,kill_before_manifest:m1``. With ``ISOSTACK_FAULTS_DIR`` set,
each item fires once per directory (a marker file records it), so an actor
that Ray restarts does not fail again. Unset, nothing here does anything.

Points: ``nan_loss`` (trainer step), ``kill_before_manifest`` (SIGKILL of the
writer after its shards, before its manifest), ``enospc_shard`` (disk full
while writing a shard), ``eacces_manifest`` (permission denied on the commit),
``slow_commit`` (a store that takes ``STALL_SECONDS`` to commit a version: an
upstream slow to publish, whatever the machine's speed).
"""

from __future__ import annotations

import errno
import os
import signal
import time

ENV, DIR_ENV = "ISOSTACK_FAULTS", "ISOSTACK_FAULTS_DIR"
STALL_SECONDS = 3.0


def armed(point: str, stage: str, epoch: int | None = None) -> bool:
    """True (once) when ``point`` is injected for ``stage`` (and ``epoch``, if the item names one)."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) < 2 or parts[0] != point or parts[1] != stage:
            continue
        if len(parts) > 2 and epoch is not None and int(parts[2]) != epoch:
            continue
        folder = os.environ.get(DIR_ENV)
        if folder:
            marker = os.path.join(folder, item.strip().replace(":", "_") + ".fired")
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return False
        return True
    return False


def environment() -> dict[str, str]:
    """The injection settings of this process, for the module actors it starts: on a cluster they run in
    processes of the nodes' raylets, which do not inherit the driver's environment."""
    return {k: os.environ[k] for k in (ENV, DIR_ENV) if k in os.environ}


def maybe_kill(point: str, stage: str) -> None:
    if armed(point, stage):
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_stall(point: str, stage: str) -> None:
    if armed(point, stage):
        time.sleep(STALL_SECONDS)


def maybe_raise(point: str, stage: str) -> None:
    if point == "enospc_shard" and armed(point, stage):
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
    if point == "eacces_manifest" and armed(point, stage):
        raise PermissionError(errno.EACCES, "Permission denied (injected)")
