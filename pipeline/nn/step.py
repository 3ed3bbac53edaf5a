"""One training step's loss and its backward, whole or micro-batched.

A module of the stack maps each sample on its own (no batch norm, no layer that mixes samples), so its
gradient over a batch can be taken in micro-batches without changing the loss, which still sees the whole
batch (its negatives, its pairs). The step runs the module once without autograd to get every output,
takes the loss and its gradient with respect to those outputs, and then runs the module again micro-batch
by micro-batch with autograd, back-propagating each micro-batch's slice of that gradient (the "gradient
cache" of Gao et al. 2021, arXiv:2101.06983). The gradients are the ones of the whole batch (up to float
summation order); a step costs one more forward, and holds one micro-batch's activations instead of the
whole batch's: the outputs and their gradient are the only batch-sized tensors left.
"""

from __future__ import annotations

from typing import Callable

import torch

from pipeline.nn.objectives import local_loss


def step_loss(objective: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor, x_pos: torch.Tensor | None,
              labels: torch.Tensor | None, groups: torch.Tensor | None, *,
              micro_batch: int | None) -> tuple[torch.Tensor, Callable[[], None]]:
    """(loss, backward): the step's loss and the call that back-propagates it into the module and the objective.

    x: (B, *in_shape), x_pos: (B, *in_shape) or None. ``micro_batch`` None, or not smaller than the module's
    forward batch (2B with pairs), or an objective that runs the module itself (``needs_input``: autoencoder,
    aet, moco): the plain step, ``loss.backward``. Otherwise the module runs ``micro_batch`` samples at a time.
    """
    inputs = torch.cat([x, x_pos]) if x_pos is not None else x
    if micro_batch is None or micro_batch >= len(inputs) or getattr(objective, "needs_input", False):
        loss, _ = local_loss(objective, module, x, x_pos, labels, groups)
        return loss, loss.backward
    parts = inputs.split(micro_batch)
    with torch.no_grad():
        outputs = torch.cat([module(p) for p in parts])  # (2B or B, *out_shape), no graph
    outputs.requires_grad_(True)
    z, z_pos = outputs.chunk(2) if x_pos is not None else (outputs, None)
    loss, _ = objective(z, z_pos, labels, groups=groups)
    # The loss's graph ends in the outputs (a leaf) and holds them and their gradient. Both lists are emptied by
    # backward, and the caller gets the loss detached: the outputs are not kept through the second pass, nor the
    # gradient after it (each as large as the batch's outputs: 0.4 GB on a stl10-gim m1 step of 32).
    held, graph = [outputs], [loss]
    del outputs, z, z_pos

    def backward() -> None:
        graph.pop().backward()  # the objective's own parameters, and d loss / d outputs; the graph goes with it
        grad = held.pop().grad
        for part, g in zip(parts, grad.split(micro_batch)):
            module(part).backward(g)  # this micro-batch's activations live only through this line

    return loss.detach(), backward
