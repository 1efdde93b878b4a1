"""Measure every exported format on the same test images: size, speed, parity, clinical figures.

One row per format, the Keras model first as the reference. Every number comes from this run.
"""

from __future__ import annotations

import json
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
from xray_edge.files import sha256_file
from xray_edge.inputs import walk_images
from xray_edge.manifest import MANIFEST_NAME, read_manifest
from xray_edge.preprocess import Preprocessing


@dataclass
class TestSet:
    paths: list[Path]
    labels: np.ndarray  # class index per path
    source: str


def test_set(artifacts: Path, classes: list[str], data: Path | None) -> TestSet:
    """The test split recorded at training, or a folder laid out as DATA/<class>/* (or DATA/test/<class>/*)."""
    if data is None:
        rec_path = artifacts / "training.json"
        if not rec_path.exists():
            raise XrayEdgeError(f"no {rec_path}: pass --data FOLDER with <class>/ subfolders")
        rec = json.loads(rec_path.read_text())
        files, labels = rec.get("files", {}).get("test", []), rec.get("labels", {}).get("test", [])
        pairs = [(Path(f), l) for f, l in zip(files, labels) if Path(f).exists()]
        if not pairs:
            raise XrayEdgeError(f"{rec_path}: lists no test images that exist here; pass --data")
        return TestSet([p for p, _ in pairs], np.asarray([l for _, l in pairs]), f"test split of {rec.get('data')}")
    root = data / "test" if (data / "test").is_dir() else data
    paths, labels = [], []
    for i, c in enumerate(classes):
        found = list(walk_images(root / c)) if (root / c).is_dir() else []
        paths += found
        labels += [i] * len(found)
    if not paths:
        raise XrayEdgeError(f"{root}: no images in class folders {classes}")
    return TestSet(paths, np.asarray(labels), str(root))


def _row(name: str, fmt: str, size: int, load_s: float, probs: np.ndarray, lat_ms: list[float],
         ref: np.ndarray, y: np.ndarray, pos: int, thresholds: dict[str, float]) -> dict:
    row = {
        "format": fmt, "file": name, "size_mb": round(size / 1e6, 2), "load_ms": round(load_s * 1e3, 1),
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


def build_report(artifacts: Path, data: Path | None = None, runs_per_image: int = 1) -> dict:
    """Run Keras and every file of the manifest over the test images; return the report dict."""
    manifest = read_manifest(artifacts / MANIFEST_NAME)
    classes = manifest["labels"]
    if len(classes) != 2:
        raise XrayEdgeError("the report covers two-class (sigmoid) models")
    pos = classes.index(manifest.get("positive_class") or classes[0])
    spec = Preprocessing.from_dict(manifest["input"]["preprocessing"])
    ts = test_set(artifacts, classes, data)

    from xray_edge.train.cache import decode_images

    images, ok, errors = decode_images(ts.paths, spec, None, label="test images")
    y = ts.labels[ok]
    thresholds = {"at_manifest_threshold": float(manifest["threshold"]), "at_0.5": 0.5}

    import keras

    t = time.perf_counter()
    model = keras.saving.load_model(artifacts / manifest["source_model"]["file"], compile=False)
    load_s = time.perf_counter() - t
    lat, ref = [], []
    for img in images:
        t = time.perf_counter()
        ref.append(np.asarray(model(img[None].astype("float32"), training=False))[0])
        lat.append((time.perf_counter() - t) * 1e3)
    ref = np.asarray(ref, dtype=np.float32)
    keras_file = artifacts / manifest["source_model"]["file"]
    rows = [_row(keras_file.name, f"keras ({keras.backend.backend()})", keras_file.stat().st_size, load_s,
                 ref, lat, ref, y, pos, thresholds)]
    for name, entry in manifest["files"].items():
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
        rows.append(_row(name, f"{entry['format']} ({be.name} {be.version})", (artifacts / name).stat().st_size,
                         load_s, np.asarray(probs, dtype=np.float32), lat, ref, y, pos, thresholds))
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform(terse=True)}",
        "runtimes": manifest.get("versions", {}),
        "model_sha256": sha256_file(keras_file),
        "synthetic": manifest.get("training", {}).get("synthetic", False),
        "trained_on": manifest.get("training", {}).get("data"),
        "test_source": ts.source,
        "images_per_class": {c: int((y == i).sum()) for i, c in enumerate(classes)},
        "skipped": errors,
        "classes": classes,
        "positive_class": classes[pos],
        "operating_point": manifest.get("operating_point", {"threshold": manifest["threshold"]}),
        "labels": y.tolist(),
        "rows": rows,
    }
