"""report.html: one self-contained page per run.

Images are embedded as base64 data URIs and the CSS is inline, so the file can be mailed, attached to
a ticket or opened from object storage with no other file, no network and no JavaScript. Every piece of
text that comes from the run (names, config, node addresses) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import json
import math
import mimetypes
import os

__all__ = ["render_report"]

# (key in the evaluation dict, field, row title) in the order the classification table shows them.
_CLASSIFIER_ROWS = (
    ("nearest_centroid", "test_accuracy", "nearest centroid, test"),
    ("nearest_centroid", "train_accuracy", "nearest centroid, train"),
    ("linear_probe", "test_accuracy", "linear probe, test"),
    ("linear_probe", "train_accuracy", "linear probe, train"),
    ("knn", "test_accuracy", "kNN, test"),
    ("kmeans", "test_accuracy", "k-means (Hungarian-matched), test"),
    ("gmm", "test_accuracy", "Gaussian mixture (Hungarian-matched), test"),
)
_POSE_ROWS = (
    ("azimuth_mae_deg", "kNN azimuth error (circular MAE)", "deg"),
    ("elevation_mae_deg", "kNN elevation error (MAE)", "deg"),
    ("ridge_r2", "ridge R² of (cos az, sin az, elevation)", ""),
    ("trustworthiness", "trustworthiness vs ground-truth pose distance", ""),
)
_MODULE_COLUMNS = (
    ("name", "module", str),
    ("final_version", "final version", lambda v: f"v{v}"),
    ("epochs", "epochs", str),
    ("final_loss", "final loss", lambda v: f"{v:.4g}"),
    ("train_seconds", "train time", lambda v: _seconds(v)),
    ("samples_per_second", "samples/s", lambda v: f"{v:,.0f}"),
    ("peak_memory_bytes", "peak memory", lambda v: _bytes(v)),
    ("node", "node", str),
)

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1b1f24; margin: 2em auto;
       max-width: 1100px; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 2em;
     border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; }
p.headline { font-size: 1.1em; background: #f6f8fa; padding: 0.6em 0.8em; border-radius: 6px; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #eaeef2; }
th { text-align: left; background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.up { color: #1a7f37; } td.down { color: #cf222e; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #eaeef2; }
figcaption { color: #57606a; font-size: 0.9em; }
div.chance { background: #fff8c5; border: 1px solid #d4a72c; padding: 0.4em 0.8em; border-radius: 6px; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 12px; border-radius: 6px; }
"""


def render_report(
    path: str,
    *,
    title: str,
    config_yaml: str,
    lineage: dict,
    modules: list[dict],
    metrics: dict,
    pose: dict | None,
    images: dict[str, str],
    class_names: list[str] | None = None,
) -> str:
    """Write the report to ``path`` and return it.

    modules: per-module rows (name, final_version, epochs, final_loss, train_seconds,
    samples_per_second, peak_memory_bytes, node; missing keys show as '-'). metrics: the evaluation dict
    (``pipeline.final.evaluation.classify``'s output, with the raw-pixel one under ``baselines.raw_pixels`` and
    optionally ``per_module`` rows). pose: ``pipeline.final.pose.pose_metrics``'s output or None.
    images: caption -> local PNG path, embedded in the page. class_names[label] names the classes (ids otherwise).
    Results no better than chance are flagged where they are shown (see ``_chance_notes``).
    """
    metrics = metrics or {}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        _headline(metrics, pose),
        _chance_notes(metrics, pose),
        "<h2>Modules</h2>",
        _modules_table(modules),
    ]
    if "skipped" in metrics:
        parts += ["<h2>Classification</h2>", f"<p>skipped: {_e(metrics['skipped'])}</p>"]
    elif metrics:
        parts += ["<h2>Classification (against raw pixels)</h2>", _subsample_note(metrics), _metrics_table(metrics),
                  _per_class_table(metrics, class_names)]
    if metrics.get("per_module"):
        parts += ["<h2>Accuracy by depth</h2>", _depth_table(metrics["per_module"])]
    if pose:
        parts += ["<h2>Pose (held-out samples)</h2>", _pose_table(pose)]
    if images:
        parts += ["<h2>Figures</h2>"] + [_figure(caption, p) for caption, p in images.items()]
    parts += ["<h2>Lineage</h2>", _lineage_table(lineage or {}),
              "<h2>Config</h2>", f"<pre>{_e(config_yaml)}</pre>", "</body></html>"]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(p for p in parts if p))
    return str(path)


# ---------------------------------------------------------------- sections


def _headline(metrics: dict, pose: dict | None) -> str:
    bits = []
    nc = _get(metrics, "nearest_centroid", "test_accuracy")
    if nc is not None:
        text = f"Nearest centroid on the test split: {_pct(nc)}"
        raw = _get(metrics.get("baselines", {}).get("raw_pixels", {}), "nearest_centroid", "test_accuracy")
        if raw is not None:
            text += f" (raw pixels {_pct(raw)}, {_points(nc, raw)} points)"
        bits.append(text + ".")
    if pose:
        bits.append(f"Pose: azimuth error {_fmt(pose.get('azimuth_mae_deg'), '.1f')} deg, trustworthiness "
                    f"{_fmt(pose.get('trustworthiness'), '.3f')}.")
    return f'<p class="headline">{_e(" ".join(bits))}</p>' if bits else ""


def _subsample_note(metrics: dict) -> str:
    """Says when the probe, kNN and clusterings saw a seeded subsample (``evaluate.fit_rows``), not every row."""
    sub = metrics.get("subsample")
    if not sub:
        return ""
    rows, of = sub["rows"], sub["of"]
    return (f"<p>Subsampled (evaluate.fit_rows, seed {sub['seed']}): the linear probe and kNN were fit on "
            f"{rows['train']:,} of {of['train']:,} train rows and k-means and the GMM clustered {rows['test']:,} of "
            f"{of['test']:,} test rows; nearest centroid used every row.</p>")


def _modules_table(modules: list[dict]) -> str:
    head = "".join(f"<th>{_e(title)}</th>" for _, title, _ in _MODULE_COLUMNS)
    rows = []
    for m in modules or []:
        cells = []
        for key, _, fmt in _MODULE_COLUMNS:
            value = m.get(key)
            text = "-" if value is None else _safe(fmt, value)
            cls = "" if key in ("name", "node") else ' class="num"'
            cells.append(f"<td{cls}>{_e(text)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    if not rows:
        rows.append(f'<tr><td colspan="{len(_MODULE_COLUMNS)}">no module records</td></tr>')
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _metrics_table(metrics: dict) -> str:
    raw = metrics.get("baselines", {}).get("raw_pixels") or {}
    rows = []
    for clf, field, title in _CLASSIFIER_ROWS:
        ours = _get(metrics, clf, field)
        if ours is None:
            continue
        base = _get(raw, clf, field)
        diff = _points(ours, base) if base is not None else "-"
        cls = "num" if base is None else ("num up" if ours > base else "num down" if ours < base else "num")
        rows.append(f"<tr><td>{_e(title)}</td><td class=\"num\">{_e(_pct(ours))}</td>"
                    f"<td class=\"num\">{_e(_pct(base) if base is not None else '-')}</td>"
                    f"<td class=\"{cls}\">{_e(diff)}</td></tr>")
    dim = metrics.get("embedding_dim")
    note = f"<p>Embedding dimension: {_e(str(dim))}.</p>" if dim is not None else ""
    return ("<table><tr><th>classifier</th><th>embedding</th><th>raw pixels</th><th>difference (points)</th></tr>"
            + "".join(rows) + "</table>" + note)


def _per_class_table(metrics: dict, class_names: list[str] | None) -> str:
    ours = _get(metrics, "nearest_centroid", "per_class_accuracy") or {}
    raw = _get(metrics.get("baselines", {}).get("raw_pixels", {}), "nearest_centroid", "per_class_accuracy") or {}
    if not ours:
        return ""
    rows = "".join(
        f"<tr><td>{_e(_class_name(label, class_names))}</td><td class=\"num\">{_e(_pct(acc))}</td>"
        f"<td class=\"num\">{_e(_pct(raw[label]) if label in raw else '-')}</td></tr>"
        for label, acc in ours.items())
    return ("<h3>Nearest centroid per class (test)</h3><table><tr><th>class</th><th>embedding</th>"
            f"<th>raw pixels</th></tr>{rows}</table>")


def _depth_table(rows: list[dict]) -> str:
    keys = ("nearest_centroid", "linear_probe", "knn")
    body = "".join(
        f"<tr><td>{_e(str(r.get('depth', '-')))}</td><td>{_e(str(r.get('module', '-')))}</td>"
        + "".join(f"<td class=\"num\">{_e(_pct(r[k]) if r.get(k) is not None else '-')}</td>" for k in keys)
        + "</tr>"
        for r in sorted(rows, key=lambda r: r.get("depth", 0)))
    return ("<table><tr><th>depth</th><th>module</th><th>nearest centroid</th><th>linear probe</th>"
            f"<th>kNN</th></tr>{body}</table>")


def _pose_table(pose: dict) -> str:
    rows = []
    undefined = pose.get("undefined", {})
    for key, title, unit in _POSE_ROWS:
        if pose.get(key) is None:
            if key in undefined:  # the data cannot give it (pipeline.final.pose): say why instead of a number
                rows.append(f"<tr><td>{_e(title)}</td><td>undefined: {_e(undefined[key])}</td></tr>")
            continue
        text = _fmt(pose[key], ".2f" if unit else ".3f") + (f" {unit}" if unit else "")
        rows.append(f"<tr><td>{_e(title)}</td><td class=\"num\">{_e(text)}</td></tr>")
    return f"<table><tr><th>metric</th><th>value</th></tr>{''.join(rows)}</table>"


def _lineage_table(lineage: dict) -> str:
    """One row per stage: the upstream version it was trained on (and the other fields of that record); then
    one row per retrain."""
    stages = {k: v for k, v in lineage.items() if k != "retrains"}
    if not stages and not lineage.get("retrains"):
        return "<p>no lineage recorded</p>"
    upstream = {k: {f"upstream {f}": x for f, x in v.items()} if isinstance(v, dict) else {"upstream": v}
                for k, v in stages.items()}
    parts = [_records_table("module", upstream)]
    retrains = lineage.get("retrains") or []
    if retrains:
        parts += ["<h3>Retrains</h3>", _records_table("#", {str(i + 1): r if isinstance(r, dict) else {"record": r}
                                                                for i, r in enumerate(retrains)})]
    return "".join(parts)


def _records_table(key_title: str, records: dict[str, dict | None]) -> str:
    columns = list(dict.fromkeys(c for r in records.values() if r for c in r))
    head = "".join(f"<th>{_e(c)}</th>" for c in [key_title, *columns])
    rows = "".join(
        f"<tr><td>{_e(name)}</td>" + "".join(f"<td>{_e(_cell((r or {}).get(c)))}</td>" for c in columns) + "</tr>"
        for name, r in records.items())
    return f"<table><tr>{head}</tr>{rows}</table>"


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):  # a nested record: key=value pairs, readable in one cell
        return ", ".join(f"{k}={_cell(x)}" for k, x in v.items())
    return v if isinstance(v, str) else _json(v)


# Thresholds of "no better than chance": accuracy within 1.25x of 1/K; azimuth error of a uniform guess is 90 deg.
_CHANCE_FACTOR, _AZIMUTH_CHANCE_DEG, _R2_FLOOR = 1.25, 80.0, 0.1


def _chance_notes(metrics: dict, pose: dict | None) -> str:
    notes = []
    labels = _get(metrics, "nearest_centroid", "labels") or list(_get(metrics, "nearest_centroid", "per_class_accuracy") or [])
    if len(labels) >= 2:
        chance = 1.0 / len(labels)
        for clf, field, title in _CLASSIFIER_ROWS:
            acc = _get(metrics, clf, field)
            if field == "test_accuracy" and acc is not None and acc <= _CHANCE_FACTOR * chance:
                notes.append(f"{title}: {_pct(acc)}, at chance level (1/{len(labels)} = {_pct(chance)})")
    if pose:
        az, r2 = pose.get("azimuth_mae_deg"), pose.get("ridge_r2")
        if az is not None and not math.isnan(az) and az >= _AZIMUTH_CHANCE_DEG:
            notes.append(f"azimuth error {az:.1f} deg: a random guess averages 90 deg, so the embedding does not "
                         "encode azimuth")
        if r2 is not None and not math.isnan(r2) and r2 < _R2_FLOOR:
            notes.append(f"ridge R² {r2:.3f}: pose is not linearly readable from the embedding")
    if not notes:
        return ""
    items = "".join(f"<li>{_e(n)}</li>" for n in notes)
    return f'<div class="chance"><strong>At chance level:</strong><ul>{items}</ul></div>'


def _class_name(label, class_names: list[str] | None) -> str:
    try:
        return f"{class_names[int(label)]} ({label})" if class_names else str(label)
    except (ValueError, IndexError, TypeError):
        return str(label)


def _figure(caption: str, path: str) -> str:
    if not path or not os.path.isfile(path):
        return f"<figure><figcaption>{_e(caption)} (image missing)</figcaption></figure>"
    mime = mimetypes.guess_type(path)[0] or "image/png"
    with open(path, "rb") as fh:
        data = base64.b64encode(fh.read()).decode("ascii")
    return (f'<figure><img src="data:{mime};base64,{data}" alt="{_e(caption)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


# ---------------------------------------------------------------- formatting


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _pct(x) -> str:
    return _fmt(None if x is None else 100.0 * x, ".1f") + "%"


def _points(ours: float, base: float) -> str:
    return f"{100.0 * (ours - base):+.1f}"


def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _safe(fmt, value) -> str:
    try:
        return fmt(value)
    except (TypeError, ValueError):  # a field of an unexpected type still shows, unformatted
        return str(value)


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TiB"


def _json(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str, sort_keys=True)
