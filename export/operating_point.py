"""The decision threshold a clinic uses: chosen on the validation split for a target sensitivity.

Accuracy at 0.5 is not an operating point. For a sigmoid model we pick the threshold at which the
disease (positive) class reaches the target sensitivity on the validation images, then express
it on the model's output, P(labels[1]), which is what the runner compares.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xray_edge import metrics
from xray_edge.preprocess import Preprocessing, load_images
from xray_edge.serve.drift import score_distribution
from xray_edge.training_record import TrainingRecord

DEFAULT_TARGET_SENSITIVITY = 0.95


def choose_threshold(model, record: TrainingRecord | None, spec: Preprocessing, target: float,
                     known: dict[Path, np.ndarray] | None = None) -> tuple[float, dict]:
    """Return (threshold on P(labels[1]), description for the manifest).

    `known`: the Keras probabilities already computed for some files (export's parity images are
    largely the validation split); only the others are decoded and predicted here.
    Falls back to 0.5, saying why, when there is no labelled validation split to choose on.
    """
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
    score = metrics.positive_score(probs, pos)
    threshold = metrics.output_threshold_for_sensitivity(y, probs, pos, target)  # as calibrate
    t_pos = threshold if pos == 1 else 1.0 - threshold
    rep = metrics.binary_report(y, score, t_pos)
    return float(threshold), {
        "threshold": float(threshold),
        "chosen_on": f"validation split, {len(y)} images",
        "positive_class": classes[pos],
        "target_sensitivity": target,
        "validation_sensitivity": rep["sensitivity"],
        "validation_specificity": rep["specificity"],
        # P(labels[1]) on the validation split, as quantiles: the service's drift reference
        "validation_scores": score_distribution(probs[:, -1]),
    }
