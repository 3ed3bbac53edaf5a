"""The driver's torch-heavy work, run in other processes: each module in its Ray actor, the steps before and
after training in a child process on this machine.

The driver watches the actors for the whole training, so its memory should be a Ray driver's (~0.1 GiB PSS),
not a trainer's: importing torch alone costs ~0.5 GiB of RSS that a process never gives back. The driver
imports this module and never the torch-importing code itself. Each function here imports our own code
inside itself, so that the import runs in the process doing the work; for that this file is exempt,
like the CLI, from tests/test_layout.py's "imports at the top" rule (the one-way order still applies).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import sys

from pipeline.errors import RunError


class ModuleTrainer:
    """The Ray actor of one module: ``workers.trainer.ModuleTrainer``, built in the actor's own process.

    Named like the class it wraps, so the actor's process is still titled ``ray::ModuleTrainer`` (the
    benchmarks find the module actors by that title). The scheduler calls these three methods. The
    constructor does the imports (torch, and torch._dynamo, which the optimizer's constructor would import
    in ``setup``): the driver creates its actors while its child process still plans and ingests.
    """

    def __init__(self, *args, **kwargs) -> None:
        import torch._dynamo  # noqa: F401 - torch.optim's constructors import it (2-4 s): at creation, not in setup()
        from workers.trainer import ModuleTrainer as Trainer  # runs in the actor, never in the driver

        self._trainer = Trainer(*args, **kwargs)

    def setup(self) -> dict:
        return self._trainer.setup()

    def run(self) -> dict:
        return self._trainer.run()

    def status(self) -> dict:
        return self._trainer.status()


def in_child(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a fresh process on this machine: its result, or its exception raised here.

    The child is spawned (not forked: the driver may hold Ray's and the leases' threads) and exits when
    ``fn`` returns, taking torch's memory with it. As with any spawned process, the child imports the
    parent's ``__main__`` script, so a script calling the driver needs an ``if __name__ == "__main__":``
    guard. A process that has torch loaded already (a test, a benchmark, a notebook) has nothing to keep
    free of it, so there ``fn`` runs in place.
    """
    with started(fn, *args, **kwargs) as result:
        return result()


@contextlib.contextmanager
def started(fn, *args, **kwargs):
    """``in_child`` without waiting: starts ``fn`` in its child process and yields a function that waits for
    its result (or raises its exception), so the caller can work meanwhile. The child ends once it has
    answered (it holds torch's memory), or at the latest when the block is left. Where torch is loaded
    already, ``fn`` runs in place before the block."""
    if "torch" in sys.modules:
        value = fn(*args, **kwargs)
        yield lambda: value
        return
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        future = pool.submit(fn, *args, **kwargs)

        def result():
            try:
                return _result(future, fn)
            finally:
                pool.shutdown(wait=True)

        yield result


def _result(future: concurrent.futures.Future, fn):
    try:
        return future.result()
    except concurrent.futures.process.BrokenProcessPool:
        raise RunError(f"the child process running {fn.__module__}.{fn.__name__} died before it answered: "
                       "killed (the out-of-memory killer prints nothing here), or it could not start (its "
                       "traceback is printed above)",
                       "a script that calls the driver must guard its top level with `if __name__ == "
                       "'__main__':` (the child imports it); after a kill, free memory and run the command again "
                       "(`isostack resume RUN` continues a run whose modules have trained)") from None


# ---------------------------------------------------------------- what in_child runs


def prepare_run(cfg, run_id, address):
    """``pipeline.run.prepare.prepare_run``: plan, load, run.json, ingest -> (store, info, input manifest)."""
    from pipeline.run.prepare import prepare_run as prepare

    return prepare(cfg, run_id, address)


def check_plan(cfg, address) -> None:
    from pipeline.run.prepare import check_plan as check

    check(cfg, address)


def final_stage(store, info, cfg) -> dict:
    """``pipeline.run.final_stage.final_stage``: evaluate and export; returns the summary it wrote."""
    from pipeline.run.final_stage import final_stage as run_final_stage

    return run_final_stage(store, info, cfg)
