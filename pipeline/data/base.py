"""What every dataset adapter shares: the Dataset and its capabilities, subset selection, resizing, metadata.

An adapter describes its samples as a `Catalog` (labels, native split, pose columns; no pixels), `select`
applies every subset key of the config to it (raising one ConfigError with all problems), and the adapter
then loads only the selected images and hands them to `finish`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from pipeline.errors import ConfigError
from pipeline.store.columns import meta_schema
from schemas.config import DatasetConfig

NORB_TRAIN_INSTANCES = (4, 6, 7, 8, 9)
NORB_TEST_INSTANCES = (0, 1, 2, 3, 5)
LIGHTING_TRAIN = (0, 2, 4)
NORB_CLASS_NAMES = ["animal", "human", "airplane", "truck", "car"]
N_AZIMUTHS, N_ELEVATIONS, N_LIGHTINGS, N_INSTANCES = 18, 9, 6, 10
N_SPEAKERS, N_SENTENCES, N_TAKES = 10, 8, 5  # synthetic_audio

# The one metadata schema is the store's (pipeline.store.columns): a dataset fills it, with labels always set.
META_SCHEMA = meta_schema()


def object_ids(label: np.ndarray, instance: np.ndarray) -> np.ndarray:
    """Dense int64 id of each row's object (label, instance): the rows of one object, and only they, share it
    (ingest deals objects out by it; under ``same_instance`` in-batch rows of one object are not negatives)."""
    keys = np.stack([np.asarray(label).astype(np.int64), np.asarray(instance).astype(np.int64)], axis=1)
    return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


@dataclass(frozen=True)
class DatasetCaps:
    """What a dataset kind offers, known without loading anything."""

    has_instance: bool
    has_pose: bool  # azimuth and elevation
    has_lighting: bool
    num_classes: int | None
    class_names: list[str] | None
    native_size: int | None  # side of the stored images; None = any (rendered) or varies (image_folder)
    channels: int  # 1 or 3, as stored
    sequence: bool = False  # samples are 1-D signals (C, T) (dataset.length), not images (C, S, S)
    needs_path: bool = False  # reads local files from dataset.path
    # How many samples the full dataset has: a product of factors, each selectable by the dataset key named
    # (dataset.instances=[0, 4] keeps 2 of 10); a factor with key None is not selectable. Empty = unknown.
    size: tuple[tuple[str | None, int], ...] = ()
    norb_instance_split: bool = False  # split 'instances' is small-NORB's own train/test instances

    def factor(self, key: str) -> int | None:
        """How many values ``dataset.<key>`` can select from (indices 0..n-1), or None when it selects nothing."""
        return dict((k, n) for k, n in self.size if k).get(key)


_CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_STL10_NAMES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]

# The static capabilities of every dataset kind (pipeline.data.capabilities hands out copies).
_NORB_SIZE = (("categories", 5), ("instances", N_INSTANCES), ("azimuths", N_AZIMUTHS), ("elevations", N_ELEVATIONS),
              ("lightings", N_LIGHTINGS))
CAPS = {
    "synthetic_norb": DatasetCaps(True, True, True, 5, NORB_CLASS_NAMES, None, 1, size=_NORB_SIZE,  # rendered at any size
                                  norb_instance_split=True),
    "smallnorb": DatasetCaps(True, True, True, 5, NORB_CLASS_NAMES, 96, 1, needs_path=True, size=_NORB_SIZE,
                             norb_instance_split=True),
    "digits": DatasetCaps(False, False, False, 10, [str(d) for d in range(10)], 8, 1, size=((None, 1797),)),
    "image_folder": DatasetCaps(False, False, False, None, None, None, 3, needs_path=True),  # classes known once loaded
    "cifar10": DatasetCaps(False, False, False, 10, _CIFAR10_NAMES, 32, 3, needs_path=True, size=((None, 60000),)),
    "stl10": DatasetCaps(False, False, False, 10, _STL10_NAMES, 96, 3, needs_path=True, size=((None, 13000),)),
    # Sequences: label = speaker; synthetic_audio's instance = the sentence spoken (several takes of each).
    "synthetic_audio": DatasetCaps(True, False, False, N_SPEAKERS, [f"speaker{i}" for i in range(N_SPEAKERS)], None, 1, sequence=True,
                                   size=(("categories", N_SPEAKERS), ("instances", N_SENTENCES), (None, N_TAKES))),
    "wav_folder": DatasetCaps(False, False, False, None, None, None, 1, sequence=True, needs_path=True),
}


@dataclass(frozen=True)
class Dataset:
    """images: uint8 (N, C, H, W), or float32 (N, 1, T) signals for sequence datasets (caps.sequence);
    meta: one row per sample with META_SCHEMA's columns."""

    name: str
    images: np.ndarray
    meta: pa.Table
    caps: DatasetCaps

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class Catalog:
    """Every sample an adapter could return, as metadata only (one entry per sample, aligned arrays).

    Pose columns are indices (azimuth 0..17 = 20 deg steps, elevation 0..8 = 30 + 5 i deg, lighting 0..5)
    and None where the dataset has no such column.
    """

    sample_id: np.ndarray  # int64
    label: np.ndarray  # int64
    is_train: np.ndarray  # bool: the dataset's own train/test split
    instance: np.ndarray | None = None
    azimuth: np.ndarray | None = None
    elevation: np.ndarray | None = None
    lighting: np.ndarray | None = None
    extra: dict = field(default_factory=dict)  # adapter-specific per-sample arrays (file rows, paths)


@dataclass
class Selection:
    """The rows of a Catalog that the config keeps, in catalog order, and the split each row goes to."""

    rows: np.ndarray  # int64 indices into the catalog
    is_train: np.ndarray  # bool, aligned with rows


_SUBSET_KEYS = (
    ("categories", "label", "class labels"),
    ("instances", "instance", "instances"),
    ("azimuths", "azimuth", "azimuth indices"),
    ("elevations", "elevation", "elevation indices"),
    ("lightings", "lighting", "lighting indices"),
)
_RANGES = {"instance": N_INSTANCES, "azimuth": N_AZIMUTHS, "elevation": N_ELEVATIONS, "lighting": N_LIGHTINGS}


def select(cfg: DatasetConfig, catalog: Catalog, caps: DatasetCaps) -> Selection:
    """Apply categories / instances / azimuths / elevations / lightings, the split and max_per_split.

    Raises one ConfigError listing every problem, each naming its key (`dataset.instances`, ...).
    """
    problems = check_subset_keys(cfg, caps, num_classes=caps.num_classes)
    if problems:
        raise ConfigError(problems)
    if cfg.split == "lighting":
        is_train = np.isin(catalog.lighting, LIGHTING_TRAIN)
    else:
        is_train = catalog.is_train.astype(bool)

    keep = np.ones(catalog.label.shape[0], dtype=bool)
    for key, column, _ in _SUBSET_KEYS:
        values = getattr(cfg, key)
        if values is None:
            continue
        keep &= np.isin(getattr(catalog, column), values)
        _check_splits(keep, is_train, f"dataset.{key}", f"keeps {key} {sorted(set(values))}", cfg)
    _check_splits(keep, is_train, "dataset.split", f"is {cfg.split!r}", cfg)

    rows = np.flatnonzero(keep)
    if cfg.max_per_split is not None:
        parts = []
        for split_index, in_split in enumerate((is_train[rows], ~is_train[rows])):
            split_rows = rows[in_split]
            rng = np.random.default_rng([cfg.seed, split_index])
            parts.append(split_rows[balanced_subset(catalog.label[split_rows], cfg.max_per_split, rng)])
        rows = np.sort(np.concatenate(parts))
    return Selection(rows=rows.astype(np.int64), is_train=is_train[rows])


def check_subset_keys(cfg: DatasetConfig, caps: DatasetCaps, num_classes: int | None) -> list[tuple[str, str]]:
    """Problems with the subset keys that can be seen without the data (missing columns, out of range)."""
    problems = []
    present = {"label": True, "instance": caps.has_instance, "azimuth": caps.has_pose, "elevation": caps.has_pose,
               "lighting": caps.has_lighting}
    for key, column, what in _SUBSET_KEYS:
        values = getattr(cfg, key)
        if values is None:
            continue
        if not present[column]:
            problems.append((f"dataset.{key}", f"dataset {cfg.kind!r} has no {what}; leave it null"))
            continue
        limit = num_classes if column == "label" else _RANGES[column]
        if not values:
            problems.append((f"dataset.{key}", "is an empty list; use null to keep all"))
        elif limit is not None and any(v < 0 or v >= limit for v in values):
            problems.append((f"dataset.{key}", f"{values} has values outside 0..{limit - 1} ({what} of {cfg.kind!r})"))
    if cfg.split == "lighting" and not caps.has_lighting:
        problems.append(("dataset.split", f"'lighting' needs lighting conditions, which dataset {cfg.kind!r} lacks; use 'instances'"))
    return problems


def _check_splits(keep: np.ndarray, is_train: np.ndarray, key: str, what: str, cfg: DatasetConfig) -> None:
    for name, in_split in (("train", is_train), ("test", ~is_train)):
        if not (keep & in_split).any():
            hint = ""
            if cfg.split == "instances" and key == "dataset.instances":
                hint = f" (with split 'instances' the train instances are {list(NORB_TRAIN_INSTANCES)}, the test ones {list(NORB_TEST_INSTANCES)})"
            elif cfg.split == "lighting" and key == "dataset.lightings":
                hint = f" (with split 'lighting' train uses lightings {list(LIGHTING_TRAIN)}, test the others)"
            raise ConfigError([(key, f"{what}, which leaves the {name} split of {cfg.kind!r} empty{hint}")])


def balanced_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most n entries, as equal per label as the label counts allow; random within a label."""
    if labels.shape[0] <= n:
        return np.arange(labels.shape[0])
    classes, counts = np.unique(labels, return_counts=True)
    quota = {}
    left = n
    for rank, i in enumerate(np.argsort(counts, kind="stable")):  # smallest classes first; the rest share what is left
        quota[classes[i]] = min(counts[i], left // (len(classes) - rank))
        left -= quota[classes[i]]
    chosen = [rng.permutation(np.flatnonzero(labels == c))[: quota[c]] for c in classes]
    return np.sort(np.concatenate(chosen))


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), antialiased bilinear (torch), in chunks."""
    if images.shape[2] == size and images.shape[3] == size:
        return np.ascontiguousarray(images)
    import torch
    import torch.nn.functional as F

    out = np.empty((images.shape[0], images.shape[1], size, size), dtype=np.uint8)
    for start in range(0, images.shape[0], 2048):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + 2048])).float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + 2048] = y.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def to_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """Gray repeated to RGB, or RGB to gray with ITU-R 601 luma (as PIL's 'L')."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return np.repeat(images, 3, axis=1)
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)[None, :, None, None]
    return np.round((images.astype(np.float32) * weights).sum(1, keepdims=True)).clip(0, 255).astype(np.uint8)


def finish(cfg: DatasetConfig, catalog: Catalog, selection: Selection, images: np.ndarray, caps: DatasetCaps) -> Dataset:
    """Resize, convert channels and attach the metadata table of the selected rows."""
    images = to_channels(resize(images, cfg.image_size), cfg.channels)
    rows = selection.rows

    def column(values, arrow_type, transform=lambda x: x):
        if values is None:
            return pa.nulls(rows.shape[0], type=arrow_type)
        return pa.array(transform(values[rows]), type=arrow_type)

    meta = pa.table(
        [
            pa.array(catalog.sample_id[rows], type=pa.int64()),
            pa.array(np.where(selection.is_train, "train", "test"), type=pa.string()),
            pa.array(catalog.label[rows], type=pa.int64()),
            column(catalog.instance, pa.int64()),
            column(catalog.azimuth, pa.float32(), lambda a: (a * 20).astype(np.float32)),
            column(catalog.elevation, pa.float32(), lambda e: (30 + 5 * e).astype(np.float32)),
            column(catalog.lighting, pa.int64()),
        ],
        schema=META_SCHEMA,
    )
    caps = replace(caps, class_names=None if caps.class_names is None else list(caps.class_names))  # callers may edit theirs
    return Dataset(name=cfg.kind, images=images, meta=meta, caps=caps)


def norb_catalog() -> Catalog:
    """The full small-NORB product: 5 categories x 10 instances x 9 elevations x 18 azimuths x 6 lightings.

    Rows are in that order, and sample_id = the row (so `norb_sample_id` gives the id of any combination).
    """
    grids = np.meshgrid(np.arange(5), np.arange(N_INSTANCES), np.arange(N_ELEVATIONS), np.arange(N_AZIMUTHS),
                        np.arange(N_LIGHTINGS), indexing="ij")
    label, instance, elevation, azimuth, lighting = (g.reshape(-1).astype(np.int64) for g in grids)
    return Catalog(
        sample_id=np.arange(label.shape[0], dtype=np.int64),
        label=label,
        is_train=np.isin(instance, NORB_TRAIN_INSTANCES),
        instance=instance,
        azimuth=azimuth,
        elevation=elevation,
        lighting=lighting,
    )


def norb_sample_id(label, instance, elevation, azimuth, lighting):
    """The position of a (category, instance, elevation, azimuth, lighting) in the small-NORB product order."""
    return (((label * N_INSTANCES + instance) * N_ELEVATIONS + elevation) * N_AZIMUTHS + azimuth) * N_LIGHTINGS + lighting
