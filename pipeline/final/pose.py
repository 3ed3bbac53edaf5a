"""How well an embedding keeps an object's pose: pure functions of numpy arrays.

Angles are in degrees as the store holds them (small-NORB: azimuth 0..340 in steps of 20,
elevation 30..70 in steps of 5). Three readings, all on held-out samples:

- kNN regression: azimuth as the circular mean of the k nearest train samples' azimuths, elevation as
  their mean; mean absolute error in degrees (circular for azimuth).
- ridge R²: a linear read-out of (cos az, sin az, elevation) from the embedding.
- trustworthiness (Venna & Kaski 2001) of the embedding against the ground-truth pose distance
  ``|Δ elevation index| + circular |Δ azimuth index|``, within each object, lighting ignored.

A reading the data cannot give (a test split with one sample per object has no neighbours to rank; one
pose everywhere has no variance to explain) raises ``UndefinedMetricError``; ``pose_metrics`` reports it
as ``None`` with the reason, so the final stage of a trained run never fails on it.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import DataError, UndefinedMetricError

__all__ = [
    "circular_error_deg",
    "knn_pose_errors",
    "pose_distance",
    "pose_metrics",
    "pose_trustworthiness",
    "ridge_pose_r2",
]

AZIMUTH_STEP_DEG = 20.0
ELEVATION_STEP_DEG = 5.0


def circular_error_deg(a, b) -> np.ndarray:
    """Smallest angle between a and b (degrees, broadcastable): min(|a-b| mod 360, 360 - that), in [0, 180]."""
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) % 360.0
    return np.minimum(d, 360.0 - d)


def knn_pose_errors(train_emb, train_az, train_el, test_emb, test_az, test_el, k: int = 5,
                    metric: str = "euclidean") -> dict:
    """Mean absolute azimuth (circular) and elevation error, in degrees, of kNN pose regression.

    train_emb: (N, D), test_emb: (M, D); angles (N,) / (M,) in degrees. Returns
    ``{"azimuth_mae_deg": float, "elevation_mae_deg": float}``. ``metric`` as ``knn_pose_predict``'s.
    """
    az_pred, el_pred = knn_pose_predict(train_emb, train_az, train_el, test_emb, k=k, metric=metric)
    return {
        "azimuth_mae_deg": float(circular_error_deg(az_pred, test_az).mean()),
        "elevation_mae_deg": float(np.abs(el_pred - np.asarray(test_el, dtype=np.float64)).mean()),
    }


def knn_pose_predict(train_emb, train_az, train_el, test_emb, k: int = 5,
                     metric: str = "euclidean") -> tuple[np.ndarray, np.ndarray]:
    """kNN pose regression: predicted azimuth (circular mean, [0, 360)) and elevation, degrees, (M,) each.

    ``metric``: scikit-learn's name of the distance the neighbours are found by ("euclidean", "cosine", ...).
    """
    from sklearn.neighbors import NearestNeighbors

    train_emb, test_emb = _check_emb(train_emb, "train"), _check_emb(test_emb, "test")
    k = int(min(k, len(train_emb)))
    idx = NearestNeighbors(n_neighbors=k, metric=metric).fit(train_emb).kneighbors(test_emb, return_distance=False)  # (M, k)
    az = np.radians(np.asarray(train_az, dtype=np.float64))[idx]
    # Circular mean: the direction of the mean unit vector (a plain mean of 350 and 10 would say 180).
    az_pred = np.degrees(np.arctan2(np.sin(az).mean(axis=1), np.cos(az).mean(axis=1))) % 360.0
    el_pred = np.asarray(train_el, dtype=np.float64)[idx].mean(axis=1)
    return az_pred, el_pred


def ridge_pose_r2(train_emb, train_az, train_el, test_emb, test_az, test_el, *, alpha: float = 1.0) -> float:
    """Test R² of a ridge read-out of (cos az, sin az, elevation) from the standardised embedding.

    Targets are standardised with the train split's statistics so the three get equal weight in the
    averaged R² (elevation in degrees would otherwise dwarf cos/sin). 1 = pose is linear in the embedding,
    about 0 (or below) = no linear pose information. Only targets that vary on the test split are averaged
    (R² of a constant is undefined); none varying, or fewer than 2 test samples, raises UndefinedMetricError.
    """
    from sklearn.linear_model import Ridge
    from sklearn.metrics import r2_score
    from sklearn.preprocessing import StandardScaler

    train_emb, test_emb = _check_emb(train_emb, "train"), _check_emb(test_emb, "test")
    y_test = _pose_targets(test_az, test_el)  # (M, 3)
    varies = np.ptp(y_test, axis=0) > 1e-9 if len(y_test) >= 2 else np.zeros(3, dtype=bool)
    if not varies.any():
        raise UndefinedMetricError(f"the {len(y_test)} test sample(s) share one pose, so ridge R² is undefined",
                                   "select several azimuths or elevations (dataset.azimuths, dataset.elevations)")
    x_scale = StandardScaler().fit(train_emb)
    y_scale = StandardScaler().fit(_pose_targets(train_az, train_el))
    model = Ridge(alpha=alpha).fit(x_scale.transform(train_emb), y_scale.transform(_pose_targets(train_az, train_el)))
    pred = model.predict(x_scale.transform(test_emb))  # (M, 3)
    return float(r2_score(y_scale.transform(y_test)[:, varies], pred[:, varies], multioutput="uniform_average"))


def pose_distance(az, el, *, az_step: float = AZIMUTH_STEP_DEG, el_step: float = ELEVATION_STEP_DEG) -> np.ndarray:
    """(n, n) ground-truth pose distance in grid steps: |Δ elevation index| + circular |Δ azimuth index|."""
    n_az = int(round(360.0 / az_step))
    a = np.rint(np.asarray(az, dtype=np.float64) / az_step).astype(np.int64) % n_az
    e = np.rint(np.asarray(el, dtype=np.float64) / el_step).astype(np.int64)
    da = np.abs(a[:, None] - a[None, :])
    return np.abs(e[:, None] - e[None, :]) + np.minimum(da, n_az - da)


def pose_trustworthiness(emb, az, el, instance, k: int = 5, *, label=None,
                         az_step: float = AZIMUTH_STEP_DEG, el_step: float = ELEVATION_STEP_DEG) -> float:
    """Trustworthiness of the embedding against ground-truth pose distance, per object, count-weighted.

    emb: (N, D); az, el: (N,) degrees; instance: (N,) object ids. Where instance ids repeat across
    categories (small-NORB numbers instances within a category) pass ``label`` too, so an object is
    (label, instance). Objects with fewer than 3 samples are skipped; in smaller objects k is lowered to
    stay below half their size (trustworthiness is undefined beyond).
    """
    emb = _check_emb(emb, "pose")
    az, el = np.asarray(az, dtype=np.float64), np.asarray(el, dtype=np.float64)
    keys = np.asarray(instance).reshape(-1, 1)
    if label is not None:
        keys = np.column_stack([np.asarray(label).reshape(-1), keys.reshape(-1)])
    _, group = np.unique(keys, axis=0, return_inverse=True)
    group = group.reshape(-1)
    total, weight = 0.0, 0
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        k_g = min(int(k), (len(rows) - 1) // 2)
        if k_g < 1:
            continue
        d_pose = pose_distance(az[rows], el[rows], az_step=az_step, el_step=el_step)
        total += len(rows) * trustworthiness_from_distances(d_pose, emb[rows], k_g)
        weight += len(rows)
    if weight == 0:
        raise UndefinedMetricError(
            f"no object in the pose split has 3 or more samples (largest: {np.bincount(group).max()}), "
            "so trustworthiness is undefined",
            "select more azimuths/elevations (dataset.azimuths, dataset.elevations) for the test split")
    return float(total / weight)


def trustworthiness_from_distances(d_orig: np.ndarray, emb: np.ndarray, k: int) -> float:
    """Venna & Kaski trustworthiness of ``emb`` (n, D) against an original-space distance matrix (n, n).

    T(k) = 1 - 2 / (n k (2n - 3k - 1)) * sum_i sum_{j in kNN_emb(i)} max(0, r(i, j) - k), where r(i, j)
    is j's rank among i's neighbours in the original space. Unlike
    ``sklearn.manifold.trustworthiness(metric="precomputed")`` ties count in j's favour:
    r = 1 + #{l != i : d(i, l) < d(i, j)}. Pose distances are small integers with many ties, and
    sklearn's argsort would break them arbitrarily and penalise an exact grid embedding. Without ties
    the two agree.
    """
    n = len(d_orig)
    if not 1 <= k < n / 2:
        raise DataError(f"trustworthiness needs 1 <= k < n/2, got k={k} for n={n}", "lower evaluate.knn_k")
    d_orig = np.asarray(d_orig, dtype=np.float64)
    emb = np.asarray(emb, dtype=np.float64)
    sq = (emb * emb).sum(axis=1)
    d_emb = sq[:, None] + sq[None, :] - 2.0 * emb @ emb.T  # (n, n) squared Euclidean
    np.fill_diagonal(d_emb, np.inf)
    nbrs = np.argpartition(d_emb, k - 1, axis=1)[:, :k]  # (n, k) embedding neighbours, self excluded
    d_off = d_orig.copy()
    np.fill_diagonal(d_off, np.inf)  # self is never a neighbour in the original space either
    d_sorted = np.sort(d_off, axis=1)  # (n, n), self last
    penalty = 0.0
    for start in range(0, n, 256):  # rows in blocks bound the (b, k, n) comparison
        stop = min(start + 256, n)
        d_ij = np.take_along_axis(d_off[start:stop], nbrs[start:stop], axis=1)  # (b, k)
        rank = 1 + (d_sorted[start:stop, None, :] < d_ij[:, :, None]).sum(axis=2)  # (b, k)
        penalty += np.maximum(rank - k, 0).sum()
    return float(1.0 - 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0)) * penalty)


def pose_metrics(train_emb, train_az, train_el, test_emb, test_az, test_el, instance_test, k: int = 5,
                 *, label_test=None, metric: str = "euclidean") -> dict:
    """The summary's ``pose`` section: kNN errors (degrees), ridge R² and trustworthiness on the test split.

    Returns ``{"azimuth_mae_deg", "elevation_mae_deg", "ridge_r2", "trustworthiness"}`` as floats; a
    metric the data cannot give is ``None`` and its reason is under ``"undefined"`` (present only then).
    ``label_test`` (optional) makes objects (label, instance) for trustworthiness; see ``pose_trustworthiness``.
    ``metric`` is the kNN regression's (``knn_pose_predict``); ridge and trustworthiness read the rows as they are.
    """
    readings = {
        ("azimuth_mae_deg", "elevation_mae_deg"):
            lambda: knn_pose_errors(train_emb, train_az, train_el, test_emb, test_az, test_el, k=k, metric=metric),
        ("ridge_r2",): lambda: {"ridge_r2": ridge_pose_r2(train_emb, train_az, train_el, test_emb, test_az, test_el)},
        ("trustworthiness",): lambda: {"trustworthiness": pose_trustworthiness(
            test_emb, test_az, test_el, instance_test, k=k, label=label_test)},
    }
    out: dict = {}
    undefined: dict[str, str] = {}
    for keys, reading in readings.items():
        try:
            out.update(reading())
        except UndefinedMetricError as e:
            out.update(dict.fromkeys(keys))
            undefined.update(dict.fromkeys(keys, e.cause))
    if undefined:
        out["undefined"] = undefined
    return out


# ---------------------------------------------------------------- helpers


def _pose_targets(az, el) -> np.ndarray:
    rad = np.radians(np.asarray(az, dtype=np.float64))
    return np.column_stack([np.cos(rad), np.sin(rad), np.asarray(el, dtype=np.float64)])  # (N, 3)


def _check_emb(x, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise DataError(f"{what} embeddings have shape {x.shape}; expected a (samples, features) array",
                        "pool each sample's activations into one vector")
    if len(x) == 0:
        raise UndefinedMetricError(f"the {what} split is empty, so pose metrics are undefined",
                                   "check dataset.split and the subset selected in the config")
    return x
