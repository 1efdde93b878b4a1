"""The decision threshold a clinic uses: the one chosen at training, on the validation split.

Accuracy at 0.5 is not an operating point. Training picks the threshold at which the disease
(positive) class reaches the target sensitivity on the validation images (`metrics.operating_point`,
on the model's output P(labels[1]), which is what the runner compares) and stores it in
training.json; export reuses it, so the manifest ships the threshold every training figure was
measured at. Only a record without one (older trainings) or another target makes export choose
again, with the same rule on the same split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xray_edge import metrics
from xray_edge.preprocess import Preprocessing, load_images
from xray_edge.training_record import TrainingRecord

DEFAULT_TARGET_SENSITIVITY = 0.95


def choose_threshold(model, record: TrainingRecord | None, spec: Preprocessing, target: float,
                     known: dict[Path, np.ndarray] | None = None) -> tuple[float, dict]:
    """Return (threshold on P(labels[1]), description for the manifest).

    `known`: the Keras probabilities already computed for some files (export's parity images are
    largely the validation split); only the others are decoded and predicted here.
    Falls back to 0.5, saying why, when there is no labelled validation split to choose on.
    """
    stored = (record.operating_point or {}) if record else {}
    if stored.get("threshold") is not None and stored.get("target_sensitivity") == target:
        return float(stored["threshold"]), {**stored, "chosen_on": f"training.json: {stored.get('chosen_on')}"}
    paths, labels = record.split("validation") if record else ([], [])
    if record is None or len(record.classes) != 2 or not paths or -1 in labels:
        return 0.5, {"threshold": 0.5, "chosen_on": "default 0.5 (no labelled validation split in training.json)"}
    classes, pos = record.classes, record.positive_index
    by_path = dict(known or {})
    missing = [p for p in paths if p not in by_path]
    images, decoded, _ = load_images(missing, spec)
    if len(images):
        by_path.update(zip((missing[i] for i in decoded), model.predict(images, batch_size=16, verbose=0)))
    ok = [i for i, p in enumerate(paths) if p in by_path]  # files that could not be decoded are left out
    y = np.asarray([labels[i] for i in ok]) == pos
    if y.sum() == 0 or (~y).sum() == 0:
        return 0.5, {"threshold": 0.5, "chosen_on": "default 0.5 (validation split lacks a class)"}
    probs = np.asarray([by_path[paths[i]] for i in ok], dtype=np.float64).reshape(len(ok), -1)
    point = metrics.operating_point(y, probs, pos, target, f"validation split, {len(y)} images")
    return point["threshold"], {**point, "positive_class": classes[pos]}
