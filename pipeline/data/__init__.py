"""Datasets: one adapter per `dataset.kind`, all returning the same `Dataset`.

    caps = capabilities("smallnorb")   # static; loads nothing
    ds = load_dataset(cfg.dataset)     # ds.images uint8 (N, C, S, S) (float32 (N, 1, T) for sequences), ds.meta, ds.caps, ds.name

Adapters are imported lazily so that asking for capabilities (config validation) never imports torchvision.
"""

from __future__ import annotations

import importlib
from dataclasses import replace

from pipeline.data.base import CAPS, META_SCHEMA, Dataset, DatasetCaps
from pipeline.errors import ConfigError
from schemas.config import DatasetConfig

_ADAPTERS = {
    "synthetic_norb": ("pipeline.data.synthetic_norb", "load"),
    "smallnorb": ("pipeline.data.smallnorb", "load"),
    "digits": ("pipeline.data.simple", "load_digits"),
    "image_folder": ("pipeline.data.simple", "load_image_folder"),
    "cifar10": ("pipeline.data.simple", "load_cifar10"),
    "stl10": ("pipeline.data.simple", "load_stl10"),
    "synthetic_audio": ("pipeline.data.audio", "load_synthetic_audio"),
    "wav_folder": ("pipeline.data.audio", "load_wav_folder"),
}


def capabilities(kind: str) -> DatasetCaps:
    """What dataset `kind` offers (instances, pose, lighting, classes, native size, channels); loads nothing.

    image_folder's classes are only known once loaded: its Dataset.caps has them filled in.
    """
    if kind not in CAPS:
        raise ConfigError([("dataset.kind", f"unknown dataset {kind!r}; choose one of {sorted(CAPS)}")])
    caps = CAPS[kind]
    return replace(caps, class_names=None if caps.class_names is None else list(caps.class_names))


def load_dataset(cfg: DatasetConfig) -> Dataset:
    """Load (or render) the dataset the config describes, with every subset key applied."""
    capabilities(cfg.kind)
    module, name = _ADAPTERS[cfg.kind]
    return getattr(importlib.import_module(module), name)(cfg)


__all__ = ["Dataset", "DatasetCaps", "META_SCHEMA", "capabilities", "load_dataset"]
