"""smallnorb: the real small-NORB files (LeCun, Huang & Bottou 2004) from `dataset.path`. Never downloaded.

Files (each optionally gzipped as `<name>.gz`):
    smallnorb-5x46789x9x18x6x2x96x96-training-{dat,cat,info}.mat   instances 4, 6, 7, 8, 9
    smallnorb-5x01235x9x18x6x2x96x96-testing-{dat,cat,info}.mat    instances 0, 1, 2, 3, 5

Format: little-endian int32 magic (0x1E3D4C55 = uint8 matrix, 0x1E3D4C54 = int32 matrix), int32 ndim,
max(3, ndim) int32 dims (unused ones are 1), then the C-order payload. dat is (N, 2, 96, 96) uint8 (two
cameras; camera 0 is used), cat (N,) int32 labels 0..4, info (N, 4) int32 = instance, elevation index 0..8,
azimuth 0, 2, ..., 34 (x 10 = degrees), lighting 0..5. Uncompressed files are memory-mapped and only the
selected images are read; gzipped ones are decompressed into memory.

sample_id is the position of (category, instance, elevation, azimuth, lighting) in the small-NORB product
order, the same id synthetic_norb gives the same pose, so it is stable whatever subset is asked for.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from pipeline.data.base import (
    CAPS,
    NORB_TEST_INSTANCES,
    NORB_TRAIN_INSTANCES,
    Catalog,
    Dataset,
    finish,
    norb_sample_id,
    select,
)
from pipeline.errors import ConfigError, DataError
from schemas.config import DatasetConfig

MAGIC_UINT8 = 0x1E3D4C55
MAGIC_INT32 = 0x1E3D4C54
FILES = {
    "train": "smallnorb-5x46789x9x18x6x2x96x96-training-{}.mat",
    "test": "smallnorb-5x01235x9x18x6x2x96x96-testing-{}.mat",
}
SOURCE = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
_FIX = f"download the six small-NORB files from {SOURCE} into dataset.path (gzipped or not) and do not rename them"


def load(cfg: DatasetConfig) -> Dataset:
    caps = CAPS["smallnorb"]
    if cfg.path is None:
        raise ConfigError([("dataset.path", f"smallnorb needs the directory holding the small-NORB .mat files ({SOURCE})")])
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise DataError(f"small-NORB directory {root} (dataset.path) does not exist", _FIX)
    wanted = set(cfg.instances) if cfg.instances is not None else set(range(10))
    parts = [(split, _read_labels(root, split)) for split, instances in (("train", NORB_TRAIN_INSTANCES), ("test", NORB_TEST_INSTANCES))
             if wanted & set(instances)]
    if not parts:  # instances outside 0..9: let select() name the key
        parts = [("train", _read_labels(root, "train"))]
    catalog = _catalog(parts)
    selection = select(cfg, catalog, caps)

    chunks = []
    for file_index, (split, _) in enumerate(parts):
        rows = catalog.extra["row"][selection.rows[catalog.extra["file"][selection.rows] == file_index]]
        if rows.size:
            dat_path = _locate(root, split, "dat")
            dat = read_matrix(dat_path, MAGIC_UINT8, ndim=4)
            if dat.shape[1] < 1 or dat.shape[2] != dat.shape[3]:
                raise DataError(f"{dat_path}: expected images of shape (N, 2, 96, 96), found {dat.shape}", _FIX)
            if dat.shape[0] != catalog.extra["count"][file_index]:
                raise DataError(
                    f"{dat_path} holds {dat.shape[0]} images but its -cat/-info files hold "
                    f"{catalog.extra['count'][file_index]} rows; expected the same count in all three", _FIX)
            chunks.append(np.asarray(dat[rows, 0])[:, None])  # camera 0, (n, 1, 96, 96); reads only these rows
    return finish(cfg, catalog, selection, np.concatenate(chunks), caps)


def read_matrix(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read one small-NORB matrix file (memory-mapped when not gzipped); checks magic, ndim and size."""
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as fh:
            try:
                buffer = np.frombuffer(fh.read(), dtype=np.uint8)
            except (OSError, EOFError) as exc:
                raise DataError(f"{path}: expected a gzip stream, found a damaged one ({exc})", _FIX) from exc
    else:
        buffer = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    if buffer.size < 8:
        raise DataError(f"{path}: expected a small-NORB header (at least 8 bytes), found {buffer.size} bytes", _FIX)
    found_magic, found_ndim = (int(x) for x in np.frombuffer(buffer[:8].tobytes(), dtype="<i4"))
    if found_magic != magic:
        kind = {MAGIC_UINT8: "uint8", MAGIC_INT32: "int32"}
        raise DataError(
            f"{path}: expected magic 0x{magic:08X} ({kind[magic]} matrix), found 0x{found_magic & 0xFFFFFFFF:08X}"
            f"{' (' + kind[found_magic] + ' matrix)' if found_magic in kind else ''}", _FIX)
    if found_ndim != ndim:
        raise DataError(f"{path}: expected a {ndim}-dimensional matrix, found ndim = {found_ndim}", _FIX)
    header = 8 + 4 * max(3, ndim)
    if buffer.size < header:
        raise DataError(f"{path}: expected a {header}-byte header, found {buffer.size} bytes", _FIX)
    shape = tuple(int(x) for x in np.frombuffer(buffer[8:header].tobytes(), dtype="<i4")[:ndim])
    dtype = np.dtype("u1") if magic == MAGIC_UINT8 else np.dtype("<i4")
    if any(d < 0 for d in shape):
        raise DataError(f"{path}: expected non-negative dimensions, found {shape}", _FIX)
    expected = int(np.prod(shape)) * dtype.itemsize
    found = buffer.size - header
    if found != expected:
        what = "truncated" if found < expected else "longer than its header says"
        raise DataError(f"{path}: {what}: expected {expected} payload bytes for shape {shape}, found {found}", _FIX)
    return buffer[header:].view(dtype).reshape(shape)


def _locate(root: Path, split: str, part: str) -> Path:
    name = FILES[split].format(part)
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"small-NORB file not found: expected {root / name} (or {name}.gz beside it)", _FIX)


def _read_labels(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), info (N, 4)) of one file pair, checked for agreeing counts and valid values."""
    cat_path, info_path = _locate(root, split, "cat"), _locate(root, split, "info")
    labels = np.array(read_matrix(cat_path, MAGIC_INT32, ndim=1), dtype=np.int64)
    info = np.array(read_matrix(info_path, MAGIC_INT32, ndim=2), dtype=np.int64)
    if info.shape[1] != 4:
        raise DataError(f"{info_path}: expected 4 columns (instance, elevation, azimuth, lighting), found {info.shape[1]}", _FIX)
    if labels.shape[0] != info.shape[0]:
        raise DataError(f"{cat_path} holds {labels.shape[0]} labels but {info_path} holds {info.shape[0]} rows; "
                        "expected the same count", _FIX)
    _check_range(cat_path, "label", labels, range(5))
    for j, (name, valid) in enumerate((("instance", range(10)), ("elevation", range(9)), ("azimuth", range(0, 35, 2)),
                                       ("lighting", range(6)))):
        _check_range(info_path, name, info[:, j], valid)
    return labels, info


def _check_range(path: Path, name: str, values: np.ndarray, valid: range) -> None:
    bad = values[~np.isin(values, np.array(valid))]
    if bad.size:
        raise DataError(f"{path}: expected {name} values in {list(valid)}, found {sorted(set(bad.tolist()))[:5]}", _FIX)


def _catalog(parts: list[tuple[str, tuple[np.ndarray, np.ndarray]]]) -> Catalog:
    labels = np.concatenate([lab for _, (lab, _) in parts])
    info = np.concatenate([inf for _, (_, inf) in parts])
    instance, elevation, azimuth, lighting = info[:, 0], info[:, 1], info[:, 2] // 2, info[:, 3]
    sample_id = norb_sample_id(labels, instance, elevation, azimuth, lighting)
    unique, counts = np.unique(sample_id, return_counts=True)
    if (counts > 1).any():
        dup = int(unique[counts > 1][0])
        raise DataError(f"small-NORB files hold {int((counts > 1).sum())} repeated (category, instance, elevation, azimuth, "
                        f"lighting) combinations, e.g. sample {dup}; expected each once", _FIX)
    return Catalog(
        sample_id=sample_id.astype(np.int64),
        label=labels,
        is_train=np.concatenate([np.full(lab.shape[0], split == "train") for split, (lab, _) in parts]),
        instance=instance, azimuth=azimuth, elevation=elevation, lighting=lighting,
        extra={
            "file": np.concatenate([np.full(lab.shape[0], k) for k, (_, (lab, _)) in enumerate(parts)]),
            "row": np.concatenate([np.arange(lab.shape[0]) for _, (lab, _) in parts]),
            "count": [lab.shape[0] for _, (lab, _) in parts],
        },
    )
