"""Leases: one owner at a time per module (owner + expiry, so a crashed owner does not lock forever).

On a local or mounted file system the lease record is written whole to a private file and hard-linked
into place (``link`` fails when the name exists): of two takers exactly one creates it, the other is
refused naming the owner, and no reader sees half a record. An expired lease is taken over through a
token named by the lapsed record's content (again an exclusive link), so of the takers that saw the same
lapsed lease only one replaces it. Object stores: pyarrow.fs has no conditional write, so there the lease is written, read
back and checked (two takers racing within that window can both believe they hold it): a known limitation
of leases on s3:// and gs:// roots.

``gc`` and the driver ask ``live_leases`` whether anyone is at work on a run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid

from pipeline.errors import LeaseError
from pipeline.store import Store

TTL_SECONDS = 60.0
_DIR = "leases"


def _owner() -> str:
    return f"{socket.gethostname()}:pid{os.getpid()}:{uuid.uuid4().hex[:6]}"


def held_live(held: dict) -> bool:
    """Whether a lease record still holds: unexpired, and, when its owner is a process on this machine, that
    process still exists (a driver killed with SIGKILL holds no lease, so `resume` need not wait out the TTL)."""
    if held.get("expires", 0) <= time.time():
        return False
    host, _, rest = str(held.get("owner", "")).partition(":pid")
    pid = rest.split(":", 1)[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _refuse(store: Store, module: str, held: dict) -> LeaseError:
    left = held.get("expires", 0) - time.time()
    return LeaseError(f"module {module} is being trained by {held.get('owner')} (lease {store.root_uri}/{_DIR}/{module}.json "
                      f"expires in {left:.0f} s unless renewed)",
                      "wait for that run or retrain to finish; if its owner died, the lease lapses by itself after expiry")


def _take_local(store: Store, module: str, record: dict) -> None:
    path = store.local_path(f"{_DIR}/{module}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # The record is written whole to a private file first and then hard-linked into place: link() fails when
    # the name exists, so taking is atomic and no reader ever sees a half-written lease.
    mine = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(mine, "w") as f:
        f.write(json.dumps(record))
        f.flush()
        os.fsync(f.fileno())
    try:
        _link_exclusive(store, module, path, mine)
    finally:
        os.remove(mine)


def _link_exclusive(store: Store, module: str, path: str, mine: str) -> None:
    for _ in range(3):
        try:
            os.link(mine, path)
            return
        except FileExistsError:
            pass
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            continue  # released meanwhile: race for the link again
        held = json.loads(text or "{}")
        if held_live(held):
            raise _refuse(store, module, held)
        # Lapsed. Of all takers that read this same lapsed record, the one that links a token named by the
        # record's content wins and alone replaces it; the token stays, so a slow taker that read the old
        # record later still finds it taken. (A zombie owner releasing its lapsed lease inside this window
        # could let one more taker in: the lease protects against crashed owners, not paused ones.)
        token = f"{path}.taken-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        try:
            os.link(mine, token)
        except FileExistsError:
            with open(token) as f:
                raise _refuse(store, module, json.loads(f.read() or "{}")) from None
        staged = f"{mine}.staged"
        os.link(mine, staged)
        os.replace(staged, path)
        return
    raise LeaseError(f"module {module}: the lease {path} kept changing hands", "retry in a few seconds")


def _take_object_store(store: Store, module: str, record: dict) -> None:
    rel = f"{_DIR}/{module}.json"
    held = store.read_json(rel)
    if held and held_live(held):
        raise _refuse(store, module, held)
    store.write_json(rel, record)
    time.sleep(0.05)
    back = store.read_json(rel) or {}
    if back.get("owner") != record["owner"]:
        raise _refuse(store, module, back)


@contextlib.contextmanager
def module_lease(store: Store, module: str, ttl: float = TTL_SECONDS):
    """Hold ``leases/<module>.json`` while the block runs; renewed in the background."""
    rel, me = f"{_DIR}/{module}.json", _owner()
    take = _take_local if store.local_path(rel) is not None else _take_object_store
    take(store, module, {"owner": me, "expires": time.time() + ttl})
    stop = threading.Event()

    def renew():
        while not stop.wait(ttl / 3):
            if (store.read_json(rel) or {}).get("owner") == me:
                store.write_json(rel, {"owner": me, "expires": time.time() + ttl})

    thread = threading.Thread(target=renew, daemon=True)
    thread.start()
    try:
        yield me
    finally:
        stop.set()
        thread.join(timeout=1)
        if (store.read_json(rel) or {}).get("owner") == me:
            store.delete(rel)


def live_leases(store: Store) -> dict[str, str]:
    """Module -> owner of every unexpired lease of the run (someone is training it now)."""
    out = {}
    for name in store.list_dir(_DIR):
        if not name.endswith(".json"):
            continue
        held = store.read_json(f"{_DIR}/{name}") or {}
        if held_live(held):
            out[name[:-len(".json")]] = str(held.get("owner"))
    return out


@contextlib.contextmanager
def module_leases(store: Store, modules: list[str], ttl: float = TTL_SECONDS):
    """Leases on several modules at once (all or none)."""
    with contextlib.ExitStack() as stack:
        for m in modules:
            stack.enter_context(module_lease(store, m, ttl))
        yield
