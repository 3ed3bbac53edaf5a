"""One training step's loss and its backward, whole or micro-batched.

A module of the stack maps each sample on its own (no batch norm, no layer that mixes samples), so its
gradient over a batch can be taken in micro-batches without changing the loss, which still sees the whole
batch (its negatives, its pairs). The step runs the module once without autograd to get every output,
takes the loss and its gradient with respect to those outputs, and then runs the module again micro-batch
by micro-batch with autograd, back-propagating each micro-batch's slice of that gradient (the "gradient
cache" of Gao et al. 2021, arXiv:2101.06983). The last micro-batch runs with autograd in the first pass
already and keeps its graph through the loss, so it is not run again: a step costs one more forward of all
but one micro-batch, and holds one micro-batch's activations instead of the whole batch's; the outputs and
their gradient are the only batch-sized tensors left. The gradients are the ones of the whole batch (up to
float summation order).

An objective whose loss is a mean over samples, each scored against negatives drawn at random from the batch
(``per_sample_negatives``: GIM's grid loss), is instead taken micro-batch by micro-batch, each micro-batch
drawing its negatives within itself and weighted by its share of the batch: one forward per sample, no second
pass. That is the loss the official GIM code computes on several GPUs, where ``nn.DataParallel`` runs each
replica's loss on its own shard of the batch (Löwe et al.'s ``InfoNCE_Loss`` inside the model's forward).
"""

from __future__ import annotations

from typing import Callable

import torch

from pipeline.nn.objectives import local_loss


def micro_batched(objective: torch.nn.Module, x: torch.Tensor, x_pos: torch.Tensor | None,
                  micro_batch: int | None) -> bool:
    """Whether ``step_loss`` runs the module a micro-batch at a time on these inputs."""
    forward = len(x) * (2 if x_pos is not None else 1)
    return micro_batch is not None and micro_batch < forward and not getattr(objective, "needs_input", False)


def step_loss(objective: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor, x_pos: torch.Tensor | None,
              labels: torch.Tensor | None, groups: torch.Tensor | None, *,
              micro_batch: int | None, prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
              ) -> tuple[torch.Tensor, Callable[[], None]]:
    """(loss, backward): the step's loss and the call that back-propagates it into the module and the objective.

    x: (B, *in_shape), x_pos: (B, *in_shape) or None. ``micro_batch`` None, or not smaller than the module's
    forward batch (2B with pairs), or an objective that runs the module itself (``needs_input``: autoencoder,
    aet, moco): the plain step, ``loss.backward``. Otherwise the module runs ``micro_batch`` samples at a time:
    by parts for a ``per_sample_negatives`` objective without pairs (``_by_parts``), else through the gradient cache.
    ``prepare``: what makes stored inputs (``x``, ``x_pos`` as stored) the module's float32 inputs, applied to each
    micro-batch as it runs, so that the batch is held as stored (float16: half the bytes) through the step.
    """
    prepare = prepare or (lambda t: t)
    if not micro_batched(objective, x, x_pos, micro_batch):
        loss, _ = local_loss(objective, module, prepare(x), prepare(x_pos) if x_pos is not None else None, labels, groups)
        return loss, loss.backward
    if getattr(objective, "per_sample_negatives", False) and x_pos is None:
        return _by_parts(objective, module, x, labels, groups, micro_batch, prepare)
    parts = (torch.cat([x, x_pos]) if x_pos is not None else x).split(micro_batch)  # the plain step copies nothing
    with torch.no_grad():
        head = [module(prepare(p)) for p in parts[:-1]]  # no graph: run again in ``backward``
    last = module(prepare(parts[-1]))  # its graph kept through the loss: one micro-batch's activations
    outputs = torch.cat(head + [last.detach()])  # (2B or B, *out_shape), a leaf
    del head
    outputs.requires_grad_(True)
    z, z_pos = outputs.chunk(2) if x_pos is not None else (outputs, None)
    loss, _ = objective(z, z_pos, labels, groups=groups)
    # The loss's graph ends in the outputs (a leaf) and holds them. The lists are emptied by backward, and the
    # caller gets the loss detached: the outputs (0.4 GB on a stl10-gim m1 step of 32) are not kept through the
    # second pass.
    held, graph, kept = [outputs], [loss], [last]
    del outputs, z, z_pos, last

    def backward() -> None:
        # d loss / d outputs as autograd makes it, not accumulated into ``outputs.grad``, which would copy it
        # whole: a patch-pooling objective's is a broadcast view (``blocks.PatchMean``), no map-sized tensor.
        params = [p for p in (*objective.parameters(), *module.parameters()) if p.requires_grad]
        grads = torch.autograd.grad(graph.pop(), [held.pop(), *params], allow_unused=True)
        _accumulate(params, grads[1:])  # the objective's own parameters (any other the loss reaches)
        out_grads = grads[0].split(micro_batch)
        del grads
        kept.pop().backward(out_grads[-1])  # the last micro-batch's graph from the first pass, freed by this
        for part, g in zip(parts[:-1], out_grads[:-1]):
            module(prepare(part)).backward(g)  # this micro-batch's activations live only through this line

    return loss.detach(), backward


def _by_parts(objective: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor | None,
              groups: torch.Tensor | None, micro_batch: int, prepare: Callable[[torch.Tensor], torch.Tensor],
              ) -> tuple[torch.Tensor, Callable[[], None]]:
    """The step of a ``per_sample_negatives`` objective: each micro-batch's loss (negatives drawn within it) and
    its gradient, weighted by the micro-batch's share of the batch. The gradients are summed aside and handed to
    the parameters by ``backward``, so that the caller's ``zero_grad`` between the two keeps its meaning."""
    params = [p for p in (*objective.parameters(), *module.parameters()) if p.requires_grad]
    summed: list[torch.Tensor | None] = [None] * len(params)
    total = None
    n = len(x)
    for start in range(0, n, micro_batch):
        part = slice(start, start + micro_batch)
        share = len(x[part]) / n
        loss, _ = local_loss(objective, module, prepare(x[part]), None,
                             labels[part] if labels is not None else None, groups[part] if groups is not None else None)
        grads = torch.autograd.grad(loss * share, params, allow_unused=True)  # this micro-batch's graph freed here
        summed = [g if s is None else (s if g is None else s.add_(g)) for s, g in zip(summed, grads)]
        total = loss.detach().float() * share if total is None else total + loss.detach().float() * share
        del loss, grads

    def backward() -> None:
        _accumulate(params, summed)
        summed.clear()

    return total, backward


def _accumulate(params: list[torch.Tensor], grads) -> None:
    """Add each gradient into its parameter's ``.grad`` (None: the loss does not reach that parameter)."""
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad.add_(g)
