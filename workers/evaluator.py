"""The final stage's worker: classifiers, pose metrics, exports, plots, report and the composed model.

A plain class (``setup / run / shutdown``) that reads only the store: the top
module's final version, the input version (raw-pixel baselines) and the
metrics the trainers wrote. The maths lives in ``pipeline.final.evaluation`` and
``pipeline.final.pose`` and takes arrays.
"""

from __future__ import annotations

import concurrent.futures
import os
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from threadpoolctl import threadpool_limits

from pipeline.errors import UndefinedMetricError
from pipeline.planning.config import dump_yaml
from pipeline.data import capabilities
from pipeline.data.base import object_ids
from pipeline.final.encoder import compose_from_store, save_model
from pipeline.final.evaluation import READINGS, classify, expected_warnings_ignored, standardize
from pipeline.feed import open_source
from pipeline.nn.modules import pool_to_vector
from pipeline.final import plots
from pipeline.final import exports as exports_io
from pipeline.final.pose import knn_pose_predict, pose_metrics
from pipeline.final.report import render_report
from pipeline.store.runs import now_iso
from pipeline.store import Store
from schemas.config import RunConfig
from workers.runtime import node_cores

_SLICE = 1024  # rows pooled at once: bounds the float32 (and recompute) activations held


class Evaluator:
    """Evaluate and export one run from the store alone."""

    def __init__(self, store_uri: str, run_id: str, config: dict) -> None:
        self.store_uri, self.run_id = store_uri, run_id
        self.cfg = RunConfig.model_validate(config)

    def setup(self) -> None:
        self.store = Store(self.store_uri, self.run_id, create=False)
        self.names = list(self.cfg.stack)
        self.caps = capabilities(self.cfg.dataset.kind)

    def run(self, *, evaluate: bool = True, export: bool = True) -> dict:
        """Returns the summary sections it produced: evaluation, pose, exports.

        Runs with ``SCORING_JOBS`` jobs' share of the cores for the numeric libraries' thread pools (OpenBLAS,
        OpenMP): scikit-learn's small solves and Cython loops on the default machine's two cores ran slower on two
        threads each than on one (the pools spin against each other): the default's final stage took 33.4 s
        with the libraries' own thread counts and 20.6 s with one thread (imports aside), and the embedding and
        its baselines are then scored side by side (``_scores``)."""
        with threadpool_limits(limits=_threads_per_job()):
            return self._run(evaluate=evaluate, export=export)

    def _run(self, *, evaluate: bool, export: bool) -> dict:
        self.setup()
        top = self.names[-1]
        meta, emb = self.embeddings(top)
        out: dict = {}
        if evaluate:
            classes = set(np.asarray(meta.column("label").fill_null(-1).to_numpy(zero_copy_only=False)).tolist())
            if len(classes) < 2:  # e.g. the pose preset: one toy, nothing to classify; pose metrics still apply
                out["evaluation"] = {"skipped": f"the data has {len(classes)} class; classification needs two or more"}
            else:
                try:
                    out["evaluation"] = self._evaluate(meta, emb)
                except UndefinedMetricError as e:  # one class in the train split, a collapsed top: a trained run is kept
                    out["evaluation"] = {"skipped": e.message}  # the cause, and its fix where it has one
            if self.caps.has_pose:
                out["pose"] = self._pose(meta, emb)
        if export:
            out["exports"] = self._export(meta, emb, out)
        return out

    def shutdown(self) -> None:
        pass

    # ------------------------------------------------------------ data

    def embeddings(self, stage: str) -> tuple[pa.Table, np.ndarray]:
        """(metadata, (N, D) float32) of a stage's final version, pooled per sample.

        Streamed: the version is read one row group at a time (``pipeline.feed.Source.scan``) and each
        slice pooled at once, so only the (N, D) embeddings are held, never the activations. The input
        stage is the raw baseline (uint8 pixels scaled to [0, 1], or the stored signal as it is,
        flattened); a weights version is recomputed from the stage below. Rows come in ``sample_id`` order
        whatever the stored order (a shard stores its splits one after the other), so every stage, the
        raw baseline and the exports list the same samples in the same order, and seeded subsamples
        (``evaluate.fit_rows``) draw the same samples at every depth.
        """
        final = self.store.final(stage)
        src = open_source(self.store, stage, final.version, self.cfg.model_dump(mode="json"), torch.device("cpu"))
        parts, order = [], []
        with torch.inference_mode():
            for rows, x in src.scan():
                for lo in range(0, len(rows), _SLICE):
                    feats = src.features(x[lo:lo + _SLICE], torch.device("cpu"))
                    flat = feats.reshape(len(feats), -1) if stage == "input" else pool_to_vector(feats)
                    parts.append(flat.numpy().astype(np.float32, copy=False))
                order.append(rows)
        emb = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        by_id = np.argsort(src.sample_id, kind="stable")  # source rows in sample_id order
        # emb's rows come in scan order: one gather puts them in source row order, then in sample_id order.
        at = np.argsort(np.concatenate(order), kind="stable")[by_id] if order else by_id
        return src.meta.take(pa.array(by_id)), emb[at] if len(emb) else emb

    def _split(self, meta: pa.Table, emb: np.ndarray):
        split = np.asarray(meta.column("split").to_pylist())
        labels = np.asarray(meta.column("label").fill_null(-1).to_numpy(zero_copy_only=False))
        tr, te = split == "train", split == "test"
        return emb[tr], labels[tr], emb[te], labels[te], tr, te

    def _scored_split(self, meta: pa.Table, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(train x, train y, test x, test y) as the classifiers read them (standardised when configured)."""
        xtr, ytr, xte, yte, _, _ = self._split(meta, emb)
        if self.cfg.evaluate.standardize:
            xtr, xte = standardize(xtr, xte)
        return xtr, ytr, xte, yte

    # ------------------------------------------------------------ stages

    def _evaluate(self, meta: pa.Table, emb: np.ndarray) -> dict:
        top, ev = self.names[-1], self.cfg.evaluate
        splits = {top: self._scored_split(meta, emb)}
        if ev.baselines:
            splits["input"] = self._scored_split(*self.embeddings("input"))
        if ev.per_module:
            for name in self.names[:-1]:
                splits[name] = self._scored_split(*self.embeddings(name))
        # Each embedding in jobs of a few readings, widest first, so the scoring threads end together: the
        # default's raw pixels in one job took 8.6 s of the 9 s (the evaluation with its pose metrics: 13.1-13.5 s
        # -> 11.4-12.0 s, the same numbers).
        jobs = {(name, part): lambda name=name, part=part: classify(
                    *splits[name], knn_k=ev.knn_k, knn_metric=ev.knn_metric, probe_iters=ev.linear_probe_epochs,
                    seed=self.cfg.train.seed, fit_rows=ev.fit_rows, readings=part)
                for name in sorted(splits, key=lambda n: -splits[n][0].shape[1]) for part in _READING_JOBS}
        with expected_warnings_ignored():  # filters shared by the threads: see its docstring
            done = _scores(jobs)
        scores = {name: {k: v for part in _READING_JOBS for k, v in done[(name, part)].items()} for name in splits}
        result = scores[top]
        result["embedding_dim"] = int(emb.shape[1])
        result["source"] = {"stage": top, "version": self.store.final(top).version}
        if self.cfg.evaluate.baselines:
            result["baselines"] = {"raw_pixels": scores["input"]}
        if self.cfg.evaluate.per_module:
            result["per_module"] = [{"module": name, "depth": depth, **_headline(scores[name])}
                                    for depth, name in enumerate(self.names, start=1)]
        return result

    def _pose(self, meta: pa.Table, emb: np.ndarray) -> dict:
        cols = {c: np.asarray(meta.column(c).to_numpy(zero_copy_only=False), dtype=np.float64)
                for c in ("azimuth", "elevation", "instance", "label")}
        split = np.asarray(meta.column("split").to_pylist())
        tr, te = split == "train", split == "test"
        return pose_metrics(emb[tr], cols["azimuth"][tr], cols["elevation"][tr], emb[te], cols["azimuth"][te],
                            cols["elevation"][te], instance_test=cols["instance"][te], k=self.cfg.evaluate.knn_k,
                            label_test=cols["label"][te], metric=self.cfg.evaluate.knn_metric)

    def _export(self, meta: pa.Table, emb: np.ndarray, results: dict) -> dict:
        exports = {}
        top = self.store.final(self.names[-1])
        provenance = {"run_id": self.run_id, "stage": self.names[-1], "version": top.version, "codec": top.codec}
        self.store.write_bytes("embeddings.parquet", exports_io.parquet_bytes(exports_io.sample_embeddings(meta, emb, provenance)))
        exports["embeddings"] = f"{self.store.root_uri}/embeddings.parquet"
        # the pose figure's 3-D coordinates of the test rows, made once for pose.parquet and plots/pose.png
        pose_xyz = self._pose_coordinates(meta, emb) if self.caps.has_pose else None
        if pose_xyz is not None:
            self.store.write_bytes("pose.parquet",
                                   exports_io.parquet_bytes(self._pose_export(meta, emb, provenance, pose_xyz)))
            exports["pose"] = f"{self.store.root_uri}/pose.parquet"
        if self.cfg.export.model:
            encoder, versions = compose_from_store(self.store, self.cfg)
            save_model(self.store, self.cfg, encoder, versions)
            exports["model"] = f"{self.store.root_uri}/model"
        images = self._plots(meta, emb, results, pose_xyz) if self.cfg.export.plots else {}
        exports["plots"] = {k: f"{self.store.root_uri}/{v}" for k, v in images.items()}
        if self.cfg.export.report:
            exports["report"] = f"{self.store.root_uri}/report.html"
            self._report(results, images)
        return exports

    def _pose_export(self, meta: pa.Table, emb: np.ndarray, provenance: dict,
                     pose_xyz: tuple[np.ndarray, str]) -> pa.Table:
        """The test rows as the pose figure draws them (``pose_xyz``), with the kNN pose prediction from the train
        split."""
        split = np.asarray(meta.column("split").to_pylist())
        tr, te = split == "train", split == "test"
        az, el = (np.asarray(meta.column(c).to_numpy(zero_copy_only=False), dtype=np.float64) for c in ("azimuth", "elevation"))
        az_pred, el_pred = knn_pose_predict(emb[tr], az[tr], el[tr], emb[te], k=self.cfg.evaluate.knn_k,
                                            metric=self.cfg.evaluate.knn_metric)
        xyz, how = pose_xyz
        return exports_io.pose_table(meta.filter(pa.array(te)), xyz, az_pred, el_pred, provenance, projection=how)

    def _pose_coordinates(self, meta: pa.Table, emb: np.ndarray) -> tuple[np.ndarray, str]:
        """``plots.project_3d`` of the test rows under ``evaluate.pose_projection`` (``auto`` decided by how many
        objects they hold)."""
        te = np.asarray(meta.column("split").to_pylist()) == "test"
        label, instance = (np.asarray(meta.column(c).fill_null(-1).to_numpy(zero_copy_only=False))[te]
                           for c in ("label", "instance"))
        method = plots.pose_projection(self.cfg.evaluate.pose_projection, object_ids(label, instance))
        return plots.project_3d(emb[te], method)

    def _plots(self, meta: pa.Table, emb: np.ndarray, results: dict,
               pose_xyz: tuple[np.ndarray, str] | None) -> dict[str, str]:
        made: dict[str, str] = {}
        with tempfile.TemporaryDirectory() as tmp:
            def out(name):
                return os.path.join(tmp, name)

            labels = np.asarray(meta.column("label").fill_null(-1).to_numpy(zero_copy_only=False))
            names = self.caps.class_names or [str(i) for i in range(int(labels.max()) + 1)]
            test = np.asarray(meta.column("split").to_pylist()) == "test"
            ev = results.get("evaluation", {})
            if "skipped" not in ev:
                made["classes.png"] = plots.class_scatter(emb[test], labels[test], names, out("classes.png"))
            if "nearest_centroid" in ev:
                made["confusion.png"] = plots.confusion_matrix_plot(ev["nearest_centroid"]["confusion"], names,
                                                                    out("confusion.png"),
                                                                    labels=ev["nearest_centroid"]["labels"])
            if pose_xyz is not None:
                az = np.asarray(meta.column("azimuth").to_numpy(zero_copy_only=False), dtype=np.float64)
                el = np.asarray(meta.column("elevation").to_numpy(zero_copy_only=False), dtype=np.float64)
                made["pose.png"] = plots.pose_views(emb[test], az[test], el[test], out("pose.png"), projected=pose_xyz)
            curves = self._loss_curves()
            if curves:
                made["loss.png"] = plots.loss_curves(curves, out("loss.png"))
            if "per_module" in ev:
                rows = list(ev["per_module"])
                if "baselines" in ev:
                    rows.insert(0, {"module": "raw pixels", "depth": 0, **_headline(ev["baselines"]["raw_pixels"])})
                made["depth.png"] = plots.accuracy_by_depth(rows, out("depth.png"))
            stored = {}
            for name, path in made.items():
                with open(path, "rb") as fh:
                    self.store.write_bytes(f"plots/{name}", fh.read())
                stored[name.removesuffix(".png")] = f"plots/{name}"
        return stored

    def _loss_curves(self) -> dict[str, dict]:
        curves = {}
        for name in self.names:
            data = self.store.read_bytes(f"metrics/{name}.parquet")
            if data is None:
                continue
            rows = pq.read_table(pa.BufferReader(data)).to_pylist()
            loss = [r for r in rows if r["name"] == f"{name}/loss/train"]
            switches = [(r["epoch"], int(r["value"])) for r in rows if r["name"] == f"{name}/upstream/version"]
            heldout = [r for r in rows if r["name"] == f"{name}/loss/heldout" and r["value"] is not None]
            curves[name] = {"epoch": [r["epoch"] for r in loss], "loss": [r["value"] for r in loss], "switches": switches,
                            "heldout_epoch": [r["epoch"] for r in heldout], "heldout_loss": [r["value"] for r in heldout]}
        return curves

    def _report(self, results: dict, images: dict[str, str]) -> None:
        info = self.store.read_json("run.json") or {}
        summary = self.store.read_json("summary.json") or {}
        modules = [{"name": n, **(summary.get("modules", {}).get(n) or {})} for n in self.names]
        lineage = {n: (self.store.final(n).upstream if self.store.final(n) else None) for n in self.names}
        lineage["retrains"] = info.get("retrains", [])
        with tempfile.TemporaryDirectory() as tmp:
            local = {}
            for caption, rel in images.items():
                path = os.path.join(tmp, os.path.basename(rel))
                with open(path, "wb") as fh:
                    fh.write(self.store.read_bytes(rel))
                local[caption] = path
            out = os.path.join(tmp, "report.html")
            render_report(out, title=f"isostack run {self.run_id} ({now_iso()})", config_yaml=dump_yaml(self.cfg),
                          lineage=lineage, modules=modules, metrics=results.get("evaluation", {}),
                          pose=results.get("pose"), images=local, class_names=self.caps.class_names)
            with open(out, "rb") as fh:
                self.store.write_bytes("report.html", fh.read())


SCORING_JOBS = 2  # scoring jobs run side by side in the final stage
# ``classify``'s readings in three jobs per embedding, the longest first (the default's raw pixels, side by side
# with the other jobs: the clusterings 5.9 s, nearest centroid and probe 4.6 s, kNN 3.9 s): widest embedding
# first, then this order, is longest-first scheduling on the two threads.
_READING_JOBS = (("clusters",), ("nearest_centroid", "linear_probe"), ("knn",))
assert sorted(sum(_READING_JOBS, ())) == sorted(READINGS), "every reading in exactly one scoring job"


def _threads_per_job() -> int:
    return max(1, node_cores() // SCORING_JOBS)


def _scores(jobs: dict) -> dict:
    """``{name: job()}``, ``SCORING_JOBS`` jobs at a time, in ``jobs``' order (they share the embeddings, read only;
    scikit-learn and numpy release the GIL in their numeric loops). On the default run, embedding and raw pixels
    scored one after the other took 14.3 s on one thread each, side by side 8.6-10 s, with the same numbers."""
    with concurrent.futures.ThreadPoolExecutor(SCORING_JOBS, thread_name_prefix="isostack-score") as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


def _headline(scores: dict) -> dict:
    """Test accuracy of each scorer that ran (clustering ones are absent when they were skipped)."""
    return {key: scores[key]["test_accuracy"] for key in ("nearest_centroid", "linear_probe", "knn", "kmeans", "gmm")
            if key in scores}
