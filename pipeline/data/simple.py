"""Datasets without instances, pose or lighting: digits, image_folder, cifar10, stl10.

digits is scikit-learn's shipped 8x8 digits (always available, for smoke tests). The others read files
under `dataset.path` and never download; a missing directory or file is a DataError saying where the files
must be. Where a dataset has no train/test split of its own, a stratified 70/30 split is drawn from
`dataset.seed` (the same split every call).
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.data.base import CAPS, Catalog, Dataset, finish, select
from pipeline.errors import ConfigError, DataError
from schemas.config import DatasetConfig

TEST_FRACTION = 0.3


def load_digits(cfg: DatasetConfig) -> Dataset:
    images, labels = _sklearn_digits()
    catalog = Catalog(sample_id=np.arange(labels.shape[0], dtype=np.int64), label=labels,
                      is_train=stratified_train_mask(labels, cfg.seed))
    selection = select(cfg, catalog, CAPS["digits"])
    images = digits_to_uint8(images[selection.rows])[:, None]
    return finish(cfg, catalog, selection, images, CAPS["digits"])


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float in 0..16, labels): the CSV scikit-learn ships, read as its ``load_digits`` reads
    it but without importing scikit-learn, whose import (scipy.stats and more, ~3.5 s of CPU) this process needs
    for nothing else. Where the file is not at its usual place, scikit-learn's own loader."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is None or not csv.is_file():
        from sklearn.datasets import load_digits as sklearn_digits

        digits = sklearn_digits()
        return digits.images, digits.target.astype(np.int64)
    table = np.loadtxt(csv, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def load_image_folder(cfg: DatasetConfig) -> Dataset:
    """One subfolder per class (torchvision ImageFolder); `train/` and `test/` subfolders are used when both exist."""
    root = _root(cfg, "image_folder", "one subfolder per class holding the images (or train/ and test/ with those inside)")
    from torchvision.datasets import ImageFolder

    def folder(path: Path) -> ImageFolder:
        try:
            return ImageFolder(str(path))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataError(f"image_folder {path}: expected one subfolder per class holding images, found none ({exc})",
                            "put the images into <dataset.path>/<class name>/*.png (or .jpg, ...)") from exc

    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = folder(root / "train"), folder(root / "test")
        classes = train.classes
        unknown = sorted(set(test.classes) - set(classes))
        if unknown:
            raise DataError(f"image_folder {root / 'test'}: expected only the classes of {root / 'train'}, found also {unknown}",
                            "give test/ the same class subfolders as train/")
        samples = list(train.samples) + [(p, classes.index(test.classes[y])) for p, y in test.samples]
        is_train = np.arange(len(samples)) < len(train.samples)
        labels = np.array([y for _, y in samples], dtype=np.int64)
    else:
        data = folder(root)
        classes, samples = data.classes, list(data.samples)
        labels = np.array([y for _, y in samples], dtype=np.int64)
        is_train = stratified_train_mask(labels, cfg.seed)
    caps = replace(CAPS["image_folder"], num_classes=len(classes), class_names=list(classes))
    catalog = Catalog(sample_id=np.arange(len(samples), dtype=np.int64), label=labels, is_train=is_train)
    selection = select(cfg, catalog, caps)
    images = np.stack([read_image(Path(samples[i][0]), cfg.image_size) for i in selection.rows])
    return finish(cfg, catalog, selection, images, caps)


def load_cifar10(cfg: DatasetConfig) -> Dataset:
    root = _root(cfg, "cifar10", "cifar-10-batches-py/")
    from torchvision.datasets import CIFAR10

    try:
        parts = [CIFAR10(str(root), train=train, download=False) for train in (True, False)]
    except RuntimeError as exc:
        raise DataError(
            f"CIFAR-10 not found or damaged under {root}: expected {root / 'cifar-10-batches-py'}/ holding data_batch_1 .. "
            "data_batch_5, test_batch and batches.meta (the python version)",
            f"download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract it into {root} "
            "(it unpacks to cifar-10-batches-py/), or set dataset.path to the directory that holds cifar-10-batches-py/",
        ) from exc
    data = np.concatenate([p.data for p in parts]).transpose(0, 3, 1, 2)  # (N, 32, 32, 3) -> (N, 3, 32, 32)
    labels = np.concatenate([np.asarray(p.targets) for p in parts]).astype(np.int64)
    return _from_arrays(cfg, data, labels, n_train=len(parts[0].data))


def load_stl10(cfg: DatasetConfig) -> Dataset:
    root = _root(cfg, "stl10", "stl10_binary/")
    from torchvision.datasets import STL10

    try:
        parts = [STL10(str(root), split=split, download=False) for split in ("train", "test")]
    except RuntimeError as exc:
        raise DataError(
            f"STL-10 not found or damaged under {root}: expected {root / 'stl10_binary'}/ holding train_X.bin, train_y.bin, "
            "test_X.bin and test_y.bin",
            f"download stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/ and extract it into {root} "
            "(it unpacks to stl10_binary/), or set dataset.path to the directory that holds stl10_binary/",
        ) from exc
    data = np.concatenate([p.data for p in parts])  # (N, 3, 96, 96) already
    labels = np.concatenate([np.asarray(p.labels) for p in parts]).astype(np.int64)
    return _from_arrays(cfg, data, labels, n_train=len(parts[0].data))


def stratified_train_mask(labels: np.ndarray, seed: int, test_fraction: float = TEST_FRACTION) -> np.ndarray:
    """True for the ~70 % of each class that trains; the same mask for the same labels and seed."""
    rng = np.random.default_rng([seed, 7])
    is_train = np.ones(labels.shape[0], dtype=bool)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(test_fraction * members.shape[0]))
        if members.shape[0] >= 2:
            n_test = min(max(n_test, 1), members.shape[0] - 1)  # keep every class in both splits where possible
        is_train[members[:n_test]] = False
    return is_train


def _from_arrays(cfg: DatasetConfig, data: np.ndarray, labels: np.ndarray, n_train: int) -> Dataset:
    caps = CAPS[cfg.kind]
    catalog = Catalog(sample_id=np.arange(labels.shape[0], dtype=np.int64), label=labels,
                      is_train=np.arange(labels.shape[0]) < n_train)
    selection = select(cfg, catalog, caps)
    return finish(cfg, catalog, selection, data[selection.rows], caps)


def _root(cfg: DatasetConfig, kind: str, holds: str) -> Path:
    if cfg.path is None:
        raise ConfigError([("dataset.path", f"{kind} needs the directory that holds {holds}")])
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise DataError(f"{kind}: dataset.path {root} does not exist (expected a directory holding {holds})",
                        f"create {root} with the {kind} files in it, or point dataset.path at the directory that has them")
    return root


def digits_to_uint8(images: np.ndarray) -> np.ndarray:
    """scikit-learn's digits intensities 0..16 -> uint8 0..255 (what the `digits` loader stores)."""
    return np.round(np.asarray(images, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)


def read_image(path: Path, size: int) -> np.ndarray:
    """RGB uint8 (3, size, size) of an image file: `square_resize` of it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return square_resize(image, size)
    except OSError as exc:
        raise DataError(f"image_folder: cannot read {path} as an image ({exc})", "remove or replace the damaged file") from exc


def square_resize(image, size: int) -> np.ndarray:
    """A PIL image -> RGB uint8 (3, size, size): the centred square crop, resized (PIL bilinear, antialiased when shrinking)."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
