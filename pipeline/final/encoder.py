"""The composed encoder: every module's final weights, stacked, as one ``nn.Module``.

``model/`` in a run holds ``weights.safetensors`` (keys ``<module>.<param>``)
and ``config.json`` (the run config, the modules used and their final
versions), which is all ``load_encoder`` needs to rebuild it anywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from pipeline.data.audio import read_wav
from pipeline.errors import DataError, RunError
from pipeline.store import checkpoint
from pipeline.store.runs import open_run, run_config, warn_stale
from pipeline.nn.modules import build_module, pool_to_vector
from pipeline.planning.plan import build_plan
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


def load_encoder(run: str, store_uri: str | None = None) -> ComposedEncoder:
    """The composed encoder of a run as an ``nn.Module`` (eval mode); ``.embed(x)`` gives (B, D)."""
    store, info = open_run(run, store_uri)
    cfg = run_config(info)
    warn_stale(store, list(cfg.stack), "load_encoder")
    exported = store.read_json("model/config.json")
    current = {n: (store.final(n).version if store.final(n) else None) for n in cfg.stack}
    if exported is not None and exported.get("final_versions") == current:
        return load_model(store)
    # No export yet, or a module was retrained since: build from the current final checkpoints.
    return compose_from_store(store, cfg)[0]


def read_signals(path: str, shape: tuple[int, int], sample_rate: int) -> np.ndarray:
    """A .npy of signals (N, T) / (N, C, T) or a folder of .wav files -> float32 (N, C, T) of the encoder's input shape."""
    c, t = shape
    p = Path(path)
    if p.is_dir():
        files = sorted(p.rglob("*.wav"))
        if not files:
            raise DataError(f"no .wav files under {path}", "point embed at a folder of .wav files or a .npy of signals")
        return np.stack([read_wav(f, sample_rate, t) for f in files])[:, None]  # mono, resampled, cropped or padded
    if p.suffix != ".npy" or not p.is_file():
        raise DataError(f"embed input {path!r} is neither a .npy file nor a folder",
                        "pass signals as .npy (N, T) or (N, C, T), or a folder of .wav files")
    arr = np.load(p)
    if arr.ndim == 2:
        arr = arr[:, None]
    if arr.ndim != 3 or tuple(arr.shape[1:]) != (c, t):
        raise DataError(f"{path} holds signals of shape {tuple(arr.shape[1:])}, the encoder expects ({c}, {t})",
                        f"crop or pad the signals to {t} samples ({sample_rate} Hz) with {c} channel(s), or pass .wav files")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{path} holds {arr.dtype} signals, the encoder expects floating-point samples in [-1, 1]",
                        "convert the signals to float32 (integer PCM divided by its full scale)")
    return arr.astype(np.float32)


def read_images(path: str, shape: tuple[int, int, int]) -> np.ndarray:
    """A .npy of images or an image folder -> uint8 (N, C, H, W) of the encoder's input shape."""
    c, h, w = shape
    p = Path(path)
    if p.is_dir():
        from PIL import Image

        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".pgm"})
        if not files:
            raise DataError(f"no images (.png, .jpg, .bmp, .pgm) under {path}", "point embed at a folder of images or a .npy")
        mode = "L" if c == 1 else "RGB"
        arr = np.stack([np.asarray(Image.open(f).convert(mode).resize((w, h))) for f in files])
        return arr[:, None] if c == 1 else arr.transpose(0, 3, 1, 2)
    if p.suffix != ".npy" or not p.is_file():
        raise DataError(f"embed input {path!r} is neither a .npy file nor a folder", "pass images as .npy (N, H, W) or (N, C, H, W), or a folder")
    arr = np.load(p)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or tuple(arr.shape[1:]) != (c, h, w):
        raise DataError(f"{path} holds images of shape {tuple(arr.shape[1:])}, the encoder expects ({c}, {h}, {w})",
                        f"resize the images to {h}x{w} with {c} channel(s), or embed with a run trained at that size")
    if arr.dtype != np.uint8:
        if arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr
