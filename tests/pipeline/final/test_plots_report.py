"""Figures are real PNGs; the report is one self-contained, escaped, parseable HTML file."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import pytest

from pipeline.final import plots
from pipeline.final.evaluation import classify
from pipeline.final.report import render_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == PNG_MAGIC


@pytest.fixture
def ring_pose():
    az, el = np.meshgrid(np.arange(0, 360, 20.0), np.arange(30, 75, 5.0), indexing="ij")
    az, el = az.ravel(), el.ravel()
    r = np.radians(az)
    return np.column_stack([np.cos(r), np.sin(r), (el - 50) / 20, np.zeros_like(r)]), az, el


def test_pose_views_png(tmp_path, ring_pose):
    emb, az, el = ring_pose
    assert is_png(plots.pose_views(emb, az, el, str(tmp_path / "pose.png")))  # 4 columns: projected to 3-D
    assert is_png(plots.pose_views(emb[:, :2], az, el, str(tmp_path / "pose2.png")))  # 2 columns: padded


def _centroid_ring(xyz, az) -> float:
    """Fraction of azimuth centroids whose two nearest other centroids are its two azimuth neighbours."""
    values = np.unique(az)
    c = np.stack([xyz[az == v].mean(axis=0) for v in values])
    d = np.linalg.norm(c[:, None] - c[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    n = len(values)
    return float(np.mean([set(np.argsort(d[i])[:2]) == {(i - 1) % n, (i + 1) % n} for i in range(n)]))


def test_spectral_projection_unrolls_a_ring_curled_through_many_dimensions(ring_pose):
    _, az, el = ring_pose
    r = np.radians(az)
    rng = np.random.default_rng(0)
    # a cylinder of poses bent through 64 dimensions by random Fourier features: no 3 directions hold the ring
    w, b = rng.normal(scale=3.0, size=(3, 64)), rng.uniform(0, 2 * np.pi, 64)
    emb = np.sin(np.column_stack([np.cos(r), np.sin(r), (el - 50) / 20]) @ w + b)
    xyz, how = plots.project_3d(emb, "spectral")
    assert how == "spectral" and xyz.shape == (len(az), 3)
    assert _centroid_ring(xyz, az) == 1.0
    pca, how = plots.project_3d(emb, "pca")
    assert how == "PCA" and _centroid_ring(pca, az) < 1.0  # the linear view tangles the same ring


def test_spectral_projection_falls_back_to_pca_when_the_graph_is_in_pieces():
    rng = np.random.default_rng(0)
    two_objects = np.concatenate([rng.normal(size=(40, 8)), rng.normal(size=(40, 8)) + 100.0])
    xyz, how = plots.project_3d(two_objects, "spectral")
    assert how == "PCA" and xyz.shape == (80, 3)
    assert plots.project_3d(two_objects[:5], "spectral")[1] == "PCA"  # too few points for a 10-NN graph
    assert plots.project_3d(two_objects[:, :2], "spectral")[1] == ""  # narrow enough to draw as it is
    collapsed, _ = plots.project_3d(np.ones((50, 8)), "spectral")  # a dead embedding still draws
    assert collapsed.shape == (50, 3) and np.isfinite(collapsed).all()
    with pytest.raises(ValueError, match="expected 'pca' or 'spectral'"):
        plots.project_3d(two_objects, "tsne")


def test_auto_projection_is_spectral_for_one_object_only():
    assert plots.pose_projection("auto", np.zeros(30, dtype=np.int64)) == "spectral"
    assert plots.pose_projection("auto", np.repeat([0, 1], 15)) == "pca"  # objects split a neighbour graph first
    assert plots.pose_projection("spectral", np.repeat([0, 1], 15)) == "spectral"  # a setting is kept
    assert plots.pose_projection("pca", np.zeros(30, dtype=np.int64)) == "pca"


def test_other_plots_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    emb = rng.normal(size=(60, 6)) + labels[:, None]
    assert is_png(plots.class_scatter(emb, labels, ["a", "b", "c"], str(tmp_path / "classes.png")))
    assert is_png(plots.confusion_matrix_plot([[5, 1, 0], [0, 6, 0], [2, 0, 4]], ["a", "b", "c"],
                                              str(tmp_path / "confusion.png")))
    curves = {"m1": {"epoch": [0, 1, 2, 3], "loss": [2.0, 1.5, 1.2, 1.1], "switches": [(0, 1), (1, 1), (2, 2)]},
              "m2": {"epoch": [0, 1], "loss": [3.0, 2.0], "switches": []}}
    assert is_png(plots.loss_curves(curves, str(tmp_path / "loss.png")))
    rows = [{"module": "raw pixels", "depth": 0, "nearest_centroid": 0.5, "linear_probe": 0.6, "knn": 0.55},
            {"module": "m1", "depth": 1, "nearest_centroid": 0.6, "linear_probe": 0.7, "knn": 0.65},
            {"module": "m2", "depth": 2, "nearest_centroid": 0.7, "linear_probe": 0.8, "knn": 0.75}]
    assert is_png(plots.accuracy_by_depth(rows, str(tmp_path / "depth.png")))


def test_version_changes_drop_repeats():
    assert plots._version_changes([(0, 1), (1, 1), (2, 2), (3, 2)]) == [(0, 1), (2, 2)]


class _Strict(HTMLParser):
    """Counts tags so the test can check the page is balanced where it matters."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.srcs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.srcs += [v for k, v in attrs if k in ("src", "href")]


def test_report_is_self_contained(tmp_path, ring_pose):
    emb, az, el = ring_pose
    png = plots.pose_views(emb, az, el, str(tmp_path / "pose.png"))
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 10)
    x = rng.normal(size=(20, 3)) + 3 * y[:, None]
    metrics = classify(x, y, x, y)
    metrics["baselines"] = {"raw_pixels": classify(rng.normal(size=(20, 3)), y, rng.normal(size=(20, 3)), y)}
    metrics["per_module"] = [{"module": "m1", "depth": 1, "nearest_centroid": 0.9, "linear_probe": 0.95, "knn": 0.9}]
    config = "name: <script>alert('x')</script> & co\nstack:\n  m1: {objective: infonce_pair}\n"
    out = render_report(
        str(tmp_path / "report.html"), title="run <a&b>", config_yaml=config,
        lineage={"m1": {"input": 1}, "m2": None, "retrains": []},
        modules=[{"name": "m1", "final_version": 3, "epochs": 4, "final_loss": 1.2345, "train_seconds": 12.5,
                  "samples_per_second": 1234.5, "peak_memory_bytes": 3 * 2**20, "node": "10.0.0.1"},
                 {"name": "m<2>"}],
        metrics=metrics, pose={"azimuth_mae_deg": 12.3, "elevation_mae_deg": 4.5, "ridge_r2": 0.8,
                               "trustworthiness": 0.93},
        images={"pose views": png, "missing": str(tmp_path / "nope.png")})
    text = open(out, encoding="utf-8").read()
    assert "data:image/png;base64," in text
    assert 'src="http' not in text and "<script" not in text and "<link" not in text
    assert "name: &lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; co" in text
    assert "run &lt;a&amp;b&gt;" in text and "m&lt;2&gt;" in text
    assert "12.30 deg" in text and "3.0 MiB" in text
    parser = _Strict()
    parser.feed(text)
    parser.close()
    assert parser.tags.count("table") >= 4 and "pre" in parser.tags
    assert all(s.startswith("data:") for s in parser.srcs)


def test_report_without_pose_or_baseline(tmp_path):
    y = np.array([0, 0, 1, 1])
    x = np.array([[0.0], [0.1], [1.0], [1.1]])
    out = render_report(str(tmp_path / "r.html"), title="t", config_yaml="a: 1", lineage={}, modules=[],
                        metrics=classify(x, y, x, y, knn_k=1), pose=None, images={})
    text = open(out, encoding="utf-8").read()
    assert "Pose" not in text and "100.0%" in text
    HTMLParser().feed(text)


def test_report_names_classes_flags_chance_and_tabulates_lineage(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2, 3, 4], 8)
    metrics = classify(rng.normal(size=(40, 4)), y, rng.normal(size=(40, 4)), y)  # noise: about 1/5
    metrics["nearest_centroid"]["test_accuracy"] = 0.21
    names = ["animal", "human", "airplane", "truck", "car"]
    lineage = {"m1": {"stage": "input", "version": 1}, "m2": {"stage": "m1", "version": 4}, "retrains": [
        {"module": "m2", "at": "2026-11-29T10:00:00", "from_version": 4}]}
    out = render_report(str(tmp_path / "r.html"), title="t", config_yaml="a: 1", lineage=lineage, modules=[],
                        metrics=metrics, pose={"azimuth_mae_deg": 88.5, "elevation_mae_deg": 9.0, "ridge_r2": 0.04,
                                               "trustworthiness": 0.5}, images={}, class_names=names)
    text = open(out, encoding="utf-8").read()
    assert all(f"<td>{n} ({i})</td>" in text for i, n in enumerate(names))
    assert "At chance level" in text and "nearest centroid, test: 21.0%, at chance level (1/5 = 20.0%)" in text
    assert "azimuth error 88.5 deg" in text and "ridge R² 0.040" in text
    assert "<th>module</th><th>upstream stage</th><th>upstream version</th>" in text  # a table, not JSON
    assert "<td>m2</td><td>m1</td><td>4</td>" in text
    assert "{&quot;" not in text and "<td>2026-11-29T10:00:00</td>" in text


def test_a_good_result_is_not_flagged(tmp_path):
    y = np.array([0, 0, 1, 1])
    x = np.array([[0.0], [0.1], [1.0], [1.1]])
    out = render_report(str(tmp_path / "r.html"), title="t", config_yaml="a: 1", lineage={}, modules=[],
                        metrics=classify(x, y, x, y, knn_k=1), pose={"azimuth_mae_deg": 12.0, "ridge_r2": 0.8},
                        images={})
    assert "At chance level" not in open(out, encoding="utf-8").read()


def test_loss_panel_draws_held_out_loss_and_keeps_switch_labels_apart(tmp_path, monkeypatch):
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), fig.canvas.draw(), save(fig, path))[-1])
    curves = {"m1": {"epoch": list(range(1, 41)), "loss": list(np.linspace(3, 1, 40)),
                     "switches": [(e, e) for e in range(1, 41)],  # a new upstream version every epoch
                     "heldout_epoch": [10, 20, 30, 40], "heldout_loss": [2.6, 2.0, 1.6, 1.4]}}
    assert open(plots.loss_curves(curves, str(tmp_path / "loss.png")), "rb").read()[:4] == b"\x89PNG"
    ax = figures[0].axes[0]
    assert [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")] == ["train", "held out"]
    renderer = figures[0]._get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert 10 <= len(boxes) < 39  # some switch labels shown, the crowded ones left out
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_loss_panels_with_tiny_changes_keep_titles_and_ticks_apart(tmp_path, monkeypatch):
    figures = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), fig.canvas.draw(), save(fig, path))[-1])
    flat = {"epoch": [1, 2], "loss": [7.27195, 7.27187], "switches": [(1, 2)]}  # the case that printed "1e-5+7.271"
    plots.loss_curves({"m1": flat, "m2": flat}, str(tmp_path / "loss.png"))
    fig = figures[0]
    renderer = fig._get_renderer()
    top, bottom = fig.axes[0], fig.axes[1]
    assert all(ax.yaxis.get_offset_text().get_text() == "" for ax in fig.axes)
    assert not bottom.title.get_window_extent(renderer).overlaps(top.get_tightbbox(renderer))


def test_report_says_when_the_fits_saw_a_subsample(tmp_path):
    rng = np.random.default_rng(0)
    y = np.arange(40) % 2
    x = rng.normal(size=(40, 2)) + 6.0 * y[:, None]
    sub = classify(x, y, x, y, knn_k=1, fit_rows=10, seed=2)
    whole = classify(x, y, x, y, knn_k=1)
    text = open(render_report(str(tmp_path / "s.html"), title="t", config_yaml="a: 1", lineage={}, modules=[],
                              metrics=sub, pose=None, images={}), encoding="utf-8").read()
    assert "evaluate.fit_rows" in text and "fit on 10 of 40 train rows" in text and "10 of 40 test rows" in text
    plain = open(render_report(str(tmp_path / "w.html"), title="t", config_yaml="a: 1", lineage={}, modules=[],
                               metrics=whole, pose=None, images={}), encoding="utf-8").read()
    assert "Subsampled" not in plain
