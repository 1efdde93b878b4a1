"""The decision threshold a clinic uses: chosen on the validation split for a target sensitivity.

Accuracy at 0.5 is not an operating point. For a sigmoid model we pick the threshold at which the
disease (positive) class reaches the target sensitivity on the validation images, then express
it on the model's output, P(labels[1]), which is what the runner compares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xray_edge import metrics

DEFAULT_TARGET_SENSITIVITY = 0.95


def choose_threshold(model, record: dict, spec, target: float, decode) -> tuple[float, dict]:
    """Return (threshold on P(labels[1]), description for the manifest).

    Falls back to 0.5, saying why, when there is no labelled validation split to choose on.
    """
    classes = record.get("classes") or []
    files = record.get("files", {}).get("validation", [])
    labels = record.get("labels", {}).get("validation", [])
    if len(classes) != 2 or not files or len(files) != len(labels):
        return 0.5, {"threshold": 0.5, "chosen_on": "default 0.5 (no labelled validation split in training.json)"}
    pos = classes.index(record.get("positive_class") or classes[0])
    paths = [Path(p) for p in files]
    keep = [i for i, p in enumerate(paths) if p.exists()]
    images, ok, _ = decode([paths[i] for i in keep], spec)
    y = np.asarray([labels[keep[i]] for i in ok]) == pos
    if y.sum() == 0 or (~y).sum() == 0:
        return 0.5, {"threshold": 0.5, "chosen_on": "default 0.5 (validation split lacks a class)"}
    probs = np.asarray(model.predict(images, batch_size=16, verbose=0), dtype=np.float64)
    score = metrics.positive_score(probs, pos)
    t_pos = metrics.threshold_for_sensitivity(y, score, target)
    # positive when score >= t_pos; the runner says labels[1] when p1 >= threshold
    threshold = t_pos if pos == 1 else 1.0 - t_pos
    rep = metrics.binary_report(y, score, t_pos)
    return float(threshold), {
        "threshold": float(threshold),
        "chosen_on": f"validation split, {len(y)} images",
        "positive_class": classes[pos],
        "target_sensitivity": target,
        "validation_sensitivity": rep["sensitivity"],
        "validation_specificity": rep["specificity"],
    }
