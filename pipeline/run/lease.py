"""Leases: one owner at a time per module for `retrain` (owner + expiry, so a crashed owner does not lock forever)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid

from pipeline.errors import LeaseError
from pipeline.store import Store

TTL_SECONDS = 60.0


def _owner() -> str:
    return f"{socket.gethostname()}:pid{os.getpid()}:{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def module_lease(store: Store, module: str, ttl: float = TTL_SECONDS):
    """Hold ``leases/<module>.json`` while the block runs; renewed in the background."""
    path = f"leases/{module}.json"
    held = store.read_json(path)
    if held and held.get("expires", 0) > time.time():
        raise LeaseError(f"module {module} is being retrained by {held['owner']} (lease {store.root_uri}/{path} "
                         f"expires in {held['expires'] - time.time():.0f} s)",
                         "wait for that retrain to finish; if its owner died, the lease lapses by itself after expiry")
    me = _owner()
    store.write_json(path, {"owner": me, "expires": time.time() + ttl})
    time.sleep(0.05)
    if (store.read_json(path) or {}).get("owner") != me:  # lost a race with another writer
        other = (store.read_json(path) or {}).get("owner")
        raise LeaseError(f"module {module} is being retrained by {other}", "wait for that retrain to finish")
    stop = threading.Event()

    def renew():
        while not stop.wait(ttl / 3):
            store.write_json(path, {"owner": me, "expires": time.time() + ttl})

    thread = threading.Thread(target=renew, daemon=True)
    thread.start()
    try:
        yield me
    finally:
        stop.set()
        thread.join(timeout=1)
        if (store.read_json(path) or {}).get("owner") == me:
            store.delete(path)
