"""A module's loss on held-out samples, after each epoch.

The objective is evaluated without training (no gradients, eval mode: MoCo does not enqueue, a
variational module scores its mean) on one batch of the upstream's *test* split, paired the way
training pairs. The dataset always has a test split, so the first module records it every epoch; an
intermediate version is train-only (``workers.publisher``), so a module above records it on the
epochs it trains on its upstream's final version. One batch a epoch keeps the cost small next to the
epoch (a forward of ``batch_size`` samples, about a third of one training step).
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.feed import Source, StreamingBatches, plan_epoch
from pipeline.nn.objectives import local_loss
from pipeline.nn.pairing import loss_inputs
from schemas.objectives import Objective

HELDOUT_BATCHES = 1


def heldout_loss(src: Source, module: torch.nn.Module, objective: torch.nn.Module, *, pairing: str | None,
                 batch_size: int, buffer: int, device: torch.device, seed: list[int],
                 spec: Objective | None = None) -> float | None:
    """Mean loss over ``HELDOUT_BATCHES`` batches of ``src``'s test rows, or None when it has fewer than two
    (an intermediate version) or the loss is not finite. ``seed`` fixes the rows and partners drawn; it is
    separate from the training order's generator, and torch's global one is left as it was, so training is the
    same with or without this. ``spec``: the module's objective section (its views: ``loss_inputs``)."""
    rows = np.flatnonzero(src.split == "test")
    if len(rows) < 2:
        return None
    rng = np.random.default_rng(seed)
    plan = plan_epoch(src.pairing_meta(), rows, src.unit, pairing=pairing,
                      batch_size=min(batch_size, len(rows)), buffer=max(buffer, batch_size), rng=rng,
                      max_steps=HELDOUT_BATCHES)
    gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31)))
    modes = module.training, objective.training
    module.eval(), objective.eval()
    losses = []
    # Objectives that sample (infonce_grid's negatives, a VAE's noise) draw from torch's global generator: forked,
    # so that the training steps after this draw what they would without it.
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for batch in StreamingBatches(src, plan, device=device, pairing=pairing, readahead=0):
                losses.append(float(batch_loss(objective, module, batch, pairing, gen, spec)))
    finally:
        module.train(modes[0]), objective.train(modes[1])
    mean = float(np.mean(losses)) if losses else float("nan")
    return mean if np.isfinite(mean) else None


def batch_loss(objective: torch.nn.Module, module: torch.nn.Module, batch, pairing: str | None,
               gen: torch.Generator, spec: Objective | None = None) -> torch.Tensor:
    """The objective on one batch of float32 features (viewed first where ``spec`` says: ``loss_inputs``)."""
    x, x_pos = loss_inputs(batch.x, batch.x_pos, gen, pairing, spec)
    return local_loss(objective, module, x, x_pos, batch.labels, batch.groups)[0]
