"""Encoder.embed takes raw images in every common form and preprocesses them as the run's loader did.

The encoder is built from a preset with untrained weights: what is checked is the input path (scale, resize,
channels, shape checks), which is the same for any weights.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data import load_dataset
from pipeline.data.simple import square_resize
from pipeline.errors import DataError
from pipeline.final.encoder import ComposedEncoder, model_input, read_images
from pipeline.planning.config import load_config


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    cfg = load_config("digits", ["dataset.max_per_split=20"])
    return cfg, ComposedEncoder(cfg).eval(), load_dataset(cfg.dataset)


def _sklearn_digits(n: int) -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images[:n]  # float64 (n, 8, 8), values 0..16


def test_sklearn_digits_as_they_come_embed_like_the_training_pixels(digits):
    cfg, encoder, dataset = digits
    ids = dataset.meta.column("sample_id").to_numpy()[:6]
    raw = _sklearn_digits(1797)[ids]  # (6, 8, 8) float 0..16: the native size, sklearn's own scale
    trained_on = torch.from_numpy(dataset.images[:6])  # uint8 (6, 1, 16, 16), the loader's pixels
    expected = encoder.embed(trained_on)
    assert expected.shape == (6, encoder.embed(trained_on[:1]).shape[1])
    assert torch.equal(encoder.embed(raw), expected)
    as_uint8 = np.round(raw * 255 / 16).astype(np.uint8)
    assert torch.equal(encoder.embed(as_uint8), expected)  # uint8 (N, H, W)
    assert torch.equal(encoder.embed(torch.from_numpy(as_uint8[:, None])), expected)  # torch uint8 (N, C, H, W)
    assert torch.equal(encoder.embed(as_uint8[:, :, :, None]), expected)  # (N, H, W, C) as PIL holds them


def test_float_0_1_and_the_trained_size_pass_unchanged(digits):
    _, encoder, dataset = digits
    pixels = dataset.images[:4]  # (4, 1, 16, 16) uint8
    expected = encoder.embed(pixels)
    assert torch.equal(encoder.embed(pixels.astype(np.float32) / 255.0), expected)  # numpy float 0..1
    assert torch.equal(encoder.embed(torch.from_numpy(pixels[:, 0]).float() / 255.0), expected)  # torch float (N, H, W)
    rgb = np.repeat(pixels, 3, axis=1)  # a gray run takes RGB too, converted as the loader converts
    assert torch.equal(encoder.embed(rgb), expected)


@pytest.mark.parametrize("shape", [(3, 12, 12), (3, 8, 9), (3, 1, 2, 16, 16), (3, 5, 16, 16), (0, 16, 16)])
def test_an_impossible_shape_is_refused_naming_the_expected_one(digits, shape):
    _, encoder, _ = digits
    with pytest.raises(DataError) as err:
        encoder.embed(np.zeros(shape, dtype=np.uint8))
    assert "(N, 1, 16, 16)" in err.value.message, err.value.message


@pytest.mark.parametrize("bad", [np.full((2, 16, 16), -0.5), np.full((2, 16, 16), 300.0), np.full((2, 16, 16), np.nan)])
def test_values_outside_any_pixel_scale_are_refused(digits, bad):
    _, encoder, _ = digits
    with pytest.raises(DataError, match="0..255"):
        encoder.embed(bad)


def test_native_small_norb_images_are_resized_by_the_loader_s_resize():
    from pipeline.data.base import resize

    cfg = load_config("smallnorb", ["dataset.path=/nonexistent"])
    size = cfg.dataset.image_size
    raw = np.random.default_rng(0).integers(0, 256, (3, 96, 96), dtype=np.uint8)
    x = model_input(raw, cfg.dataset, (1, size, size))
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 1, size, size)
    assert np.array_equal(x.numpy(), resize(raw[:, None], size))
    with pytest.raises(DataError, match="96x96"):
        model_input(raw[:, :64, :64], cfg.dataset, (1, size, size))


def test_image_folder_runs_take_any_size_through_the_loader_s_crop(tmp_path):
    from PIL import Image

    from schemas.config import DatasetConfig

    dataset = DatasetConfig(kind="image_folder", path=str(tmp_path), image_size=24, channels=3)
    raw = np.random.default_rng(1).integers(0, 256, (2, 40, 30, 3), dtype=np.uint8)  # (N, H, W, C), not square
    x = model_input(raw, dataset, (3, 24, 24))
    expected = np.stack([square_resize(Image.fromarray(im), 24) for im in raw])
    assert np.array_equal(x.numpy(), expected)
    for i, im in enumerate(raw):  # a folder of files goes through the same function
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    assert np.array_equal(model_input(read_images(str(tmp_path), (3, 24, 24)), dataset, (3, 24, 24)).numpy(), expected)


def test_an_encoder_loads_on_a_machine_smaller_than_its_training_budget():
    from pipeline.errors import ConfigError
    from pipeline.planning.plan import build_plan

    cfg = load_config("digits", ["dataset.max_per_split=20", "resources.memory_per_module=0.01"])
    with pytest.raises(ConfigError, match="resources.memory_per_module"):
        build_plan(cfg, check_paths=False, local_cluster=False)  # training it here is refused
    encoder = ComposedEncoder(cfg)  # embedding with it is not
    assert encoder.embed(np.zeros((2, 16, 16), dtype=np.uint8)).shape[0] == 2
