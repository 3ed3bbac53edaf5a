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

from pipeline.data import capabilities
from pipeline.data.audio import read_wav
from pipeline.data.base import resize, to_channels
from pipeline.data.simple import digits_to_uint8, read_image, square_resize
from pipeline.errors import DataError, RunError
from pipeline.store import checkpoint
from pipeline.store.runs import open_run, run_config, warn_stale
from pipeline.nn.modules import build_module, pool_to_vector
from pipeline.planning.plan import build_plan
from pipeline.store import Store
from schemas.config import DatasetConfig, RunConfig


class ComposedEncoder(nn.Module):
    """Images (B, C, H, W) or signals (B, C, T) -> top activations; ``embed`` pools them to (B, D)."""

    def __init__(self, cfg: RunConfig, names: list[str] | None = None) -> None:
        super().__init__()
        plan = build_plan(cfg, check_paths=False, check_machine=False)  # shapes only: loaded on any machine
        self.names = names or plan.names
        self.input_shape = tuple(plan.input_shape)
        self.sample_rate = cfg.dataset.sample_rate  # for sequence inputs (C, T): what embed resamples WAV files to
        self.dataset = cfg.dataset  # embed repeats its loader's preprocessing (scale, resize, channels)
        self.stages = nn.ModuleDict({n: build_module(cfg.stack[n], tuple(plan.module(n).in_shape)) for n in self.names})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255.0  # stored pixels are uint8; the modules saw [0, 1]
        for name in self.names:
            x = self.stages[name](x)
        return x

    @torch.inference_mode()
    def embed(self, x) -> torch.Tensor:
        """Raw images -> (N, D) embeddings, preprocessed as the run's dataset loader did (see `model_input`).

        x: numpy or torch; (N, H, W), (N, C, H, W) or (N, H, W, C); uint8 0..255 or float 0..1 (0..16 for digits).
        """
        batch = model_input(x, self.dataset, self.input_shape)
        device = next(self.parameters(), torch.empty(0)).device
        return torch.cat([pool_to_vector(self(batch[i:i + 256].to(device))).cpu() for i in range(0, len(batch), 256)])


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
    return _signals(np.load(p), shape, where=path)


def read_images(path: str, shape: tuple[int, int, int]) -> np.ndarray:
    """A .npy of images (any form `model_input` takes) or an image folder -> an array for ``embed``.

    A folder's images are read as image_folder's loader reads them (centred square crop, resized to the run's size).
    """
    c, size, _ = shape
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".pgm"})
        if not files:
            raise DataError(f"no images (.png, .jpg, .bmp, .pgm) under {path}", "point embed at a folder of images or a .npy")
        return to_channels(np.stack([read_image(f, size) for f in files]), c)  # (N, 3, S, S) -> (N, C, S, S)
    if p.suffix != ".npy" or not p.is_file():
        raise DataError(f"embed input {path!r} is neither a .npy file nor a folder",
                        "pass images as .npy (N, H, W) or (N, C, H, W), or a folder")
    return np.load(p)


def model_input(x, dataset: DatasetConfig, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw samples -> what the run's modules were trained on: uint8 (N, C, S, S) images, or float32 (N, C, T) signals.

    Images are brought to uint8 0..255 (floats 0..1; digits also 0..16, scikit-learn's own scale), then resized as
    the dataset's loader did: exactly the run's size passes; the dataset's native size (small-NORB 96, digits 8,
    CIFAR-10 32, STL-10 96) goes through the loader's `resize`; image_folder runs take any size through its
    centred square crop. Any other shape is refused, naming the one expected.
    """
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if len(shape) == 2:
        return torch.from_numpy(_signals(arr, shape))
    c, size, _ = shape
    native = capabilities(dataset.kind).native_size
    if arr.ndim == 4 and arr.shape[-1] in (1, 3) and arr.shape[1] not in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)  # (N, H, W, C) as PIL and matplotlib hold images
    elif arr.ndim == 3:
        arr = arr[:, None]  # (N, H, W): gray
    sizes = f"{size}x{size}" + (f" or the dataset's native {native}x{native}" if native and native != size else "")
    if dataset.kind == "image_folder":
        sizes = "any size (centre-cropped to a square, resized to {0}x{0})".format(size)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or arr.shape[0] == 0:
        raise DataError(f"embed input of shape {arr.shape}: expected (N, {c}, {size}, {size}) or (N, {size}, {size}) "
                        f"images, {sizes}", "pass a batch of images: (N, H, W) gray, or (N, C, H, W) with C = 1 or 3")
    pixels = _as_uint8(arr, dataset.kind)
    h, w = pixels.shape[2:]
    if dataset.kind == "image_folder" and (h, w) != (size, size):
        from PIL import Image  # image_folder's loader resizes with PIL: the same function, one image at a time

        rgb = to_channels(pixels, 3).transpose(0, 2, 3, 1)
        pixels = np.stack([square_resize(Image.fromarray(im), size) for im in rgb])
    elif (h, w) != (size, size):
        if not (h == w == native):
            raise DataError(f"embed input of shape {arr.shape}: images of {h}x{w} cannot be this run's input, which is "
                            f"(N, {c}, {size}, {size}) from dataset {dataset.kind!r}; sizes accepted: {sizes}",
                            f"resize the images to {size}x{size}, or embed with a run trained at {h}x{w}")
        pixels = resize(pixels, size)
    return torch.from_numpy(np.ascontiguousarray(to_channels(pixels, c)))


def _as_uint8(arr: np.ndarray, kind: str) -> np.ndarray:
    """Pixels of any numeric dtype -> uint8 0..255, by the scale their range says."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise DataError(f"embed input has dtype {arr.dtype}: expected numbers (uint8 0..255 or float 0..1)",
                        "convert the images to uint8 or float32")
    values = arr.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not np.isfinite(values).all() or low < 0 or high > 255:
        raise DataError(f"embed input has values in [{low:g}, {high:g}]: expected uint8 0..255 or float 0..1",
                        "scale the images to 0..1 (float) or 0..255 (uint8); remove NaN or inf")
    if np.issubdtype(arr.dtype, np.floating):
        if high <= 1.0:
            values = values * 255.0
        elif kind == "digits" and high <= 16.0:
            return digits_to_uint8(values)  # scikit-learn's digits.images as they come
    return np.round(values).astype(np.uint8)


def _signals(arr: np.ndarray, shape: tuple[int, int], where: str = "embed input") -> np.ndarray:
    """Signals (N, T) or (N, C, T) of the encoder's shape -> float32 (N, C, T); ``where`` names them in errors."""
    c, t = shape
    if arr.ndim == 2:
        arr = arr[:, None]
    if arr.ndim != 3 or tuple(arr.shape[1:]) != (c, t):
        raise DataError(f"{where} of shape {arr.shape}: the encoder expects signals (N, {c}, {t}) or (N, {t})",
                        f"crop or pad the signals to {t} samples with {c} channel(s), or pass .wav files")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{where} holds {arr.dtype} signals, the encoder expects floating-point samples in [-1, 1]",
                        "convert the signals to float32 (integer PCM divided by its full scale)")
    return arr.astype(np.float32)
