"""Pose metrics on synthetic rings and grids whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.manifold import trustworthiness as sk_trustworthiness

from pipeline.final.pose import (
    circular_error_deg,
    knn_pose_errors,
    pose_distance,
    pose_metrics,
    pose_trustworthiness,
    ridge_pose_r2,
    trustworthiness_from_distances,
)


def ring(step: float = 5.0):
    """Azimuths 0..360 by ``step`` x elevations 30..70 by 5, embedded as (cos az, sin az, el / 50)."""
    az, el = np.meshgrid(np.arange(0, 360, step), np.arange(30, 75, 5.0), indexing="ij")
    az, el = az.ravel(), el.ravel()
    return np.column_stack([np.cos(np.radians(az)), np.sin(np.radians(az)), el / 50.0]), az, el


def norb_grid(n_instances: int = 2, lightings: int = 2):
    """The small-NORB pose grid (18 azimuths x 9 elevations) per instance and lighting, in degrees."""
    inst, a, e, _ = (g.ravel() for g in np.meshgrid(np.arange(n_instances), np.arange(18), np.arange(9),
                                                   np.arange(lightings), indexing="ij"))
    return inst, a * 20.0, 30.0 + 5.0 * e, a, e


def test_circular_error():
    assert circular_error_deg(350, 10) == 20
    assert circular_error_deg(10, 350) == 20
    assert circular_error_deg(0, 180) == 180
    np.testing.assert_allclose(circular_error_deg([0, 90, 720], [359, 270, 1]), [1, 180, 1])


def test_knn_recovers_a_ring():
    emb, az, el = ring()
    err = knn_pose_errors(emb, az, el, emb, az, el, k=5)
    assert err["azimuth_mae_deg"] < 0.5  # circular mean: 355 and 5 average to 0, not 180
    assert err["elevation_mae_deg"] < 2.0


def test_cosine_knn_reads_directions_whatever_the_rows_lengths():
    # The azimuth lives in each row's direction; the lengths are noise, as a cosine-trained loss leaves them.
    rng = np.random.default_rng(0)
    az = np.repeat(np.arange(0, 360, 5.0), 8)
    el = np.full_like(az, 50.0)
    emb = np.column_stack([np.cos(np.radians(az)), np.sin(np.radians(az))]) * rng.uniform(0.05, 5.0, (len(az), 1))
    train, test = np.arange(len(az)) % 2 == 0, np.arange(len(az)) % 2 == 1
    errs = {m: knn_pose_errors(emb[train], az[train], el[train], emb[test], az[test], el[test], k=5, metric=m)
            for m in ("euclidean", "cosine")}
    assert errs["cosine"]["azimuth_mae_deg"] < 3.0
    assert errs["euclidean"]["azimuth_mae_deg"] > 3 * errs["cosine"]["azimuth_mae_deg"]
    with pytest.raises(ValueError, match="no-such-metric"):
        knn_pose_errors(emb, az, el, emb, az, el, metric="no-such-metric")


def test_knn_on_shuffled_angles_is_chance():
    emb, az, el = ring()
    rng = np.random.default_rng(0)
    err = knn_pose_errors(emb, rng.permutation(az), el, emb, az, el, k=5)
    assert 70 < err["azimuth_mae_deg"] < 110  # uniform circular error averages 90


def test_ridge_r2():
    emb, az, el = ring()
    assert ridge_pose_r2(emb[::2], az[::2], el[::2], emb[1::2], az[1::2], el[1::2]) > 0.99
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(len(az), 4))
    assert abs(ridge_pose_r2(noise[::2], az[::2], el[::2], noise[1::2], az[1::2], el[1::2])) < 0.1


def test_pose_distance_is_grid_steps():
    d = pose_distance(np.array([0, 340, 180, 20]), np.array([30, 30, 70, 35]))
    assert d[0, 1] == 1  # 0 and 340 deg are neighbours on the circle
    assert d[0, 2] == 9 + 8
    assert d[0, 3] == 2
    assert np.all(d == d.T) and np.all(np.diag(d) == 0)


def test_trustworthiness_matches_sklearn_without_ties():
    rng = np.random.default_rng(0)
    x, emb = rng.normal(size=(60, 5)), rng.normal(size=(60, 2))
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    ours = trustworthiness_from_distances(d, emb, 5)
    assert ours == pytest.approx(sk_trustworthiness(d, emb, n_neighbors=5, metric="precomputed"))


def test_trustworthiness_exact_grid_vs_random():
    inst, az, el, a, e = norb_grid()
    radius = 18 / (2 * np.pi)  # one azimuth step ~ one unit of arc, like one elevation step
    grid = np.column_stack([radius * np.cos(2 * np.pi * a / 18), radius * np.sin(2 * np.pi * a / 18), e])
    exact = pose_trustworthiness(grid, az, el, inst, k=5)
    noise = pose_trustworthiness(np.random.default_rng(0).normal(size=(len(az), 3)), az, el, inst, k=5)
    assert exact > 0.99
    assert noise < 0.8


def test_trustworthiness_groups_by_label_and_instance():
    # Two categories reuse instance id 0; each lives in its own corner of the embedding.
    inst, az, el, a, e = norb_grid(n_instances=1, lightings=1)
    radius = 18 / (2 * np.pi)
    grid = np.column_stack([radius * np.cos(2 * np.pi * a / 18), radius * np.sin(2 * np.pi * a / 18), e])
    emb = np.vstack([grid, grid + 100.0])
    two = dict(az=np.tile(az, 2), el=np.tile(el, 2), instance=np.tile(inst, 2))
    by_object = pose_trustworthiness(emb, **two, label=np.repeat([0, 1], len(az)))
    mixed = pose_trustworthiness(emb, **two)
    assert by_object > 0.99 and mixed < by_object  # the other object's same pose crowds the ranks


def test_pose_metrics_keys():
    emb, az, el = ring(step=20.0)
    out = pose_metrics(emb, az, el, emb, az, el, instance_test=np.zeros(len(az)), k=3)
    assert set(out) == {"azimuth_mae_deg", "elevation_mae_deg", "ridge_r2", "trustworthiness"}
    assert all(isinstance(v, float) for v in out.values())


def test_one_sample_per_object_leaves_trustworthiness_and_r2_undefined_not_failed():
    """20 test objects seen once each, all at one pose: kNN errors still read, the other two are None + reason."""
    rng = np.random.default_rng(0)
    train_emb, test_emb = rng.normal(size=(60, 4)), rng.normal(size=(20, 4))
    train_az, train_el = rng.choice([0.0, 20.0, 40.0], 60), rng.choice([30.0, 35.0], 60)
    out = pose_metrics(train_emb, train_az, train_el, test_emb, np.zeros(20), np.full(20, 30.0),
                       instance_test=np.arange(20), k=5)
    assert isinstance(out["azimuth_mae_deg"], float) and isinstance(out["elevation_mae_deg"], float)
    assert out["trustworthiness"] is None and out["ridge_r2"] is None
    assert "3 or more samples (largest: 1)" in out["undefined"]["trustworthiness"]
    assert "share one pose" in out["undefined"]["ridge_r2"]


def test_r2_averages_only_the_targets_that_vary_on_test():
    emb, az, el = ring(step=20.0)
    one_el = el == 50.0  # azimuth varies, elevation is constant on this test subset
    r2 = ridge_pose_r2(emb, az, el, emb[one_el], az[one_el], el[one_el])
    assert r2 > 0.95  # a constant elevation column no longer counts as a 0 in the average


def test_empty_test_split_is_undefined_but_bad_shape_is_an_error():
    from pipeline.errors import DataError, UndefinedMetricError

    emb, az, el = ring(step=20.0)
    out = pose_metrics(emb, az, el, np.zeros((0, 3)), [], [], instance_test=[], k=3)
    assert out["undefined"].keys() == {"azimuth_mae_deg", "elevation_mae_deg", "ridge_r2", "trustworthiness"}
    with pytest.raises(DataError) as info:
        knn_pose_errors(emb[:, 0], az, el, emb, az, el)
    assert not isinstance(info.value, UndefinedMetricError)
