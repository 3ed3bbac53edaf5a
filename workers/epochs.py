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


def parks(*, shared: bool, mode: str, publish: str, epoch: int, upstream_final: bool, wait_seconds: float | None,
          park_seconds: float | None) -> bool:
    """Whether a module about to wait for its upstream ends its actor instead, to be created again by the driver
    when the upstream commits a version it can train on (``pipeline.run.scheduler.Launch``) and resume from the checkpoint of the
    epoch it ended: where the modules share one machine's cores (its wait is the upstream's turns on them), in
    async mode, once it has a checkpoint (an epoch trained) and its upstream is not final, and when the wait is
    expected to last ``schedule.park_seconds`` or more (``upstream_wait``), many times an actor's start (~10 s
    here). A waiting actor holds its process (~0.6 GiB with torch), its state and its heap: stl10-gim's m3 0.99
    GiB at the recipe's peak. Stream mode keeps its actors."""
    return park_seconds is not None and wait_seconds is not None and shared and mode == "async" \
        and publish != "stream" and epoch > 0 and not upstream_final and 0 < wait_seconds and park_seconds <= wait_seconds


def upstream_rows(data, train) -> tuple[int | None, int | None]:
    """Rows a full epoch of a module trains on and rows its final version covers, from the input's final manifest
    ``data``: its train split (fewer under the module's ``train.max_steps_per_epoch`` cap; ``train``: its train
    settings) and all its splits; (None, None) without the input."""
    if data is None:
        return None, None
    rows = data.splits.get("train")
    if rows and train.max_steps_per_epoch:
        rows = min(rows, train.max_steps_per_epoch * train.batch_size)
    return rows, data.rows


def upstream_wait(status: dict | None, *, final_only: bool, train_rows: int | None = None,
                  final_rows: int | None = None) -> float | None:
    """Seconds until the upstream commits what a waiting module needs, from the upstream's last status: its final
    version after its remaining epochs and its final publish (``final_only``; no epochs left: it is publishing it, 0),
    else its next version after one more epoch and a publish like its last. An epoch lasts its epochs' mean duration,
    or ``train_rows`` at its last epoch's rate where that is longer (an upstream's first epochs may train on a thin
    sample of the version below it); a publish lasts its last one's seconds, scaled to ``final_rows`` (every split)
    for the final version (``upstream_rows``). Measured cases: README Performance, "The expected wait before
    parking". None while it has no finished epoch to go by."""
    if not status or not status.get("epoch") or not status.get("train_seconds"):
        return None
    per_epoch = status["train_seconds"] / status["epoch"]
    rate = status.get("samples_per_second")
    if train_rows and rate:
        per_epoch = max(per_epoch, train_rows / rate)
    remaining = max(0, (status.get("target_epochs") or status["epoch"]) - status["epoch"]) if final_only else 1
    if not remaining:
        return 0.0
    publish, rows = status.get("publish_seconds"), status.get("publish_rows")
    if publish and final_only and final_rows and rows:
        publish *= final_rows / rows
    return remaining * per_epoch + (publish or 0.0)
