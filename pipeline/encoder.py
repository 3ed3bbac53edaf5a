"""The composed encoder: every module's final weights, stacked, as one ``nn.Module``.

``model/`` in a run holds ``weights.safetensors`` (keys ``<module>.<param>``)
and ``config.json`` (the run config, the modules used and their final
versions), which is all ``load_encoder`` needs to rebuild it anywhere.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from pipeline import checkpoint
from pipeline.errors import RunError
from pipeline.modules import build_module, pool_to_vector
from pipeline.plan import build_plan
from pipeline.store import Store
from schemas.config import RunConfig


class ComposedEncoder(nn.Module):
    """Images (B, C, H, W) or signals (B, C, T) -> top activations; ``embed`` pools them to (B, D)."""

    def __init__(self, cfg: RunConfig, names: list[str] | None = None) -> None:
        super().__init__()
        plan = build_plan(cfg, check_paths=False, local_cluster=False)
        self.names = names or plan.names
        self.input_shape = tuple(plan.input_shape)
        self.sample_rate = cfg.dataset.sample_rate  # for sequence inputs (C, T): what embed resamples WAV files to
        self.stages = nn.ModuleDict({n: build_module(cfg.stack[n], tuple(plan.module(n).in_shape)) for n in self.names})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0  # stored pixels are uint8; the modules saw [0, 1]
        for name in self.names:
            x = self.stages[name](x)
        return x

    @torch.inference_mode()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return pool_to_vector(self(x))


def compose_from_store(store: Store, cfg: RunConfig) -> tuple[ComposedEncoder, dict[str, int]]:
    """Build the encoder from each module's final version's producer checkpoint."""
    encoder = ComposedEncoder(cfg)
    versions = {}
    for name in encoder.names:
        final = store.final(name)
        if final is None:
            raise RunError(f"module {name} has no final version in {store.root_uri}",
                           "finish the run (`isostack resume RUN`) before exporting the encoder")
        tensors = checkpoint.load_tensors(store, final.producer["checkpoint"])
        encoder.stages[name].load_state_dict(checkpoint.module_weights(tensors))
        versions[name] = final.version
    return encoder.eval(), versions


def save_model(store: Store, cfg: RunConfig, encoder: ComposedEncoder, versions: dict[str, int]) -> list[str]:
    weights = {f"{n}.{k}": v.detach().cpu().contiguous() for n in encoder.names for k, v in encoder.stages[n].state_dict().items()}
    store.write_bytes("model/weights.safetensors", st_save(weights))
    store.write_json("model/config.json", {"config": cfg.model_dump(mode="json"), "modules": encoder.names,
                                           "final_versions": versions, "input_shape": list(encoder.input_shape)})
    return ["model/weights.safetensors", "model/config.json"]


def load_model(store: Store) -> ComposedEncoder:
    meta = store.read_json("model/config.json")
    data = store.read_bytes("model/weights.safetensors")
    if meta is None or data is None:
        raise RunError(f"no exported model in {store.root_uri}/model", "run `isostack export RUN` first")
    encoder = ComposedEncoder(RunConfig.model_validate(meta["config"]), meta["modules"])
    tensors = st_load(data)
    for name in encoder.names:
        prefix = f"{name}."
        encoder.stages[name].load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return encoder.eval()


def dumps(meta: dict) -> str:
    return json.dumps(meta, indent=2)
