"""The final stage's figures, drawn with matplotlib's Agg backend (no display needed).

Each function takes arrays or plain dicts, writes one PNG and returns its path. Embeddings with more
than three columns are projected to 3-D: the class scatter with PCA (axes PC1..PC3), the pose figure by
default with a spectral embedding (Laplacian eigenmaps of the points' nearest-neighbour graph, axes S1..S3),
which unrolls a curved pose manifold that a linear projection flattens into a cloud; see ``project_3d``.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # before pyplot: workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["accuracy_by_depth", "class_scatter", "confusion_matrix_plot", "loss_curves", "pose_projection", "pose_views",
           "project_3d"]

# (title, elevation, azimuth) of the camera for matplotlib's 3-D axes.
_VIEWS = (("oblique", 25, -60), ("top (axes 1-2)", 90, -90), ("side (axes 1-3)", 0, -90))
_DPI = 110
# Neighbours a point joins in the graph the pose figure's spectral embedding is made of (``project_3d``).
SPECTRAL_NEIGHBOURS = 10


def pose_views(emb3, azimuth, elevation, path: str, *, max_points: int = 6000, seed: int = 0,
               projected: tuple[np.ndarray, str] | None = None) -> str:
    """A 2x3 figure: oblique, top and side views of the 3-D embedding; row 1 coloured by azimuth
    (cyclic 'twilight' map, so 0 and 340 degrees look alike as they should), row 2 by elevation.

    emb3: (N, D), azimuth and elevation (N,) in degrees. At most ``max_points`` points (a fixed random
    subset) are drawn, so dense test sets stay readable. ``projected``: how more than 3 columns are drawn, a
    ``project_3d`` result of all N rows (the evaluator's, under ``evaluate.pose_projection``); by default their
    spectral view.
    """
    (xyz, how), keep = _to_3d(projected or project_3d(emb3, "spectral", seed), max_points, seed)
    az, el = np.asarray(azimuth, dtype=float)[keep], np.asarray(elevation, dtype=float)[keep]
    fig = plt.figure(figsize=(14, 9))
    fig.subplots_adjust(left=0.02, right=0.88, top=0.93, bottom=0.03, wspace=0.15, hspace=0.12)
    size = _marker_size(len(xyz))
    el_range = (float(el.min()), float(el.max())) if el.max() > el.min() else (None, None)
    rows = (("azimuth (deg)", az % 360, "twilight", (0.0, 360.0)), ("elevation (deg)", el, "viridis", el_range))
    for r, (name, values, cmap, (lo, hi)) in enumerate(rows):
        for c, (view, ve, va) in enumerate(_VIEWS):
            ax = fig.add_subplot(2, 3, 3 * r + c + 1, projection="3d")
            sc = ax.scatter(xyz[:, 0], xyz[:, 1], xyz[:, 2], c=values, cmap=cmap, vmin=lo, vmax=hi,
                            s=size, alpha=0.8, linewidths=0, depthshade=False)
            ax.view_init(elev=ve, azim=va)
            ax.set_title(f"{view}, colour = {name.split()[0]}", fontsize=10)
            _label_axes(ax, view, how)
        box = ax.get_position()  # one colour bar per row, in the margin right of the row's last panel
        cbar = fig.colorbar(sc, cax=fig.add_axes((0.9, box.y0 + 0.1 * box.height, 0.012, 0.8 * box.height)))
        cbar.set_label(name)
        if r == 0:
            cbar.set_ticks([0, 90, 180, 270, 360])
    fig.suptitle(f"pose embedding ({len(xyz)} test samples{_projection_note(emb3, how)})")
    return _save(fig, path)


def class_scatter(emb, labels, class_names, path: str, *, max_points: int = 6000, seed: int = 0) -> str:
    """One 3-D scatter (oblique view), one colour and legend entry per class; labels index class_names."""
    (xyz, how), keep = _to_3d(project_3d(emb, "pca", seed), max_points, seed)
    labels = np.asarray(labels)[keep]
    fig = plt.figure(figsize=(8, 7))
    ax = fig.add_subplot(1, 1, 1, projection="3d")
    cmap = plt.get_cmap("tab10" if len(np.unique(labels)) <= 10 else "tab20")
    for i, label in enumerate(np.unique(labels)):
        m = labels == label
        ax.scatter(xyz[m, 0], xyz[m, 1], xyz[m, 2], s=_marker_size(len(xyz)), alpha=0.7, linewidths=0, depthshade=False,
                   color=cmap(i % cmap.N), label=_class_name(label, class_names))
    ax.view_init(elev=25, azim=-60)
    _label_axes(ax, "oblique", how)
    ax.legend(loc="upper left", fontsize=8, markerscale=2.5, frameon=False)
    ax.set_title(f"embedding by class ({len(xyz)} test samples{_projection_note(emb, how)})")
    return _save(fig, path)


def confusion_matrix_plot(confusion, class_names, path: str, *, labels=None) -> str:
    """Counts (rows = true, columns = predicted), coloured by the row's fraction so classes of any size compare.

    ``labels`` (optional) gives the label of each row/column (``classify``'s ``labels``); otherwise row i
    is ``class_names[i]`` when the sizes agree and ``i`` when they do not.
    """
    cm = np.asarray(confusion, dtype=float)
    n = len(cm)
    if labels is None:
        labels = list(range(n))
        names = list(class_names) if class_names is not None and len(class_names) == n else [str(i) for i in labels]
    else:
        names = [_class_name(v, class_names) for v in labels]
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.6 * n
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                        color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"nearest centroid, test (accuracy {acc:.1%})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).set_label("fraction of the true class")
    return _save(fig, path)


def loss_curves(curves: dict[str, dict], path: str) -> str:
    """One panel per module: training (and, where recorded, held-out) loss by epoch, a dotted line where its
    upstream version changed (labelled where the labels do not overlap).

    curves[module] = {"epoch": [...], "loss": [...], "switches": [(epoch, version), ...]}; a switch is
    drawn only where the version differs from the previous one (the first version is written in the title).
    """
    names = list(curves) or ["(no curves)"]
    # constrained layout: each panel's title clears the panel above it
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.4 * len(names) + 0.6), squeeze=False, sharex=True,
                             layout="constrained")
    for ax, name in zip(axes[:, 0], names):
        c = curves.get(name, {})
        ax.plot(c.get("epoch", []), c.get("loss", []), marker="o", ms=3, lw=1.5, color="tab:blue", label="train")
        if c.get("heldout_loss"):  # where the objective reports a loss on held-out samples
            ax.plot(c["heldout_epoch"], c["heldout_loss"], marker="s", ms=3, lw=1.5, color="tab:orange", label="held out")
            ax.legend(fontsize=8, loc="upper right")
        changes = _version_changes(c.get("switches", []))
        first = f" (upstream v{changes[0][1]} first)" if changes else ""
        epochs = c.get("epoch") or [0, 1]
        min_gap = 0.04 * max(max(epochs) - min(epochs), 1)  # labels closer than this would overlap: skip them
        last = -math.inf
        for epoch, version in changes[1:]:
            ax.axvline(epoch, ls=":", color="tab:gray", lw=1)
            if epoch - last >= min_gap:
                ax.annotate(f"v{version}", (epoch, 1.0), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                            color="tab:gray", ha="left", va="top", xytext=(2, -2), textcoords="offset points")
                last = epoch
        ax.set_title(f"{name}{first}", fontsize=10, loc="left")
        ax.set_ylabel("loss")
        ax.ticklabel_format(axis="y", useOffset=False)  # no "1e-5+7.271" offset text over the next panel's title
        ax.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("epoch (dotted: switched to a newer upstream version)")
    return _save(fig, path)


def accuracy_by_depth(rows: list[dict], path: str) -> str:
    """Test accuracy of each classifier by module depth, raw pixels (rows with depth 0) as dashed lines.

    rows = [{"module": "m1", "depth": 1, "nearest_centroid": 0.7, "linear_probe": 0.8, "knn": 0.75}, ...].
    """
    metrics = (("nearest_centroid", "nearest centroid", "tab:blue"), ("linear_probe", "linear probe", "tab:orange"),
               ("knn", "kNN", "tab:green"), ("kmeans", "k-means", "tab:red"), ("gmm", "Gaussian mixture", "tab:purple"))
    stack = sorted((r for r in rows if r.get("depth", 0) > 0), key=lambda r: r["depth"])
    base = [r for r in rows if r.get("depth", 0) == 0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    depths = [r["depth"] for r in stack]
    for key, name, colour in metrics:
        if stack and all(key in r for r in stack):
            ax.plot(depths, [r[key] for r in stack], marker="o", color=colour, label=name)
        if base and key in base[0]:
            ax.axhline(base[0][key], ls="--", lw=1, color=colour, label=f"{name}, raw pixels")
    if stack:
        ax.set_xticks(depths, [f"{r['depth']}\n{r.get('module', '')}" for r in stack])
    ax.set_xlabel("module depth")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("accuracy by depth")
    return _save(fig, path)


# ---------------------------------------------------------------- helpers


def pose_projection(setting: str, objects: np.ndarray) -> str:
    """The ``project_3d`` method for ``evaluate.pose_projection`` over rows of these objects (one id per row):
    ``auto`` is spectral for one object's poses (one manifold), PCA for several (a neighbour graph's smoothest
    functions then tell the objects apart before any pose: arms, one per cluster of objects)."""
    if setting != "auto":
        return setting
    return "spectral" if len(np.unique(objects)) == 1 else "pca"


def project_3d(emb, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, str]:
    """(N, D) -> ((N, 3) coordinates, how they were made: "", "PCA" or "spectral").

    Three or fewer columns: the embedding itself ("", zero-padded to 3). More: ``method`` "pca", the first three
    principal components; "spectral", scikit-learn's SpectralEmbedding (Laplacian eigenmaps, Belkin & Niyogi
    2003) of the points' ``SPECTRAL_NEIGHBOURS``-nearest-neighbour graph: the three smoothest functions on the
    graph, so a closed ring of poses curled through 64 dimensions comes out as a ring (the eigenfunctions SFA's
    slow features approximate; the scale of the axes carries no meaning). It uses no labels. A graph that falls
    apart into pieces (separate objects) has no one such map, so it and too few points get PCA instead.
    """
    if method not in ("pca", "spectral"):
        raise ValueError(f"projection {method!r}: expected 'pca' or 'spectral'")
    x = np.asarray(emb, dtype=np.float64)
    x = x.reshape(len(x), -1)
    how = ""
    if x.shape[1] > 3 and len(x) >= 3:
        spectral = _spectral(x, seed) if method == "spectral" else None
        if spectral is not None:
            x, how = spectral, "spectral"
        else:
            from sklearn.decomposition import PCA

            x, how = PCA(n_components=3, random_state=seed).fit_transform(x), "PCA"
    elif x.shape[1] > 3:
        x = x[:, :3]
    if x.shape[1] < 3:  # pad a 1-D or 2-D embedding with zeros so every view still draws
        x = np.pad(x, ((0, 0), (0, 3 - x.shape[1])))
    return x, how


def _spectral(x: np.ndarray, seed: int) -> np.ndarray | None:
    """SpectralEmbedding's 3-D coordinates of the points' symmetrised ``SPECTRAL_NEIGHBOURS``-NN graph (the graph its
    ``nearest_neighbors`` affinity builds, built once here), or None where there is no one such map: too few points,
    a graph in pieces, or an eigensolver that gives none (a figure never fails a run)."""
    if len(x) <= SPECTRAL_NEIGHBOURS + 1:
        return None
    from scipy.sparse.csgraph import connected_components
    from scipy.sparse.linalg import ArpackError
    from sklearn.manifold import SpectralEmbedding
    from sklearn.neighbors import kneighbors_graph

    graph = kneighbors_graph(x, SPECTRAL_NEIGHBOURS, include_self=True)
    graph = 0.5 * (graph + graph.T)
    if connected_components(graph, directed=False)[0] != 1:
        return None
    try:
        y = SpectralEmbedding(n_components=3, affinity="precomputed", random_state=seed).fit_transform(graph)
    except (ArpackError, ValueError, np.linalg.LinAlgError):  # ArpackNoConvergence is an ArpackError
        return None
    return y if np.isfinite(y).all() else None


def _to_3d(projected: tuple[np.ndarray, str], max_points: int, seed: int) -> tuple[tuple[np.ndarray, str], np.ndarray]:
    """(a ``project_3d`` result restricted to at most max_points rows, the row indices kept)."""
    x, how = projected
    keep = np.arange(len(x))
    if len(x) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), max_points, replace=False))
    return (x[keep], how), keep


def _marker_size(n: int) -> float:
    return float(np.clip(3000.0 / max(n, 1), 2.0, 16.0))  # bigger dots when few, so sparse sets stay visible


def _projection_note(emb, how: str) -> str:
    d = int(np.prod(np.shape(emb)[1:]))
    if how == "spectral":
        return f", spectral embedding {d} -> 3 of the {SPECTRAL_NEIGHBOURS}-NN graph"
    return f", PCA {d} -> 3" if how else ""


def _label_axes(ax, view: str, how: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_proj_type("ortho")  # top and side views then show true proportions, no perspective
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_major_locator(MaxNLocator(4))
    names = {"PCA": ("PC1", "PC2", "PC3"), "spectral": ("S1", "S2", "S3")}.get(how, ("e0", "e1", "e2"))
    ax.set_xlabel(names[0], fontsize=8, labelpad=-2)
    ax.set_ylabel(names[1], fontsize=8, labelpad=-2)
    ax.set_zlabel(names[2], fontsize=8, labelpad=-4)
    ax.tick_params(labelsize=6, pad=0)
    if view.startswith("top"):
        ax.set_zticks([])
        ax.set_zlabel("")
    elif view.startswith("side"):
        ax.set_yticks([])
        ax.set_ylabel("")


def _class_name(label, class_names) -> str:
    try:
        i = int(label)
    except (TypeError, ValueError):
        return str(label)
    if class_names is not None and 0 <= i < len(class_names):
        return str(class_names[i])
    return str(label)


def _version_changes(switches) -> list[tuple[float, int]]:
    out: list[tuple[float, int]] = []
    for epoch, version in sorted(switches, key=lambda s: s[0]):
        if not out or version != out[-1][1]:
            out.append((epoch, version))
    return out


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return str(path)
