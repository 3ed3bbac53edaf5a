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

import math
from typing import Protocol, runtime_checkable

import torch

from pipeline.errors import ConfigError
from pipeline.nn.modules import shape_text
from pipeline.nn.objectives.aet import AETObjective
from pipeline.nn.objectives.autoencoder import MLP_DECODER_MAX_PARAMS, AutoencoderObjective, decoder_kind, mlp_decoder_params
from pipeline.nn.objectives.cpc import CPCARObjective
from pipeline.nn.objectives.dim import DIMObjective
from pipeline.nn.objectives.infonce import InfoNCEGridObjective, InfoNCEPairObjective
from pipeline.nn.objectives.moco import MoCoObjective
from pipeline.nn.objectives.sfa import SFAObjective
from pipeline.nn.objectives.supervised import SupervisedObjective
from pipeline.nn.objectives.variational import VInfoNCEObjective
from schemas.config import AET, CPCAR, DIM, SFA, Autoencoder, InfoNCEGrid, InfoNCEPair, MoCo, SupervisedLocal, VInfoNCE

__all__ = ["LocalObjective", "build_objective", "objective_problems", "sequence_pairing_problem"]


@runtime_checkable
class LocalObjective(Protocol):
    """What the trainer calls. stats: extra scalars such as "accuracy" or "kl".

    Optional, looked up with getattr by the trainer (absent = False / nothing):

    - ``needs_input = True``: the call also gets keyword arguments ``x`` (the module's float input batch,
      (B, *in_shape)), ``x_pos`` (the positives' inputs or None) and ``module`` (the module being trained),
      for losses that reconstruct the input (autoencoder), transform it (aet) or encode it with another
      encoder (moco's key encoder).
    - ``after_step(module)``: called after every ``optimizer.step()`` (moco's momentum update).
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


def build_objective(cfg, out_shape: tuple[int, ...], num_classes: int | None, *,
                    in_shape: tuple[int, ...] | None = None, module: torch.nn.Module | None = None) -> torch.nn.Module:
    """The objective for a module whose per-sample output is ``out_shape``.

    out_shape: (D,), (C, T), (C, H, W) or (P, C, h, w). in_shape: the module's per-sample input shape
    (needed by autoencoder and aet); module: the module itself (moco copies it as its key encoder).
    Raises ConfigError (key paths relative to the module: ``objective.<field>``) when the objective
    cannot use that output.
    """
    out_shape = tuple(out_shape)
    if isinstance(cfg, (CPCAR, DIM, MoCo, Autoencoder, AET)):
        return _build_new(cfg, out_shape, in_shape, module)
    spatial = len(out_shape) >= 3
    width = out_shape[-3] if spatial else out_shape[0]  # channels after pooling
    pairing = getattr(cfg, "pairing", None)
    if pairing == "patch_grid" and not spatial and isinstance(cfg, (InfoNCEPair, SFA, VInfoNCE)):
        what = "a sequence" if len(out_shape) == 2 else "a vector"
        fix = "; use pairing 'temporal' on sequences" if len(out_shape) == 2 else ""
        raise ConfigError([("objective.pairing", f"'patch_grid' pairs positions of a feature map, but the module "
                                                 f"outputs {what} {out_shape}{fix}")])
    problem = sequence_pairing_problem(cfg, out_shape)
    if problem:
        raise ConfigError([problem])
    if isinstance(cfg, InfoNCEPair):
        return InfoNCEPairObjective(width, temperature=cfg.temperature, bilinear=cfg.bilinear,
                                    projection_dim=cfg.projection_dim, pairing=cfg.pairing)
    if isinstance(cfg, InfoNCEGrid) and len(out_shape) == 2:
        # A sequence (C, T): predict k steps ahead in time (problems above: pairing must be 'temporal', T >= 2).
        return InfoNCEGridObjective(width, out_shape[1], steps=cfg.steps, negatives=cfg.negatives, sequence=True)
    if isinstance(cfg, InfoNCEGrid):
        if not spatial:
            raise ConfigError([("objective.kind", f"'infonce_grid' needs a grid (patches or a feature map), "
                                                  f"but the module outputs {out_shape}")])
        if len(out_shape) == 4:
            rows = math.isqrt(out_shape[0])
            if rows * rows != out_shape[0]:
                raise ConfigError([("objective.kind", f"{out_shape[0]} patches do not form a square grid")])
        else:
            rows = out_shape[1]
        if rows < 3:
            raise ConfigError([("objective.steps", f"the grid has {rows} rows; predicting rows below needs at least 3")])
        # projection_dim is not used: W_k (C x C) is this loss's learned part, as in GIM.
        return InfoNCEGridObjective(width, rows, steps=cfg.steps, negatives=cfg.negatives)
    if isinstance(cfg, SFA):
        return SFAObjective(width, eps=cfg.eps, projection_dim=cfg.projection_dim, pairing=cfg.pairing)
    if isinstance(cfg, VInfoNCE):
        return VInfoNCEObjective(width, latent_dim=cfg.latent_dim, temperature=cfg.temperature,
                                 kl_weight=cfg.kl_weight, projection_dim=cfg.projection_dim, pairing=cfg.pairing)
    if isinstance(cfg, SupervisedLocal):
        if not num_classes:
            raise ConfigError([("objective.kind", "'supervised_local' needs class labels, which this dataset lacks")])
        return SupervisedObjective(width, num_classes, projection_dim=cfg.projection_dim)
    raise ConfigError([("objective.kind", f"unknown objective {getattr(cfg, 'kind', cfg)!r}")])


def objective_problems(cfg, *, index: int | None, in_shape: tuple[int, ...] | None, out_shape: tuple[int, ...],
                       batch_size: int | None = None) -> list[tuple[str, str]]:
    """What cpc_ar, dim, moco, autoencoder and aet need of a module, as (``objective.<field>``, message) pairs.

    index: the module's position (0 = first; None = unknown, skips first-module checks); in_shape: its input
    shape (None = unknown). The plan prefixes the key paths with ``stack.<m>.``; build_objective raises them.
    """
    out_shape, kind = tuple(out_shape), cfg.kind
    out: list[tuple[str, str]] = []
    shape = shape_text(out_shape)
    if kind == "cpc_ar":
        if len(out_shape) not in (2, 3, 4):
            out.append(("objective.kind", f"'cpc_ar' predicts later steps of a sequence (C, T), a feature map or a "
                                          f"patch grid, but the module outputs a vector {shape}; remove the "
                                          "global_pool/flatten/linear layers or put cpc_ar on a lower module"))
        else:
            steps = _cpc_steps(out_shape)
            if steps < 2:
                out.append(("objective.kind", f"'cpc_ar' needs at least 2 steps to predict ahead, but the module's "
                                              f"output {shape} has {steps}; pool less or use a larger input"))
        if cfg.bptt_steps is not None and cfg.context != "gru":
            out.append(("objective.bptt_steps", "truncated backprop through time applies to the 'gru' context only; "
                                                "remove bptt_steps or set objective.context: gru"))
    elif kind == "dim":
        if len(out_shape) not in (2, 3, 4):
            out.append(("objective.kind", f"'dim' contrasts local features with a global vector, but the module "
                                          f"outputs a vector {shape} with no locations; remove the "
                                          "global_pool/flatten/linear layers or use another objective on this module"))
        if batch_size is not None and batch_size < 2:
            out.append(("train.batch_size", "'dim' contrasts the images of a batch; use at least 2"))
    elif kind == "moco":
        if cfg.pairing == "patch_grid":
            out.append(("objective.pairing", "'moco' encodes a second view of each sample with its key encoder, so it "
                                             "needs sample pairs: use same_instance, neighbor_pose or augment "
                                             "(first module), not patch_grid"))
    elif kind == "autoencoder" and in_shape is not None:
        if decoder_kind(tuple(in_shape), out_shape) == "mlp":
            params = mlp_decoder_params(tuple(in_shape), out_shape, cfg.hidden)
            if params > MLP_DECODER_MAX_PARAMS:
                out.append(("objective.hidden", f"the autoencoder's MLP decoder from {shape} back to the input "
                                                f"{tuple(in_shape)} would have {params:,} parameters (limit "
                                                f"{MLP_DECODER_MAX_PARAMS:,}); lower objective.hidden, or make the "
                                                "module output a feature map of the input's rank"))
    elif kind == "aet":
        if index is not None and index > 0:
            out.append(("objective.kind", f"'aet' transforms the input images, so only the first module (which "
                                          f"reads them) can use it, and this is module {index + 1}; put aet on the "
                                          "first module or choose another objective here"))
        elif in_shape is not None and len(in_shape) != 3:
            out.append(("objective.kind", f"'aet' transforms images (C, H, W), but the module's input is "
                                          f"{tuple(in_shape)}; use it on a module that reads images"))
        if len(out_shape) == 2:
            out.append(("objective.kind", f"'aet' compares (z(x), z(t(x))) as vectors or maps, but the module "
                                          f"outputs a sequence {shape}; use a map or vector output"))
    return out


def sequence_pairing_problem(cfg, out_shape: tuple[int, ...]) -> tuple[str, str] | None:
    """Whether a pairing fits the kind of output: ``temporal`` pairs time steps of a sequence (C, T), and
    infonce_grid on a sequence predicts steps ahead (pairing ``temporal``, T >= 2); ``patch_grid`` is for
    grids. Returns (``objective.<field>``, message) or None. Only for objectives that read the pairing."""
    out_shape, pairing = tuple(out_shape), getattr(cfg, "pairing", None)
    if cfg.kind not in ("infonce_pair", "infonce_grid", "sfa", "vinfonce"):
        return None
    shape = shape_text(out_shape)
    if pairing == "temporal" and len(out_shape) != 2:
        what = "a vector" if len(out_shape) == 1 else "a feature map or patch grid"
        fix = "'patch_grid' (positions of the map)" if len(out_shape) >= 3 else "same_instance or neighbor_pose"
        return ("objective.pairing", f"'temporal' pairs time steps of a sequence (C, T), but the module outputs "
                                     f"{what} {shape}; use {fix}, or give the module a sequence output")
    if cfg.kind == "infonce_grid" and len(out_shape) == 2:
        if pairing != "temporal":
            return ("objective.pairing", f"'infonce_grid' on a sequence {shape} predicts steps ahead in time, but its "
                                         f"pairing is {pairing!r} (rows of a 2-D grid); set objective.pairing: temporal")
        if out_shape[1] < 2:
            return ("objective.steps", f"the sequence {shape} has {out_shape[1]} step; predicting steps ahead needs "
                                       "at least 2 (use a longer dataset.length or smaller strides)")
    return None


def _cpc_steps(out_shape: tuple[int, ...]) -> int:
    """Steps along which cpc_ar predicts: T of (C, T), rows of (C, H, W), grid rows of (P, C, h, w)."""
    if len(out_shape) == 4:
        return math.isqrt(out_shape[0])
    return out_shape[1]


def _build_new(cfg, out_shape: tuple[int, ...], in_shape, module) -> torch.nn.Module:
    problems = objective_problems(cfg, index=None, in_shape=in_shape, out_shape=out_shape)
    if problems:
        raise ConfigError(problems)
    width = out_shape[0] if len(out_shape) in (1, 2) else out_shape[-3]  # channels of a sequence, map or patch
    if isinstance(cfg, CPCAR):
        if len(out_shape) == 4 and math.isqrt(out_shape[0]) ** 2 != out_shape[0]:
            raise ConfigError([("objective.kind", f"{out_shape[0]} patches do not form a square grid; "
                                                  "use square images and patches")])
        return CPCARObjective(width, _cpc_steps(out_shape), context=cfg.context, context_dim=cfg.context_dim,
                              steps=cfg.steps, negatives=cfg.negatives, bptt_steps=cfg.bptt_steps, kernel=cfg.kernel)
    if isinstance(cfg, DIM):
        return DIMObjective(width, estimator=cfg.estimator, projection_dim=cfg.projection_dim,
                            max_locations=cfg.max_locations)
    if isinstance(cfg, MoCo):
        if module is None:
            raise ConfigError([("objective.kind", "'moco' copies the module as its key encoder, but no module was "
                                                  "given; call build_objective(..., module=module)")])
        return MoCoObjective(module, width, temperature=cfg.temperature, momentum=cfg.momentum,
                             queue_size=cfg.queue_size, projection_dim=cfg.projection_dim)
    if in_shape is None:
        raise ConfigError([("objective.kind", f"{cfg.kind!r} needs the module's input shape; "
                                              "call build_objective(..., in_shape=in_shape)")])
    if isinstance(cfg, Autoencoder):
        return AutoencoderObjective(tuple(in_shape), out_shape, hidden=cfg.hidden)
    return AETObjective(out_shape, rotation=cfg.rotation, translation=cfg.translation, scale=cfg.scale,
                        shear=cfg.shear, hidden=cfg.hidden)
