"""Classifiers on frozen embeddings: the final stage's accuracy numbers.

Pure functions of numpy arrays (no store, no Ray). Four readings of one embedding:

- ``nearest_centroid``: scikit-learn's ``NearestCentroid`` on the raw embedding, no scaling, as in
  the seed thesis (GIM vs SFA), so the number is comparable with it. Also per-class accuracy and the
  confusion matrix (rows = true label, columns = predicted, in the order of ``labels``).
- ``linear_probe``: ``LogisticRegression`` on features standardised with the train split's mean and
  std: GIM's linear evaluation of frozen features.
- ``knn``: ``KNeighborsClassifier(k)`` on the raw embedding.
- ``kmeans``: ``KMeans(#classes)`` on the test embeddings alone, scored after matching clusters to
  labels (Hungarian): how much class structure the embedding has without any labels.
- ``gmm``: the same with a ``GaussianMixture(#classes)`` (full covariances) on the test embeddings
  reduced by PCA to at most ``GMM_MAX_DIMS`` dimensions (a full covariance of raw pixels would not fit
  and would be singular), scored with the same Hungarian matching: clusters of any ellipsoidal shape.

A split larger than ``fit_rows`` is subsampled (seeded, without replacement) for the fits whose cost grows
faster than the rows: the probe and kNN are fit on the train subsample (and scored on every test row),
k-means and the mixture cluster the test subsample; nearest centroid uses every row. The result then
says so under ``"subsample"``.

A reading the data cannot give raises or records ``UndefinedMetricError``'s reason instead of failing the
final stage: an empty split or a train split with one class makes the whole classification undefined
(raised, the evaluator reports it), and so does an embedding that is one vector for every train row (a
collapsed module); a test split with no more samples than classes leaves k-means and
the mixture out (each sample could be its own cluster) and names them under ``"undefined"``.
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
from scipy.optimize import linear_sum_assignment

from pipeline.errors import DataError, UndefinedMetricError

__all__ = ["READINGS", "classify", "cluster_accuracy", "expected_warnings_ignored", "fit_subsample", "gmm_cluster_accuracy",
           "standardize"]

GMM_MAX_DIMS = 32
# What ``classify`` computes; ``clusters`` is k-means and the Gaussian mixture (``kmeans``, ``gmm``).
READINGS = ("nearest_centroid", "linear_probe", "knn", "clusters")


def standardize(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """train_x: (N, D), test_x: (M, D) -> both z-scored per dimension with the train split's mean and std.

    A dimension that is constant on the train split is only centred (its std counts as 1).
    """
    mean = train_x.mean(axis=0)
    std = train_x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return (train_x - mean) / std, (test_x - mean) / std


def classify(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    knn_k: int = 5,
    knn_metric: str = "euclidean",
    probe_iters: int = 100,
    seed: int = 0,
    fit_rows: int | None = None,
    readings: tuple[str, ...] = READINGS,
) -> dict:
    """Score one embedding with four classifiers fit on the train split and scored on the test split.

    train_x: (N, D), train_y: (N,), test_x: (M, D), test_y: (M,). Labels may be any sortable values.
    Returns plain Python types (JSON-serialisable), accuracies as floats in [0, 1]::

        {"nearest_centroid": {"train_accuracy", "test_accuracy", "per_class_accuracy": {str(label): acc},
                              "confusion": [[int]], "labels": [label, ...]},
         "linear_probe": {"train_accuracy", "test_accuracy"},
         "knn": {"test_accuracy", "k"},
         "kmeans": {"test_accuracy"},
         "gmm": {"test_accuracy", "dims"},
         "undefined": {"kmeans": reason, "gmm": reason},  # only when clustering is undefined; then no kmeans/gmm
         "subsample": {"rows": {"train", "test"}, "of": {"train", "test"}, "seed"}}  # only when a split > fit_rows

    ``readings`` (a subset of ``READINGS``) computes only those: calls with disjoint subsets return disjoint
    keys (``subsample`` aside, the same in each), whose union is the whole result.
    """
    train_x, train_y = _check_xy(train_x, train_y, "train")
    test_x, test_y = _check_xy(test_x, test_y, "test")
    if train_x.shape[1] != test_x.shape[1]:
        raise DataError(f"train embeddings have {train_x.shape[1]} columns but test embeddings {test_x.shape[1]}",
                        "embed both splits with the same stage of the same run")
    classes = np.unique(train_y)
    if len(classes) < 2:
        raise UndefinedMetricError(f"the train split has {len(classes)} class(es); a classifier needs at least 2",
                                   "select at least two categories (dataset.categories)")
    fit_tr = fit_subsample(len(train_x), fit_rows, seed)
    fit_te = fit_subsample(len(test_x), fit_rows, seed + 1)
    fx, fy = train_x[fit_tr], train_y[fit_tr]
    if len(np.unique(fy)) < 2:  # a rare class left out by the draw: fit on every row rather than fail
        fit_tr, fx, fy = np.arange(len(train_x)), train_x, train_y
    unknown = set(readings) - set(READINGS)
    if unknown:
        raise ValueError(f"unknown readings {sorted(unknown)}; known: {READINGS}")
    result = {}
    if "nearest_centroid" in readings:
        result["nearest_centroid"] = _nearest_centroid(train_x, train_y, test_x, test_y)
    if "linear_probe" in readings:
        result["linear_probe"] = _linear_probe(fx, fy, test_x, test_y, probe_iters, seed)
    if "knn" in readings:
        result["knn"] = _knn(fx, fy, test_x, test_y, knn_k, knn_metric)
    if "clusters" in readings:
        result.update(_clusterings(test_x[fit_te], test_y[fit_te], seed))
    if len(fit_tr) < len(train_x) or len(fit_te) < len(test_x):
        result["subsample"] = {"rows": {"train": len(fit_tr), "test": len(fit_te)},
                               "of": {"train": len(train_x), "test": len(test_x)}, "seed": int(seed)}
    return result


def fit_subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted row indices of a seeded draw of at most ``limit`` of ``n`` rows without replacement (all when n <= limit)."""
    if limit is None or n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, n]).choice(n, size=limit, replace=False))


def _nearest_centroid(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> dict:
    """Train/test accuracy, per-class test accuracy and the confusion matrix of sklearn's NearestCentroid."""
    from sklearn.metrics import confusion_matrix
    from sklearn.neighbors import NearestCentroid

    labels = np.unique(np.concatenate([train_y, test_y]))
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        _ignore_expected()
        nc = NearestCentroid().fit(train_x, train_y)
    nc_test = nc.predict(test_x)
    return {
        "train_accuracy": _accuracy(nc.predict(train_x), train_y),
        "test_accuracy": _accuracy(nc_test, test_y),
        "per_class_accuracy": {str(_plain(label)): _accuracy(nc_test[test_y == label], label) for label in np.unique(test_y)},
        "confusion": confusion_matrix(test_y, nc_test, labels=labels).astype(int).tolist(),
        "labels": [_plain(v) for v in labels],
    }


def _knn(train_x, train_y, test_x, test_y, k: int, metric: str) -> dict:
    """Test accuracy of ``KNeighborsClassifier(k, metric=metric)`` (k capped at the train rows)."""
    from sklearn.neighbors import KNeighborsClassifier

    k = int(min(k, len(train_x)))
    knn = KNeighborsClassifier(n_neighbors=k, metric=metric).fit(train_x, train_y)
    return {"test_accuracy": _accuracy(knn.predict(test_x), test_y), "k": k}


def _linear_probe(train_x, train_y, test_x, test_y, probe_iters: int, seed: int) -> dict:
    """Train and test accuracy of LogisticRegression on features standardised with the train split's statistics."""
    from sklearn.linear_model import LogisticRegression

    train_s, test_s = standardize(train_x, test_x)
    probe = LogisticRegression(max_iter=probe_iters, random_state=seed)
    with warnings.catch_warnings():
        _ignore_expected()
        probe.fit(train_s, train_y)
    return {"train_accuracy": float(probe.score(train_s, train_y)), "test_accuracy": float(probe.score(test_s, test_y))}


def _clusterings(test_x, test_y, seed: int) -> dict:
    """k-means and Gaussian-mixture accuracy on the test split, or both named under ``undefined`` with why."""
    from sklearn.cluster import KMeans

    n_clusters = len(np.unique(test_y))
    if len(test_x) <= n_clusters:
        why = (f"the test split has {len(test_x)} sample(s) for {n_clusters} class(es): every sample could be its "
               "own cluster, so clustering accuracy is undefined")
        return {"undefined": {"kmeans": why, "gmm": why}}
    km = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit(test_x)
    return {"kmeans": {"test_accuracy": cluster_accuracy(test_y, km.labels_)},
            "gmm": gmm_cluster_accuracy(test_x, test_y, n_clusters, seed=seed)}


def gmm_cluster_accuracy(x: np.ndarray, y: np.ndarray, n_clusters: int, *, seed: int = 0,
                         max_dims: int = GMM_MAX_DIMS) -> dict:
    """Gaussian-mixture clustering accuracy of x: (N, D) against labels y: (N,), Hungarian-matched.

    x is centred and projected on its first min(max_dims, D, N - 1) principal components, then a
    ``GaussianMixture(n_clusters, covariance_type="full")`` (k-means initialised, 2 restarts, a small ridge
    on the covariances) assigns each row to its most likely component. Returns {"test_accuracy", "dims"}.
    """
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    x = np.asarray(x, dtype=np.float64)
    dims = int(max(1, min(max_dims, x.shape[1], len(x) - 1)))
    if dims < x.shape[1]:
        x = PCA(n_components=dims, random_state=seed).fit_transform(x)
    # Scale-free ridge: the embeddings' scale varies by orders of magnitude between objectives.
    reg = 1e-6 * max(float(x.var(axis=0).mean()), 1e-12)
    gmm = GaussianMixture(n_components=n_clusters, covariance_type="full", n_init=2, reg_covar=reg, random_state=seed)
    with warnings.catch_warnings():
        _ignore_expected()
        pred = gmm.fit_predict(x)
    return {"test_accuracy": cluster_accuracy(y, pred), "dims": dims}


def cluster_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Accuracy of cluster ids ``y_pred`` against labels ``y_true`` (both (N,)) under the best one-to-one map.

    The map is the Hungarian assignment (``scipy.optimize.linear_sum_assignment``) on the
    cluster x label contingency table; with more clusters than labels the extra clusters count as wrong.
    """
    y_true = np.asarray(y_true).reshape(-1)
    y_pred = np.asarray(y_pred).reshape(-1)
    if len(y_true) != len(y_pred):
        raise DataError(f"cluster_accuracy got {len(y_true)} labels but {len(y_pred)} cluster ids",
                        "pass one cluster id per labelled sample")
    if len(y_true) == 0:
        return 0.0
    _, t = np.unique(y_true, return_inverse=True)
    _, p = np.unique(y_pred, return_inverse=True)
    table = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)  # (clusters, labels)
    np.add.at(table, (p, t), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / len(y_true))


@contextlib.contextmanager
def expected_warnings_ignored():
    """The warnings ``classify`` expects and ignores, ignored for the whole block: for callers that run it in
    threads. ``warnings.catch_warnings`` saves and restores the process's filters, so a thread leaving it can
    undo another's that is still inside (a capped probe's ConvergenceWarning reached the terminal that way);
    set here before the threads start, these filters are in every state the threads save and restore."""
    with warnings.catch_warnings():
        _ignore_expected()
        yield


def _ignore_expected() -> None:
    from sklearn.exceptions import ConvergenceWarning

    # Constant pixels within a class (digits' borders) or a unit that is zero for every row (a dead ReLU): sklearn
    # warns, and divides 0 by 0 in its shrinkage deviations, which prediction without shrink_threshold never uses.
    warnings.filterwarnings("ignore", message=".*within_class_std_dev_", category=UserWarning)
    # The probe's iterations are capped (``probe_iters``) and the mixture's EM may stop early: the protocol.
    warnings.simplefilter("ignore", ConvergenceWarning)


# ---------------------------------------------------------------- helpers


def _check_xy(x, y, split: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y).reshape(-1)
    if x.ndim != 2:
        raise DataError(f"{split} embeddings have shape {x.shape}; expected (samples, features)",
                        "pool or flatten each sample's activations into one vector first")
    if len(x) == 0:
        raise UndefinedMetricError(f"the {split} split is empty, so classification is undefined",
                                   "check dataset.split and the subset selected in the config")
    if len(x) != len(y):
        raise DataError(f"{split} split: {len(x)} embeddings but {len(y)} labels", "pass one label per embedding row")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{split} embeddings contain NaN or inf",
                        "a module diverged: lower its lr or re-train it (`isostack retrain RUN --module NAME`)")
    if split == "train" and np.all(np.ptp(x, axis=0) == 0):  # scikit-learn's nearest centroid: "division by zero"
        raise UndefinedMetricError(
            f"every train embedding is the same vector ({x.shape[1]} features, none varying): the module's output "
            "collapsed to one point, so no classifier can tell the classes apart",
            "re-train that module with a lower lr or another objective (`isostack retrain RUN --module NAME`)")
    return x, y


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(pred == y))


def _plain(v):
    """A numpy scalar as the Python scalar json can write."""
    return v.item() if isinstance(v, np.generic) else v
