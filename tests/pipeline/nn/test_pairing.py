import time

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.nn.pairing import PAIRING_NEEDS, augment_views, grid_pairs, loss_inputs, partner_index
from pipeline.planning.config import DEFAULT_PRESET, load_config
from schemas.objectives import AugmentViews


def norb_like(categories=3, instances=4, seed=0):
    """Every (label, instance, azimuth 0..340 step 20, elevation 30..70 step 5, lighting 0..2) once, shuffled."""
    grids = np.meshgrid(np.arange(categories), np.arange(instances), np.arange(0, 360, 20), np.arange(30, 75, 5),
                        np.arange(3), indexing="ij")
    cols = [g.reshape(-1) for g in grids]
    perm = np.random.default_rng(seed).permutation(len(cols[0]))
    return dict(zip(["label", "instance", "azimuth", "elevation", "lighting"], (c[perm] for c in cols)))


def test_pairing_needs_table():
    assert PAIRING_NEEDS["same_instance"] == {"label", "instance"}
    assert PAIRING_NEEDS["neighbor_pose"] == {"label", "instance", "azimuth", "elevation"}
    assert PAIRING_NEEDS["patch_grid"] == PAIRING_NEEDS["augment"] == set()


def test_same_instance_partner_is_another_row_of_the_same_object():
    meta = norb_like()
    p = partner_index("same_instance", **meta, rng=np.random.default_rng(0))
    assert p.dtype == np.int64 and p.shape == meta["label"].shape
    assert (meta["label"][p] == meta["label"]).all() and (meta["instance"][p] == meta["instance"]).all()
    assert (p != np.arange(len(p))).all()
    assert len(np.unique(p)) > len(p) // 2  # random, not one fixed row per group


def test_same_instance_alone_is_its_own_partner():
    p = partner_index("same_instance", label=np.array([0, 0, 1, 0]), instance=np.array([1, 1, 1, 2]),
                      rng=np.random.default_rng(0))
    assert p[0] == 1 and p[1] == 0 and p[2] == 2 and p[3] == 3


def test_neighbor_pose_is_one_step_away_with_wraparound():
    meta = norb_like()
    p = partner_index("neighbor_pose", **meta, rng=np.random.default_rng(1))
    same_object = (meta["label"][p] == meta["label"]) & (meta["instance"][p] == meta["instance"])
    d_az = np.abs(meta["azimuth"][p] - meta["azimuth"]) % 360
    d_az = np.minimum(d_az, 360 - d_az)
    d_el = np.abs(meta["elevation"][p] - meta["elevation"])
    one_step = ((d_az == 20) & (d_el == 0)) | ((d_az == 0) & (d_el == 5))
    assert same_object.all() and one_step.all()
    # the lighting is free: partners are drawn across lightings
    assert (meta["lighting"][p] != meta["lighting"]).any()
    # 340 and 0 are neighbours
    at_340 = meta["azimuth"] == 340
    assert (meta["azimuth"][p][at_340] == 0).any()
    at_0 = meta["azimuth"] == 0
    assert (meta["azimuth"][p][at_0] == 340).any()


def test_neighbor_pose_falls_back_to_same_instance():
    # object (0, 0) has poses two steps apart only; object (1, 0) is alone
    # (the 20-degree step comes from object (1, 0)'s azimuth, so 0 and 40 are two steps apart)
    meta = dict(label=np.array([0, 0, 1]), instance=np.array([0, 0, 0]), azimuth=np.array([0, 40, 20]),
                elevation=np.array([30, 30, 30]))
    p = partner_index("neighbor_pose", **meta, rng=np.random.default_rng(0))
    assert list(p) == [1, 0, 2]


def test_rows_without_pose_fall_back():
    meta = dict(label=np.zeros(4, int), instance=np.zeros(4, int), azimuth=np.array([0.0, 20.0, np.nan, 0.0]),
                elevation=np.array([30.0, 30.0, 30.0, np.nan]))
    for seed in range(20):
        p = partner_index("neighbor_pose", **meta, rng=np.random.default_rng(seed))
        assert p[0] == 1 and p[1] == 0 and p[2] != 2 and p[3] != 3


def test_neighbor_pose_is_uniform_over_neighbours():
    # the row at azimuth 20 has neighbours at 0 and 40 (and one elevation neighbour): each drawn about a third of the time
    label = np.zeros(4, int)
    instance = np.zeros(4, int)
    azimuth = np.array([20, 0, 40, 20])
    elevation = np.array([30, 30, 30, 35])
    picks = np.array([partner_index("neighbor_pose", label=label, instance=instance, azimuth=azimuth,
                                    elevation=elevation, rng=np.random.default_rng(s))[0] for s in range(300)])
    counts = np.bincount(picks, minlength=4)
    assert counts[0] == 0 and (counts[1:] > 70).all()


def test_partner_index_is_fast_for_50k_rows():
    meta = norb_like(categories=5, instances=10)  # 24,300 rows
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    partner_index("neighbor_pose", **meta, rng=rng)
    partner_index("same_instance", **meta, rng=rng)
    assert time.perf_counter() - t < 2.0


def test_missing_metadata_is_a_config_error():
    with pytest.raises(ConfigError, match="azimuth"):
        partner_index("neighbor_pose", label=np.zeros(3), instance=np.zeros(3), rng=np.random.default_rng(0))
    assert list(partner_index("augment", label=np.zeros(3), rng=np.random.default_rng(0))) == [0, 1, 2]


def test_grid_pairs_are_neighbouring_positions():
    z = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4)  # value = b*12 + row*4 + col
    a, b = grid_pairs(z)
    assert a.shape == b.shape == (2 * (3 * 3 + 2 * 4), 1)
    diff = (b - a).squeeze(1)
    assert set(diff.tolist()) == {1.0, 4.0}  # one column right or one row down, same image
    a5, b5 = grid_pairs(torch.rand(2, 9, 4, 2, 2))  # 3x3 patch grid
    assert a5.shape == (2 * 12, 4)
    sub, _ = grid_pairs(torch.rand(4, 8, 6, 6), max_pairs=10)
    assert sub.shape == (10, 8)


def test_augment_views_shapes_and_differences():
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x1, x2 = augment_views(x, torch.Generator().manual_seed(0))
    assert x1.shape == x2.shape == x.shape
    assert x1.min() >= 0 and x1.max() <= 1
    assert not torch.allclose(x1, x2) and not torch.allclose(x1, x)
    assert (x1 - x2).flatten(1).abs().amax(1).gt(0).all()  # every sample's views differ
    again = augment_views(x, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x1)  # reproducible from the generator


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_augment_views_flip_probability(flip):
    # A left-dark, right-bright ramp: a crop and a positive contrast factor keep its direction, only a flip turns it.
    ramp = torch.linspace(0.1, 0.9, 16).expand(64, 1, 16, 16).contiguous()
    for view in augment_views(ramp, torch.Generator().manual_seed(3), AugmentViews(flip=flip)):
        left, right = view[..., :8].mean(dim=(1, 2, 3)), view[..., 8:].mean(dim=(1, 2, 3))
        assert bool((left > right).all()) if flip == 1.0 else bool((left < right).all())


def test_pair_views_mirror_each_row_and_its_partner_independently():
    # min_scale 1 and no jitter: a view is the image itself or its mirror image, nothing else.
    spec = load_config(DEFAULT_PRESET, ["stack.m1.objective.pair_views=true", "stack.m1.objective.augment.min_scale=1",
                                        "stack.m1.objective.augment.jitter=0"]).stack["m1"].objective
    x = torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x_pos = torch.rand(256, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    a, a_pos = loss_inputs(x, x_pos, torch.Generator().manual_seed(2), "same_instance", spec)
    mirrored = []
    for view, rows in ((a, x), (a_pos, x_pos)):
        same = (view - rows).flatten(1).abs().amax(1) < 1e-5
        flipped = (view - rows.flip(-1)).flatten(1).abs().amax(1) < 1e-5
        assert bool((same ^ flipped).all())  # every row one or the other
        mirrored.append(flipped)
    assert 0.35 < float(mirrored[0].float().mean()) < 0.65
    assert bool((mirrored[0] != mirrored[1]).any()) and bool((mirrored[0] == mirrored[1]).any())  # independent
    # Off (the default), the rows are scored as fed; pairing augment still makes its own two views of x.
    plain = spec.model_copy(update={"pair_views": False})
    assert loss_inputs(x, x_pos, None, "same_instance", plain) == (x, x_pos)
    v1, v2 = loss_inputs(x, None, torch.Generator().manual_seed(2), "augment", plain)
    assert v1.shape == v2.shape == x.shape and not torch.equal(v1, v2)
