"""Dataset adapters: the shared contract, the synthetic renderer, the small-NORB reader, the simple datasets."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import Dataset, capabilities, load_dataset
from pipeline.data import render, synthetic_norb, toys
from pipeline.data.base import META_SCHEMA, balanced_subset, norb_sample_id, resize, to_channels
from pipeline.errors import ConfigError, DataError
from schemas.config import DatasetConfig

# A few seconds of rendering: 50 toys x 2 azimuths x 1 elevation x 2 lightings at 16 px.
TINY = dict(image_size=16, azimuths=[0, 9], elevations=[0], lightings=[0, 1])


def norb(tmp_path: Path, **kw) -> DatasetConfig:
    return DatasetConfig(kind="synthetic_norb", cache_dir=str(tmp_path / "cache"), **{**TINY, **kw})


def column(ds: Dataset, name: str) -> np.ndarray:
    return ds.meta.column(name).to_numpy(zero_copy_only=False)


def check_contract(ds: Dataset, cfg: DatasetConfig) -> None:
    assert ds.images.dtype == np.uint8 and ds.images.ndim == 4
    assert ds.images.shape[1:] == (cfg.channels, cfg.image_size, cfg.image_size)
    assert ds.meta.schema.equals(META_SCHEMA) and ds.meta.num_rows == ds.images.shape[0]
    ids = column(ds, "sample_id")
    assert np.unique(ids).size == ids.size
    assert set(column(ds, "split")) == {"train", "test"}
    assert ds.name == cfg.kind


# ---------------------------------------------------------------- capabilities


def test_capabilities_are_static_and_complete():
    norb_caps = capabilities("synthetic_norb")
    assert (norb_caps.has_instance, norb_caps.has_pose, norb_caps.has_lighting) == (True, True, True)
    assert norb_caps.class_names == ["animal", "human", "airplane", "truck", "car"] and norb_caps.channels == 1
    assert capabilities("smallnorb").native_size == 96
    digits = capabilities("digits")
    assert (digits.has_instance, digits.has_pose, digits.has_lighting, digits.num_classes) == (False, False, False, 10)
    assert capabilities("cifar10").channels == 3 and capabilities("stl10").native_size == 96
    assert capabilities("image_folder").num_classes is None
    capabilities("synthetic_norb").class_names.append("x")  # a copy: the next caller is unaffected
    assert len(capabilities("synthetic_norb").class_names) == 5
    with pytest.raises(ConfigError, match="dataset.kind"):
        capabilities("mnist")


# ---------------------------------------------------------------- synthetic_norb


def test_synthetic_contract_meta_and_split(tmp_path):
    cfg = norb(tmp_path)
    ds = load_dataset(cfg)
    check_contract(ds, cfg)
    assert len(ds) == 5 * 10 * 2 * 1 * 2
    label, instance, split = column(ds, "label"), column(ds, "instance"), column(ds, "split")
    assert set(np.unique(label)) == set(range(5))
    assert set(instance[split == "train"]) == {4, 6, 7, 8, 9} and set(instance[split == "test"]) == {0, 1, 2, 3, 5}
    assert set(column(ds, "azimuth")) == {0.0, 180.0} and set(column(ds, "elevation")) == {30.0}
    assert set(column(ds, "lighting")) == {0, 1}
    row = ds.meta.slice(0, 1).to_pylist()[0]
    assert row["sample_id"] == norb_sample_id(row["label"], row["instance"], 0, int(row["azimuth"]) // 20, row["lighting"])


def test_synthetic_is_deterministic_cached_and_subset_independent(tmp_path, monkeypatch):
    cfg = norb(tmp_path)
    first = load_dataset(cfg)
    assert list((tmp_path / "cache" / "synthetic_norb").glob("*.npz"))

    def no_render(*args, **kwargs):
        raise AssertionError("a cached subset must not be rendered again")

    monkeypatch.setattr(synthetic_norb, "render_samples", no_render)
    again = load_dataset(cfg)
    assert np.array_equal(first.images, again.images) and first.meta.equals(again.meta)
    monkeypatch.undo()

    # the same sample renders to the same pixels whatever else is asked for, and a new seed changes them
    one = load_dataset(norb(tmp_path, categories=[2], instances=[0, 4], lightings=[1]))
    at = np.flatnonzero(np.isin(column(first, "sample_id"), column(one, "sample_id")))
    assert np.array_equal(first.images[at], one.images)
    other_seed = load_dataset(norb(tmp_path, categories=[2], instances=[0, 4], lightings=[1], seed=1))
    assert not np.array_equal(one.images, other_seed.images)


def test_synthetic_images_show_a_lit_object_with_jitter(tmp_path):
    ds = load_dataset(norb(tmp_path, image_size=32, azimuths=[0, 4, 9], lightings=[0, 2, 5]))
    img = ds.images[:, 0].astype(np.float32)
    border = np.concatenate([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], 1)
    centre = img[:, 12:20, 12:20]
    # the object is in the middle, on a plain background
    assert (np.abs(centre.mean((1, 2)) - border.mean(1)) > 2).mean() > 0.9
    assert border.std(1).mean() < 6
    # lighting changes the picture; no two images are identical
    assert len({im.tobytes() for im in ds.images}) == len(ds)


def test_toys_differ_in_shape_and_turn_visibly():
    """Silhouettes of the instances of a category differ; a toy seen from the front differs from its side."""
    views = render.Views(
        toward=np.array([[0.5, 0.5, 0.7071], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32),
        right=np.array([[-0.7071, 0.7071, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32),
        up=np.array([[-0.5, -0.5, 0.7071], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], np.float32),
        half_extent=np.full(3, 1.05, np.float32), shift=np.zeros((3, 2), np.float32),
    )
    for category in range(5):
        masks = []
        for instance in range(10):
            parts = toys.toy(category, instance)
            points = np.concatenate([toys._surface_points(p) for p in parts])
            assert np.linalg.norm(points, axis=1).max() == pytest.approx(1.0, abs=1e-3)  # unit radius: size is no cue
            hits = render.cast(list(parts), views, 32)
            mask = np.zeros(hits.shape, bool)
            mask[hits.view, hits.pixel] = True
            masks.append(mask)
            side, front = mask[1], mask[2]
            assert (side ^ front).sum() / (side | front).sum() > 0.2, (category, instance)
        for a in range(10):
            for b in range(a):
                iou = ((masks[a] & masks[b]).sum(1) / (masks[a] | masks[b]).sum(1)).min()
                assert iou < 0.85, f"category {category}: instances {a} and {b} have near-identical silhouettes"


def test_synthetic_lighting_split_and_channels(tmp_path):
    cfg = norb(tmp_path, split="lighting", lightings=None, instances=[0, 4], categories=[1, 3], channels=3)
    ds = load_dataset(cfg)
    check_contract(ds, cfg)
    light, split = column(ds, "lighting"), column(ds, "split")
    assert set(light[split == "train"]) == {0, 2, 4} and set(light[split == "test"]) == {1, 3, 5}
    assert set(column(ds, "instance")) == {0, 4} and set(column(ds, "label")) == {1, 3}
    assert np.array_equal(ds.images[:, 0], ds.images[:, 2])  # gray repeated


def test_max_per_split_is_balanced_and_seeded(tmp_path):
    cfg = norb(tmp_path, max_per_split=12)
    ds = load_dataset(cfg)
    label, split = column(ds, "label"), column(ds, "split")
    for name in ("train", "test"):
        counts = np.bincount(label[split == name], minlength=5)
        assert counts.sum() == 12 and counts.max() - counts.min() <= 1
    again = load_dataset(cfg)
    assert np.array_equal(column(ds, "sample_id"), column(again, "sample_id"))
    other = load_dataset(norb(tmp_path, max_per_split=12, seed=3))
    assert not np.array_equal(column(ds, "sample_id"), column(other, "sample_id"))


def test_balanced_subset_fills_from_larger_classes():
    labels = np.array([0] * 2 + [1] * 50 + [2] * 50)
    chosen = balanced_subset(labels, 20, np.random.default_rng(0))
    assert np.bincount(labels[chosen]).tolist() == [2, 9, 9]


@pytest.mark.parametrize(
    "kw, key",
    [
        (dict(instances=[0, 1]), "dataset.instances"),  # only test instances: train is empty
        (dict(split="lighting", lightings=[0, 2]), "dataset.lightings"),  # only train lightings: test is empty
        (dict(azimuths=[18]), "dataset.azimuths"),
        (dict(categories=[5]), "dataset.categories"),
        (dict(elevations=[]), "dataset.elevations"),
    ],
)
def test_subsets_that_empty_a_split_or_are_out_of_range_name_the_key(tmp_path, kw, key):
    with pytest.raises(ConfigError) as info:
        load_dataset(norb(tmp_path, **kw))
    assert key in str(info.value)


def test_keys_a_dataset_lacks_are_config_errors():
    with pytest.raises(ConfigError) as info:
        load_dataset(DatasetConfig(kind="digits", split="lighting", instances=[1], azimuths=[0]))
    keys = {key for key, _ in info.value.problems}
    assert keys == {"dataset.split", "dataset.instances", "dataset.azimuths"}


# ---------------------------------------------------------------- smallnorb (tiny files written from the spec)

TRAIN = "smallnorb-5x46789x9x18x6x2x96x96-training-{}.mat"
TEST = "smallnorb-5x01235x9x18x6x2x96x96-testing-{}.mat"


def write_mat(path: Path, magic: int, array: np.ndarray, *, gz: bool = False) -> None:
    dims = list(array.shape) + [1] * max(0, 3 - array.ndim)
    dtype = "<u1" if magic == 0x1E3D4C55 else "<i4"
    blob = struct.pack("<ii", magic, array.ndim) + struct.pack(f"<{len(dims)}i", *dims) + array.astype(dtype).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(blob))
    else:
        path.write_bytes(blob)


def write_norb(root: Path, gz: bool = False) -> dict:
    """Two tiny files per split: rows (label, instance, elevation, azimuth, lighting), camera 0 = a constant per row."""
    root.mkdir(parents=True, exist_ok=True)
    rows = {
        TRAIN: [(0, 4, 0, 0, 0), (1, 6, 8, 34, 5), (2, 7, 3, 18, 2), (3, 8, 1, 2, 1), (4, 9, 2, 4, 3), (0, 4, 0, 0, 1)],
        TEST: [(0, 0, 0, 0, 0), (1, 1, 4, 10, 4), (2, 2, 5, 20, 3), (4, 5, 2, 6, 0)],
    }
    for name, table in rows.items():
        table = np.array(table)
        n = table.shape[0]
        dat = np.zeros((n, 2, 96, 96), np.uint8)
        dat[:, 0] = (10 * np.arange(n) + (100 if name == TEST else 0))[:, None, None]
        dat[:, 1] = 255  # camera 1 must not be used
        write_mat(root / name.format("dat"), 0x1E3D4C55, dat, gz=gz)
        write_mat(root / name.format("cat"), 0x1E3D4C54, table[:, 0], gz=gz)
        write_mat(root / name.format("info"), 0x1E3D4C54, table[:, 1:], gz=gz)
    return rows


@pytest.mark.parametrize("gz", [False, True])
def test_smallnorb_reads_the_files(tmp_path, gz):
    rows = write_norb(tmp_path / "norb", gz=gz)
    cfg = DatasetConfig(kind="smallnorb", path=str(tmp_path / "norb"), image_size=96)
    ds = load_dataset(cfg)
    check_contract(ds, cfg)
    assert len(ds) == 10
    meta = ds.meta.to_pylist()
    train = [r for r in meta if r["split"] == "train"]
    assert [(r["label"], r["instance"]) for r in train] == [(t[0], t[1]) for t in rows[TRAIN]]
    second = train[1]  # (1, 6, elevation 8, azimuth 34, lighting 5)
    assert (second["elevation"], second["azimuth"], second["lighting"]) == (70.0, 340.0, 5)
    assert ds.images[:, 0, 0, 0].tolist() == [0, 10, 20, 30, 40, 50, 100, 110, 120, 130]
    small = load_dataset(DatasetConfig(kind="smallnorb", path=str(tmp_path / "norb"), image_size=32, channels=3,
                                       instances=[0, 4]))
    assert small.images.shape == (3, 3, 32, 32) and set(column(small, "instance")) == {0, 4}
    lighting = load_dataset(DatasetConfig(kind="smallnorb", path=str(tmp_path / "norb"), split="lighting"))
    assert set(column(lighting, "lighting")[column(lighting, "split") == "train"]) <= {0, 2, 4}


def damage(root: Path, case: str) -> tuple[str, str]:
    """Break the tiny files one way; returns (file name, text the error must contain)."""
    if case == "magic":
        path = root / TRAIN.format("cat")
        blob = bytearray(path.read_bytes())
        blob[:4] = struct.pack("<i", 0x1E3D4C55)
        path.write_bytes(bytes(blob))
        return path.name, "expected magic 0x1E3D4C54"
    if case == "truncated":
        path = root / TEST.format("dat")
        path.write_bytes(path.read_bytes()[:-100])
        return path.name, "truncated: expected 73728 payload bytes"
    if case == "count_cat_info":
        write_mat(root / TRAIN.format("cat"), 0x1E3D4C54, np.zeros(5, np.int32))
        return TRAIN.format("info"), "holds 5 labels but"
    if case == "count_dat":
        write_mat(root / TEST.format("dat"), 0x1E3D4C55, np.zeros((3, 2, 96, 96), np.uint8))
        return TEST.format("dat"), "holds 3 images but its -cat/-info files hold 4 rows"
    if case == "missing":
        (root / TEST.format("info")).unlink()
        return TEST.format("info"), "not found"
    if case == "bad_values":
        info = np.array([[4, 0, 0, 0], [6, 8, 35, 5], [7, 3, 18, 2], [8, 1, 2, 1], [9, 2, 4, 3], [4, 0, 0, 1]])
        write_mat(root / TRAIN.format("info"), 0x1E3D4C54, info)
        return TRAIN.format("info"), "expected azimuth values"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["magic", "truncated", "count_cat_info", "count_dat", "missing", "bad_values"])
def test_smallnorb_damaged_files_are_data_errors(tmp_path, case):
    write_norb(tmp_path / "norb")
    name, expected = damage(tmp_path / "norb", case)
    with pytest.raises(DataError) as info:
        load_dataset(DatasetConfig(kind="smallnorb", path=str(tmp_path / "norb")))
    assert name in info.value.cause and expected in info.value.cause
    assert "norb-v1.0-small" in info.value.fix


def test_smallnorb_needs_a_path(tmp_path):
    with pytest.raises(ConfigError, match="dataset.path"):
        load_dataset(DatasetConfig(kind="smallnorb"))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DatasetConfig(kind="smallnorb", path=str(tmp_path / "nowhere")))


# ---------------------------------------------------------------- digits, image_folder, cifar10, stl10


def test_digits_real():
    cfg = DatasetConfig(kind="digits", image_size=16)
    ds = load_dataset(cfg)
    check_contract(ds, cfg)
    assert len(ds) == 1797 and ds.images.max() == 255
    split, label = column(ds, "split"), column(ds, "label")
    train_share = (split == "train").mean()
    assert 0.68 < train_share < 0.72
    for c in range(10):  # stratified
        assert abs((split[label == c] == "train").mean() - train_share) < 0.03
    for name in ("instance", "azimuth", "elevation", "lighting"):
        assert ds.meta.column(name).null_count == len(ds)
    assert np.array_equal(column(load_dataset(cfg), "split"), split)
    assert not np.array_equal(column(load_dataset(DatasetConfig(kind="digits", image_size=16, seed=1)), "split"), split)
    sub = load_dataset(DatasetConfig(kind="digits", image_size=8, categories=[3, 7], max_per_split=10))
    assert set(column(sub, "label")) == {3, 7} and len(sub) == 20


def test_digits_are_scikit_learns_read_without_importing_it(monkeypatch):
    from sklearn.datasets import load_digits as sklearn_digits

    from pipeline.data import simple

    theirs = sklearn_digits()
    images, labels = simple._sklearn_digits()
    assert np.array_equal(images, theirs.images) and np.array_equal(labels, theirs.target)
    # where the shipped CSV cannot be found, scikit-learn's own loader gives the same
    monkeypatch.setattr(simple.importlib.util, "find_spec", lambda name: None)
    images, labels = simple._sklearn_digits()
    assert np.array_equal(images, theirs.images) and np.array_equal(labels, theirs.target)


def write_pngs(root: Path, classes=("cat", "dog"), n=5, size=(20, 12)) -> None:
    from PIL import Image

    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.full((size[1], size[0], 3), (40 * k + 5 * i, 100, 200), np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_image_folder_with_and_without_train_test(tmp_path):
    write_pngs(tmp_path / "flat")
    cfg = DatasetConfig(kind="image_folder", path=str(tmp_path / "flat"), image_size=8, channels=3)
    ds = load_dataset(cfg)
    check_contract(ds, cfg)
    assert ds.caps.class_names == ["cat", "dog"] and ds.caps.num_classes == 2
    split, label = column(ds, "split"), column(ds, "label")
    assert [(split[label == c] == "test").sum() for c in (0, 1)] == [2, 2]
    assert ds.images[0, :, 0, 0].tolist() == [0, 100, 200]

    write_pngs(tmp_path / "split" / "train", n=3)
    write_pngs(tmp_path / "split" / "test", n=2)
    cfg = DatasetConfig(kind="image_folder", path=str(tmp_path / "split"), image_size=8, channels=1)
    ds = load_dataset(cfg)
    check_contract(ds, cfg)
    assert (column(ds, "split") == "train").sum() == 6 and len(ds) == 10


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="one subfolder per class"):
        load_dataset(DatasetConfig(kind="image_folder", path=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DatasetConfig(kind="image_folder", path=str(tmp_path / "missing")))


@pytest.mark.parametrize("kind, folder", [("cifar10", "cifar-10-batches-py"), ("stl10", "stl10_binary")])
def test_cifar10_stl10_missing_files_say_where(tmp_path, kind, folder):
    with pytest.raises(DataError) as info:
        load_dataset(DatasetConfig(kind=kind, path=str(tmp_path)))
    assert str(tmp_path / folder) in info.value.cause
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DatasetConfig(kind=kind, path=str(tmp_path / "absent")))
    with pytest.raises(ConfigError, match="dataset.path"):
        load_dataset(DatasetConfig(kind=kind))


# ---------------------------------------------------------------- helpers


def test_resize_and_channels():
    images = np.zeros((2, 1, 8, 8), np.uint8)
    images[:, :, :, 4:] = 200
    big = resize(images, 16)
    assert big.shape == (2, 1, 16, 16) and big[0, 0, 0, 0] == 0 and big[0, 0, 0, -1] == 200
    rgb = to_channels(big, 3)
    assert rgb.shape == (2, 3, 16, 16) and np.array_equal(to_channels(rgb, 1), big)
    red = np.zeros((1, 3, 2, 2), np.uint8)
    red[:, 0] = 255
    assert to_channels(red, 1)[0, 0, 0, 0] == 76  # ITU-R 601 luma of pure red
