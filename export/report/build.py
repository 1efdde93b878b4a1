"""Measure every exported format on the same test images: size, speed, parity, clinical figures.

One row per format, the Keras model first as the reference. Every number comes from this run.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_edge import metrics
from xray_edge.backends import open_backend
from xray_edge.classify import predicted_classes
from xray_edge.errors import XrayEdgeError
from xray_edge.export.report import saliency
from xray_edge.files import sha256_file
from xray_edge.folders import walk_classes
from xray_edge.manifest import MANIFEST_NAME, read_manifest
from xray_edge.preprocess import load_images
from xray_edge.training_record import TRAINING_RECORD_NAME, TrainingRecord


@dataclass
class TestSet:
    paths: list[Path]
    labels: np.ndarray  # class index per path
    source: str
    sources: np.ndarray | None = None  # data source index per path (training.json), -1 unknown
    source_names: tuple[str, ...] = ()


def test_set(artifacts: Path, classes: list[str], data: Path | None) -> TestSet:
    """The test split recorded at training, or a folder laid out as DATA/<class>/* (or DATA/test/<class>/*)."""
    if data is None:
        rec = TrainingRecord.read(artifacts)
        if rec is None:
            raise XrayEdgeError(f"no {artifacts / TRAINING_RECORD_NAME}: pass --data FOLDER with <class>/ subfolders")
        paths, labels, sources = rec.split_sources("test")
        if not paths or -1 in labels:
            raise XrayEdgeError(f"{artifacts / TRAINING_RECORD_NAME}: lists no labelled test images that "
                                "exist here; pass --data")
        names = tuple(s.get("name", str(i)) for i, s in enumerate(rec.sources))
        return TestSet(paths, np.asarray(labels), f"test split of {rec.data}", np.asarray(sources), names)
    root = data / "test" if (data / "test").is_dir() else data
    found = walk_classes(root, classes)
    if not found.paths:
        raise XrayEdgeError(f"{root}: no images in class folders {classes}")
    return TestSet(found.paths, found.labels, str(root))


@dataclass
class Measured:
    """One format's run over the test images."""

    format: str  # with its runtime, e.g. "int8 (litert 2.3.0)"
    file: Path
    load_s: float
    probs: np.ndarray  # [N, 1] P(labels[1])
    latency_ms: list[float]


def _row(m: Measured, *, ref: np.ndarray, y: np.ndarray, pos: int, thresholds: dict[str, float]) -> dict:
    """The report's row for one format: size, speed, agreement with Keras, clinical figures."""
    probs, lat_ms = m.probs, m.latency_ms
    row = {
        "format": m.format, "file": m.file.name, "size_mb": round(m.file.stat().st_size / 1e6, 2),
        "load_ms": round(m.load_s * 1e3, 1),
        "latency_p50_ms": round(float(np.percentile(lat_ms, 50)), 2) if lat_ms else None,
        "latency_p99_ms": round(float(np.percentile(lat_ms, 99)), 2) if lat_ms else None,
        "max_abs_diff_vs_keras": float(np.abs(probs - ref).max()),
        "roc_auc": metrics.roc_auc(y == pos, metrics.positive_score(probs, pos)),
        "probabilities": probs[:, 0].tolist(),  # P(labels[1]), the model's output
    }
    for key, thr in thresholds.items():
        called = predicted_classes(probs, thr)  # the runner's rule
        rep = metrics.decision_report(y == pos, called == pos)
        row[key] = {"threshold": thr,
                    "flips_vs_keras": int((called != predicted_classes(ref, thr)).sum()),
                    **{k: rep[k] for k in ("accuracy", "sensitivity", "specificity", "confusion")}}
    return row


def build_report(artifacts: Path, data: Path | None = None, runs_per_image: int = 1,
                 saliency_per_class: int = saliency.PER_CLASS,
                 external: tuple[tuple[str, Path], ...] = ()) -> dict:
    """Run Keras and every file of the manifest over the test images; return the report dict.

    With `saliency_per_class` > 0 it also explains that many test images of each class with
    every format and draws artifacts/report_saliency.png (see `saliency.page`). The test split is
    also measured per data source, and each `external` (name, DIR/<class>/*) set with every
    format at the manifest's threshold.
    """
    manifest = read_manifest(artifacts / MANIFEST_NAME)
    classes = list(manifest.labels)
    if len(classes) != 2 or manifest.threshold is None:
        raise XrayEdgeError("the report covers two-class (sigmoid) models")
    pos = metrics.positive_index(classes, manifest.positive_class, strict=False)
    ts = test_set(artifacts, classes, data)
    ext_sets = _external_sets(external)
    images, ok, errors = load_images(ts.paths, manifest.preprocessing)
    if len(images) == 0:
        raise XrayEdgeError(f"none of the {len(ts.paths)} test images could be decoded")
    y = ts.labels[ok]
    thresholds = {"at_manifest_threshold": manifest.threshold, "at_0.5": 0.5}

    import keras

    keras_file = artifacts / manifest.source_model.get("file", "model.keras")
    t = time.perf_counter()
    model = keras.saving.load_model(keras_file, compile=False)
    load_s = time.perf_counter() - t
    lat, ref = [], []
    for img in images:
        t = time.perf_counter()
        ref.append(np.asarray(model(img[None].astype("float32"), training=False))[0])
        lat.append((time.perf_counter() - t) * 1e3)
    ref = np.asarray(ref, dtype=np.float32)
    common = {"ref": ref, "y": y, "pos": pos, "thresholds": thresholds}
    rows = [_row(Measured(f"keras ({keras.backend.backend()})", keras_file, load_s, ref, lat), **common)]
    for name, entry in manifest.files.items():
        t = time.perf_counter()
        be = open_backend(artifacts / name, threads=os.cpu_count())  # as classify runs it
        load_s = time.perf_counter() - t
        be.predict(images[0])  # first invoke is setup, not latency
        lat, probs = [], []
        for img in images:
            for _ in range(runs_per_image):
                t = time.perf_counter()
                out = be.predict(img)
                lat.append((time.perf_counter() - t) * 1e3)
            probs.append(out)
        rows.append(_row(Measured(f"{entry.format} ({be.name} {be.version})", artifacts / name, load_s,
                                  np.asarray(probs, dtype=np.float32), lat), **common))
    sources = _per_source(ts, ok, rows, y, classes, pos, manifest.threshold)
    ext = {name: _external(name, root, found, model, manifest, artifacts, rows, classes, pos)
           for name, root, found in ext_sets}
    sal = saliency.page(model, manifest, artifacts, images, y, artifacts,
                        saliency_per_class) if saliency_per_class > 0 else None
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform(terse=True)}",
        "runtimes": manifest.versions,
        "model_sha256": sha256_file(keras_file),
        "synthetic": manifest.synthetic,
        "trained_on": manifest.training.get("data"),
        "test_source": ts.source,
        "images_per_class": {c: int((y == i).sum()) for i, c in enumerate(classes)},
        "skipped": errors,
        "classes": classes,
        "positive_class": classes[pos],
        "operating_point": manifest.operating_point or {"threshold": manifest.threshold},
        "labels": y.tolist(),
        "rows": rows,
        "sources": sources,
        "external": ext,
        "saliency": sal,
    }


def _external_sets(pairs) -> list:
    out = []
    for name, root in pairs:
        found = walk_classes(Path(root))
        if not found.paths:
            raise XrayEdgeError(f"--external {name}={root}: no images in {root}/<class>/ folders")
        out.append((name, Path(root), found))
    return out


def _per_source(ts: TestSet, ok, rows: list[dict], y: np.ndarray, classes, pos: int, threshold: float) -> dict:
    """Per data source of the test split: each format's figures at the manifest's threshold."""
    if ts.sources is None or not ts.source_names:
        return {}
    src = ts.sources[ok]
    out = {}
    for s, name in enumerate(ts.source_names):
        sel = src == s
        if not sel.any():
            continue
        out[name] = {r["format"]: metrics.set_figures(y[sel], classes, np.asarray(r["probabilities"])[sel, None],
                                                      classes, pos, threshold) for r in rows}
    return out


def _external(name: str, root: Path, found, model, manifest, artifacts: Path, rows: list[dict],
              classes, pos: int, ) -> dict:
    """One external set through Keras and every exported file (its edge runtime), at the threshold."""
    images, ok, errors = load_images(found.paths, manifest.preprocessing)
    if len(images) == 0:
        raise XrayEdgeError(f"--external {name}: none of the {len(found.paths)} images could be decoded")
    folder_of = found.labels[ok]
    per_format = {}
    probs = np.asarray(model.predict(images, batch_size=16, verbose=0), np.float32)
    per_format[rows[0]["format"]] = probs
    for row, fname in zip(rows[1:], manifest.files):
        be = open_backend(artifacts / fname, threads=os.cpu_count())
        per_format[row["format"]] = np.asarray([be.predict(img) for img in images], np.float32).reshape(-1, 1)
    return {"root": str(root.resolve()), "skipped": errors,
            "formats": {f: metrics.set_figures(folder_of, found.names, p, classes, pos, manifest.threshold)
                        for f, p in per_format.items()}}
