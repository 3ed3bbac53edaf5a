"""Checkpoints: weights and optimizer state as safetensors, lineage as JSON.

``<dir>/<epoch:04d>.safetensors`` is written first and ``<epoch:04d>.json``
last: the JSON is the commit, so a checkpoint whose JSON is missing is
ignored by ``latest``, and a crash while saving costs one epoch at most.
"""

from __future__ import annotations

from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from pipeline.errors import IntegrityError
from pipeline.store import Store


def checkpoint_dir(module: str, generation: int = 0) -> str:
    """Where a module's checkpoints live; a retrain writes a new generation beside the old."""
    return f"checkpoints/{module}" if generation == 0 else f"checkpoints/{module}/retrain-{generation}"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for pid, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(store: Store, directory: str, epoch: int, module: torch.nn.Module, objective: torch.nn.Module,
         optimizer: torch.optim.Optimizer | None, lineage: dict[str, Any]) -> str:
    """Write one checkpoint; returns the relative path of its weights."""
    tensors = {f"module.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    tensors.update({f"objective.{k}": v.detach().cpu().contiguous() for k, v in objective.state_dict().items()})
    optim_meta = None
    if optimizer is not None:
        optim_tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
        tensors.update(optim_tensors)
    weights = f"{directory}/{epoch:04d}.safetensors"
    store.write_bytes(weights, st_save(tensors))
    store.write_json(f"{directory}/{epoch:04d}.json", {**lineage, "epoch": epoch, "weights": weights, "optimizer": optim_meta})
    return weights


def latest(store: Store, directory: str) -> dict | None:
    """Lineage JSON of the newest committed checkpoint in ``directory``, or None."""
    epochs = sorted(int(n[:-5]) for n in store.list_dir(directory) if n.endswith(".json") and n[:-5].isdigit())
    for epoch in reversed(epochs):
        info = store.read_json(f"{directory}/{epoch:04d}.json")
        if info is not None and store.exists(info["weights"]):
            return info
    return None


def resume_point(store: Store, directory: str) -> dict | None:
    """The checkpoint a restarted module resumes from: the newest epoch's end in ``directory``, or a mid-epoch one
    (``feed.checkpoint_every_steps``, in ``directory/mid``, numbered by step) taken inside the epoch after it."""
    last = latest(store, directory)
    mid = latest(store, f"{directory}/mid")
    if mid is not None and mid.get("epochs_done") == (last["epoch"] if last else 0) and \
            mid["step"] > (last["step"] if last else 0):
        return mid
    return last


def load_tensors(store: Store, weights: str) -> dict[str, torch.Tensor]:
    data = store.read_bytes(weights)
    if data is None:
        raise IntegrityError(f"checkpoint {store.root_uri}/{weights} is missing",
                             "resume from an earlier checkpoint or retrain the module")
    return st_load(data)


def restore(store: Store, info: dict, module: torch.nn.Module, objective: torch.nn.Module | None = None,
            optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a checkpoint's weights (and optionally the loss heads and optimizer) in place."""
    tensors = load_tensors(store, info["weights"])
    module.load_state_dict(module_weights(tensors))
    if objective is not None:
        objective.load_state_dict({k[len("objective."):]: v for k, v in tensors.items() if k.startswith("objective.")})
    if optimizer is not None and info.get("optimizer"):
        optimizer.load_state_dict(_unflatten_optimizer(tensors, info["optimizer"]))


def module_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}


def mark_parked(store: Store, directory: str, epoch: int) -> None:
    """Record that the module ended its actor on purpose after ``epoch`` (``workers.epochs.parks``)."""
    store.write_json(f"{directory}/parked.json", {"epoch": epoch})


def unpark(store: Store, directory: str, epoch: int) -> bool:
    """Whether resuming at ``epoch`` follows a park (not a crash: no restart counted); the mark is removed."""
    mark = store.read_json(f"{directory}/parked.json")
    if mark is None:
        return False
    store.delete(f"{directory}/parked.json")
    return mark.get("epoch") == epoch
