"""Classifiers on frozen embeddings: hand-computed cases and JSON-ready output."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import DataError
from pipeline.final.evaluation import classify, cluster_accuracy, standardize

# Two clusters of three points; centroids (1/3, 1/3) and (31/3, 31/3).
TRAIN_X = np.array([[0, 0], [0, 1], [1, 0], [10, 10], [10, 11], [11, 10]], dtype=np.float32)
TRAIN_Y = np.array([0, 0, 0, 1, 1, 1])
# (6, 6) is nearer centroid 1 but labelled 0: one error in three.
TEST_X = np.array([[0.5, 0.5], [10, 10], [6, 6]], dtype=np.float32)
TEST_Y = np.array([0, 1, 0])


def test_nearest_centroid_hand_computed():
    r = classify(TRAIN_X, TRAIN_Y, TEST_X, TEST_Y, knn_k=3)
    nc = r["nearest_centroid"]
    assert nc["train_accuracy"] == 1.0
    assert nc["test_accuracy"] == pytest.approx(2 / 3)
    assert nc["per_class_accuracy"] == {"0": 0.5, "1": 1.0}
    assert nc["confusion"] == [[1, 1], [0, 1]]  # rows true, columns predicted
    assert nc["labels"] == [0, 1]
    assert r["knn"] == {"test_accuracy": pytest.approx(2 / 3), "k": 3}
    assert r["linear_probe"]["train_accuracy"] == 1.0


def test_output_is_plain_json():
    r = classify(TRAIN_X, TRAIN_Y, TEST_X, TEST_Y)
    assert json.loads(json.dumps(r)) == r
    for clf in ("nearest_centroid", "linear_probe", "knn", "kmeans", "gmm"):
        assert 0.0 <= r[clf]["test_accuracy"] <= 1.0
    assert r["knn"]["k"] == 5  # k=5 fits in the 6 train points


def test_separable_blobs_score_perfectly():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, size=(4, 8))
    def blobs(n):
        y = np.repeat(np.arange(4), n)
        return centres[y] + rng.normal(0, 0.5, size=(len(y), 8)), y
    (xtr, ytr), (xte, yte) = blobs(30), blobs(20)
    r = classify(xtr, ytr, xte, yte, seed=1)
    assert r["nearest_centroid"]["test_accuracy"] == 1.0
    assert r["linear_probe"]["test_accuracy"] == 1.0
    assert r["knn"]["test_accuracy"] == 1.0
    assert r["kmeans"]["test_accuracy"] == 1.0
    assert r["gmm"] == {"test_accuracy": 1.0, "dims": 8}
    assert np.array(r["nearest_centroid"]["confusion"]).shape == (4, 4)
    assert set(r["nearest_centroid"]["per_class_accuracy"]) == {"0", "1", "2", "3"}


def test_confusion_covers_labels_of_both_splits():
    # Label 2 appears only in test: the confusion matrix still has a row for it.
    r = classify(TRAIN_X, TRAIN_Y, TEST_X, np.array([0, 1, 2]))
    assert np.array(r["nearest_centroid"]["confusion"]).shape == (3, 3)
    assert r["nearest_centroid"]["labels"] == [0, 1, 2]


def test_cluster_accuracy_is_permutation_invariant():
    y = np.array([0, 0, 1, 1, 2, 2])
    assert cluster_accuracy(y, np.array([2, 2, 0, 0, 1, 1])) == 1.0
    assert cluster_accuracy(np.array([0, 0, 1, 1]), np.array([1, 1, 1, 0])) == 0.75
    assert cluster_accuracy(np.array(["a", "b"]), np.array([7, 3])) == 1.0


def test_bad_input_is_a_data_error():
    with pytest.raises(DataError):
        classify(TRAIN_X, TRAIN_Y, np.zeros((3, 5)), TEST_Y)
    with pytest.raises(DataError):
        classify(TRAIN_X, TRAIN_Y[:4], TEST_X, TEST_Y)
    with pytest.raises(DataError):
        classify(TRAIN_X, np.zeros(6), TEST_X, TEST_Y)
    with pytest.raises(DataError):
        cluster_accuracy([0, 1], [0])


def test_gmm_separates_clusters_of_unequal_spread_that_kmeans_cuts():
    from pipeline.final.evaluation import gmm_cluster_accuracy

    # A tight cluster beside a broad one: k-means puts the boundary half-way and gives the tight cluster the
    # broad one's near side; a Gaussian mixture models each cluster's own covariance.
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 300)
    x = np.array([[0.0, 0.0], [5.0, 0.0]])[y] + np.where(y == 0, 0.3, 3.0)[:, None] * rng.normal(size=(len(y), 2))
    r = classify(x, y, x, y, seed=0)
    assert r["gmm"]["test_accuracy"] > 0.97 and r["gmm"]["test_accuracy"] > r["kmeans"]["test_accuracy"] + 0.05
    # Wide inputs are reduced by PCA before the full-covariance fit.
    wide = np.concatenate([x, rng.normal(0, 1e-3, (len(y), 100))], axis=1)
    assert gmm_cluster_accuracy(wide, y, 2, max_dims=4)["dims"] == 4


def test_standardize_lets_nearest_centroid_see_past_a_loud_noise_dimension():
    """Class signal in a quiet dimension, pure noise 1000x louder in another: z-scoring recovers the signal."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 200)
    signal = y * 1.0 + rng.normal(0, 0.1, 400)       # separates the classes
    noise = rng.normal(0, 1000.0, 400)                # carries nothing
    x = np.stack([signal, noise], axis=1)
    tr = np.arange(400) % 2 == 0
    plain = classify(x[tr], y[tr], x[~tr], y[~tr])["nearest_centroid"]["test_accuracy"]
    ztr, zte = standardize(x[tr], x[~tr])
    scaled = classify(ztr, y[tr], zte, y[~tr])["nearest_centroid"]["test_accuracy"]
    assert plain < 0.7 and scaled > 0.95, (plain, scaled)
    assert np.allclose(ztr.mean(axis=0), 0, atol=1e-9) and np.allclose(ztr.std(axis=0), 1)
    # A dimension constant on the train split is centred, not divided by zero.
    ctr, cte = standardize(np.ones((4, 1)), np.full((2, 1), 3.0))
    assert np.all(ctr == 0) and np.all(cte == 2)


def test_dead_units_score_without_warnings(recwarn):
    """Features that are zero for every row (dead ReLU units; here most of them, as sklearn's shrinkage statistics
    take a median over features) leave nearest centroid's answer and the terminal alone."""
    x = np.column_stack([np.r_[TRAIN_X[:, 0], TEST_X[:, 0]], np.zeros((len(TRAIN_X) + len(TEST_X), 3))])
    n = len(TRAIN_X)
    dead = classify(x[:n], TRAIN_Y, x[n:], TEST_Y, knn_k=3)["nearest_centroid"]
    alive = classify(x[:n, :1], TRAIN_Y, x[n:, :1], TEST_Y, knn_k=3)["nearest_centroid"]
    assert dead["test_accuracy"] == alive["test_accuracy"]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in recwarn]


def test_too_few_test_samples_leave_clustering_undefined():
    r = classify(TRAIN_X, TRAIN_Y, TEST_X[:1], TEST_Y[:1])
    assert "kmeans" not in r and "gmm" not in r
    assert "every sample could be its own cluster" in r["undefined"]["gmm"]
    assert 0.0 <= r["nearest_centroid"]["test_accuracy"] <= 1.0


def test_one_class_in_train_is_undefined():
    from pipeline.errors import UndefinedMetricError

    with pytest.raises(UndefinedMetricError, match="1 class"):
        classify(TRAIN_X, np.zeros(len(TRAIN_Y)), TEST_X, TEST_Y)


def test_a_collapsed_embedding_is_undefined_with_the_module_to_retrain():
    """One vector for every train row (a module whose output collapsed) is named as such, not scikit-learn's
    "division by zero"; one varying feature is enough to classify."""
    from pipeline.errors import UndefinedMetricError

    flat = np.full_like(TRAIN_X, 0.25)
    with pytest.raises(UndefinedMetricError, match="collapsed to one point") as err:
        classify(flat, TRAIN_Y, TEST_X, TEST_Y)
    assert "isostack retrain" in err.value.fix
    flat[:, 0] = TRAIN_Y
    r = classify(flat, TRAIN_Y, np.column_stack([TEST_Y, np.full((len(TEST_Y), flat.shape[1] - 1), 0.25)]), TEST_Y)
    assert r["nearest_centroid"]["test_accuracy"] == 1.0


def _blobs(n: int, seed: int):
    """n rows of two well separated blobs in 3 dimensions, labels 0/1 alternating."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    return (rng.normal(size=(n, 3)) + 8.0 * y[:, None]).astype(np.float32), y


def test_a_split_over_fit_rows_is_subsampled_and_says_so():
    train_x, train_y = _blobs(300, 0)
    test_x, test_y = _blobs(120, 1)
    whole = classify(train_x, train_y, test_x, test_y, fit_rows=1000)
    assert "subsample" not in whole  # under the budget: every row, nothing to say
    r = classify(train_x, train_y, test_x, test_y, fit_rows=50, seed=4)
    assert r["subsample"] == {"rows": {"train": 50, "test": 50}, "of": {"train": 300, "test": 120}, "seed": 4}
    assert json.loads(json.dumps(r)) == r
    # nearest centroid still sees every row: identical to the unsampled result
    assert r["nearest_centroid"] == whole["nearest_centroid"]
    for clf in ("linear_probe", "knn", "kmeans", "gmm"):
        assert r[clf]["test_accuracy"] > 0.95, clf  # separable blobs stay separable on a subsample
    # the same seed draws the same rows: the same numbers
    assert classify(train_x, train_y, test_x, test_y, fit_rows=50, seed=4) == r


def test_fit_subsample_is_seeded_bounded_and_without_repeats():
    from pipeline.final.evaluation import fit_subsample

    a = fit_subsample(10_000, 500, 3)
    assert len(a) == 500 and len(np.unique(a)) == 500 and np.all(np.diff(a) > 0) and a.max() < 10_000
    assert np.array_equal(a, fit_subsample(10_000, 500, 3))
    assert not np.array_equal(a, fit_subsample(10_000, 500, 4))
    assert np.array_equal(fit_subsample(20, 500, 3), np.arange(20))


def test_readings_split_into_parts_add_up_to_the_whole():
    rng = np.random.default_rng(3)
    xtr, xte = rng.normal(size=(60, 5)), rng.normal(size=(40, 5))
    ytr, yte = np.arange(60) % 3, np.arange(40) % 3
    whole = classify(xtr, ytr, xte, yte, seed=2, fit_rows=30)
    parts = [classify(xtr, ytr, xte, yte, seed=2, fit_rows=30, readings=part)
             for part in (("clusters",), ("nearest_centroid", "linear_probe"), ("knn",))]
    assert [set(p) - {"subsample"} for p in parts] == [{"kmeans", "gmm"}, {"nearest_centroid", "linear_probe"}, {"knn"}]
    assert {k: v for p in parts for k, v in p.items()} == whole
    with pytest.raises(ValueError, match="probe"):
        classify(xtr, ytr, xte, yte, readings=("probe",))


def _leaked_when_a_thread_leaves_first(outer) -> list:
    """Two threads' ``catch_warnings`` blocks (as each ``classify`` reading opens one), the first left while the
    second is still inside, as two scoring threads can; a ConvergenceWarning raised in the second then.
    Everything under ``outer``; the convergence warnings that got through."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    from pipeline.final.evaluation import _ignore_expected

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with outer:
            first, second = warnings.catch_warnings(), warnings.catch_warnings()
            first.__enter__()
            _ignore_expected()
            second.__enter__()
            _ignore_expected()
            first.__exit__(None, None, None)  # restores the filters as they were before the first entered
            warnings.warn("lbfgs failed to converge", ConvergenceWarning)
            second.__exit__(None, None, None)
    return [w for w in seen if issubclass(w.category, ConvergenceWarning)]


def test_scoring_threads_print_no_expected_warning():
    # Each classify reading silences its expected warnings with catch_warnings, which saves and restores the
    # process's filters: a thread leaving first undoes the other's (the default run printed a capped probe's
    # ConvergenceWarning so). Under expected_warnings_ignored, entered before the threads start, every state a
    # thread restores keeps the filters.
    import contextlib

    from pipeline.final.evaluation import expected_warnings_ignored

    assert len(_leaked_when_a_thread_leaves_first(contextlib.nullcontext())) == 1  # the failure it guards against
    assert _leaked_when_a_thread_leaves_first(expected_warnings_ignored()) == []


def test_knn_metric_cosine_classifies_by_direction():
    # Two classes told apart by direction only; every row's length is noise that swamps Euclidean distances.
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 200)
    angle = np.where(y == 0, 0.0, 0.3) + rng.normal(0, 0.02, len(y))
    x = np.column_stack([np.cos(angle), np.sin(angle)]) * np.exp(rng.uniform(-3, 3, (len(y), 1)))
    tr = np.arange(len(y)) % 20 == 0  # 10 train rows a class: few enough that no same-class row is near by length
    te = ~tr
    acc = {m: classify(x[tr], y[tr], x[te], y[te], knn_metric=m, readings=("knn",))["knn"]["test_accuracy"]
           for m in ("euclidean", "cosine")}
    assert acc["cosine"] == 1.0
    assert acc["euclidean"] < 0.8
