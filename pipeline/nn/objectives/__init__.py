"""Local objectives: one loss per module, built from its config and its output shape.

    obj = build_objective(cfg.objective, out_shape, num_classes, in_shape=in_shape, module=module)
    loss, stats = obj(z, z_pos, labels, groups=groups)  # z, z_pos: (B, *out_shape); labels: (B,) long or None
    # objectives with needs_input also get x=, x_pos= (the float input batches) and module=
    obj.after_step(module)                               # where defined, after optimizer.step()

An objective holds only the loss's learned parts (W_k, heads, projection,
classifier, decoders, a momentum key encoder and its queue); the trainer
optimises the trainable ones with the module, checkpoints the whole
state_dict (buffers included) and discards them after training. Pure torch:
no I/O, no Ray.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from pipeline.errors import ConfigError
from pipeline.nn.objectives import aet, autoencoder, cpc, dim, infonce, moco, sfa, supervised, variational
from pipeline.nn.objectives.base import ModuleFacts, ObjectiveSpec, Problems

__all__ = ["OBJECTIVES", "LocalObjective", "ModuleFacts", "build_objective", "local_loss", "objective_problems"]

# One entry per `objective.kind` of schemas/config.py: the file that owns the objective's checks and builder.
OBJECTIVES: dict[str, ObjectiveSpec] = {
    "infonce_pair": ObjectiveSpec(infonce.pair_problems, infonce.build_pair),
    "infonce_grid": ObjectiveSpec(infonce.grid_problems, infonce.build_grid),
    "sfa": ObjectiveSpec(sfa.problems, sfa.build),
    "vinfonce": ObjectiveSpec(variational.problems, variational.build),
    "supervised_local": ObjectiveSpec(supervised.problems, supervised.build),
    "cpc_ar": ObjectiveSpec(cpc.problems, cpc.build),
    "dim": ObjectiveSpec(dim.problems, dim.build),
    "moco": ObjectiveSpec(moco.problems, moco.build),
    "autoencoder": ObjectiveSpec(autoencoder.problems, autoencoder.build),
    "aet": ObjectiveSpec(aet.problems, aet.build),
}


@runtime_checkable
class LocalObjective(Protocol):
    """What the trainer calls. stats: extra scalars such as "accuracy" or "kl".

    Optional, looked up with getattr by the trainer (absent = False / nothing):

    - ``needs_input = True``: the call also gets keyword arguments ``x`` (the module's float input batch,
      (B, *in_shape)), ``x_pos`` (the positives' inputs or None) and ``module`` (the module being trained),
      for losses that reconstruct the input (autoencoder), transform it (aet) or encode it with another
      encoder (moco's key encoder).
    - ``after_step(module)``: called after every ``optimizer.step()`` (moco's momentum update).
    - ``per_sample_negatives = True``: the loss is a mean over the batch's samples whose negatives are drawn at
      random from the batch (GIM's grid loss), so a micro-batched step may take it micro-batch by micro-batch,
      each drawing its negatives within itself, as the official GIM code's replicas do under ``DataParallel``
      (``pipeline.nn.step``); losses that contrast every pair of the batch (infonce_pair) do not set it.
    """

    needs_pairs: bool  # the trainer must pass z_pos (the partner rows through the same module)
    needs_labels: bool  # the trainer must pass labels

    def __call__(
        self, z: torch.Tensor, z_pos: torch.Tensor | None, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, float]]: ...


def local_loss(objective: torch.nn.Module, module: torch.nn.Module, x: torch.Tensor, x_pos: torch.Tensor | None,
               labels: torch.Tensor | None = None, groups: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """One step's loss: the module on x: (B, *in_shape) and its partners x_pos (one forward of both), then its objective.

    Objectives with ``needs_input`` also get the inputs and the module (see ``LocalObjective``). The caller
    steps the optimizer and then calls the objective's ``after_step(module)`` where it has one.
    """
    if x_pos is not None:
        z, z_pos = module(torch.cat([x, x_pos])).chunk(2)
    else:
        z, z_pos = module(x), None
    extra = {"x": x, "x_pos": x_pos, "module": module} if getattr(objective, "needs_input", False) else {}
    return objective(z, z_pos, labels, groups=groups, **extra)


def objective_problems(cfg, facts: ModuleFacts) -> Problems:
    """What the objective needs of its module, as (``objective.<field>`` or ``train.<field>``, message) pairs.

    Key paths are relative to the module: the plan prefixes ``stack.<m>.``; build_objective raises them.
    """
    return OBJECTIVES[cfg.kind].problems(cfg, facts)


def build_objective(cfg, out_shape: tuple[int, ...], num_classes: int | None, *,
                    in_shape: tuple[int, ...] | None = None, module: torch.nn.Module | None = None) -> torch.nn.Module:
    """The objective for a module whose per-sample output is ``out_shape``.

    out_shape: (D,), (C, T), (C, H, W) or (P, C, h, w). in_shape: the module's per-sample input shape
    (needed by autoencoder and aet); module: the module itself (moco copies it as its key encoder).
    Raises ConfigError (key paths relative to the module: ``objective.<field>``) when the objective
    cannot use that output.
    """
    facts = ModuleFacts(tuple(out_shape), tuple(in_shape) if in_shape is not None else None,
                        num_classes=num_classes, module=module)
    problems = objective_problems(cfg, facts)
    if problems:
        raise ConfigError(problems)
    return OBJECTIVES[cfg.kind].build(cfg, facts)
