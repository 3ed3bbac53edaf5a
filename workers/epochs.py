"""The epoch budget: what a module trainer does next at an epoch boundary (pure; no Ray, no store).

``train.epochs`` is the whole budget of a module. Following new upstream
versions and the settle epochs on the upstream's final version both happen
within it, so a module trains exactly ``train.epochs`` epochs whatever the
timing, and its progress ``epoch/planned`` never passes the plan:

- the last ``min(settle_epochs, epochs)`` epochs are reserved for the final
  upstream: a module that reaches them while its upstream is not final waits;
- before that, the module trains on the newest upstream version; with
  ``track_upstream`` it spends at most one epoch on each non-final upstream
  version (it waits for the next one instead of training ahead on stale input);
- the final version is committed only with the upstream's final version
  loaded, so it is always built on it (the invariant), ``settle_epochs: 0``
  included.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Step(str, enum.Enum):
    train = "train"    # train one more epoch on the loaded upstream version
    wait = "wait"      # poll for a newer upstream version
    finish = "finish"  # commit the final version (on the loaded upstream, which is final)


@dataclass(frozen=True)
class Boundary:
    """What a module knows at an epoch boundary."""

    epoch: int                  # epochs completed
    budget: int                 # train.epochs (per module)
    settle: int                 # schedule.settle_epochs
    track: bool                 # schedule.track_upstream
    loaded: bool                # an upstream version (or stream window) is loaded and usable
    upstream_final: bool        # the loaded upstream version is its stage's final one
    trained_on_loaded: bool     # the last epoch already trained on this very upstream version


def next_step(b: Boundary) -> Step:
    """Train, wait or finish. Never trains past ``budget``; finishes only on a final upstream."""
    if not b.loaded:
        return Step.wait
    if b.upstream_final:
        return Step.train if b.epoch < b.budget else Step.finish
    reserved = min(b.settle, b.budget)
    if b.epoch >= b.budget - reserved:
        return Step.wait  # the remaining epochs belong to the final upstream (or, settle 0: the commit does)
    if b.track and b.trained_on_loaded:
        return Step.wait
    return Step.train


def publishes_after(epoch: int, budget: int, publish_every: int, upstream_final: bool, wanted: bool = True) -> bool:
    """Whether an intermediate version is committed after ``epoch``: every ``publish_every`` epochs (0: never, the
    final version only), but not after the last one on a final upstream (the final version follows at once), nor
    when no module above can train on it any more (``wanted`` false: see ``reader_may_use``)."""
    return wanted and publish_every > 0 and epoch % publish_every == 0 and not (epoch >= budget and upstream_final)


def reader_may_use(done: int, budget: int, settle: int) -> bool:
    """Whether a module that has trained ``done`` of its ``budget`` epochs may still train one on a non-final
    upstream version: its last ``settle`` epochs belong to the final one. A version published for a module
    that may not would be inference and bytes for nobody (the default run: m1's 7th, ~5 s of its 8 epochs)."""
    return done < budget - min(settle, budget)


def parks(*, shared: bool, mode: str, publish: str, epoch: int, upstream_final: bool, state_bytes: int,
          park_bytes: int | None) -> bool:
    """Whether a module about to wait for its upstream ends its actor instead, to be created again by the driver
    when the upstream begins to publish (``pipeline.run.scheduler.Launch``) and resume from the checkpoint of the
    epoch it ended: where the modules share one machine's cores (its wait is the upstream's turns, minutes, not
    an idle device), in async mode, once it has a checkpoint (an epoch trained) and its upstream is not final,
    and when its weights and optimizer state reach ``schedule.park_bytes`` (with the heap its steps left, what
    a waiting actor holds beyond a bare process: stl10-gim's m3 0.99 GiB against a bare actor's 0.58 at the
    recipe's peak; a small module's restart would cost more than it frees). Stream mode keeps its actors."""
    return park_bytes is not None and shared and mode == "async" and publish != "stream" and epoch > 0 \
        and not upstream_final and state_bytes >= park_bytes
