"""Classification metrics in plain numpy, shared by training, export and the report.

Binary figures are for a named positive (disease) class; scores are that class's probability.
"""

from __future__ import annotations

import math

import numpy as np


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for k successes in n trials; (0, 1) when n is 0."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties count one half); NaN with one class."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average ranks over ties
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending; predict positive when score >= threshold."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    thresholds = np.concatenate([[np.inf], np.unique(s)[::-1]])
    tpr = np.array([(s[y] >= t).mean() if y.any() else 0.0 for t in thresholds])
    fpr = np.array([(s[~y] >= t).mean() if (~y).any() else 0.0 for t in thresholds])
    return fpr, tpr, thresholds


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)), 1)
    return m


def positive_score(probs: np.ndarray, pos: int) -> np.ndarray:
    """Probability of class `pos` from [N, K] outputs; a sigmoid's single unit is P(class 1)."""
    probs = np.asarray(probs)
    if probs.shape[-1] == 1:
        return probs[:, 0] if pos == 1 else 1.0 - probs[:, 0]
    return probs[:, pos]


def decision_report(y_pos: np.ndarray, called_pos: np.ndarray) -> dict:
    """Accuracy, sensitivity and specificity (each with its Wilson 95% interval) of decisions.

    Args:
        y_pos: True where the case belongs to the positive (disease) class.
        called_pos: True where the model called it positive.
    """
    y = np.asarray(y_pos).astype(bool)
    pred = np.asarray(called_pos).astype(bool)
    tp, fn = int((pred & y).sum()), int((~pred & y).sum())
    tn, fp = int((~pred & ~y).sum()), int((pred & ~y).sum())

    def rate(k: int, m: int) -> dict:
        return {"value": k / m if m else float("nan"), "ci95": list(wilson_interval(k, m)),
                "k": k, "n": m}

    return {
        "n": len(y),
        "accuracy": rate(tp + tn, len(y)),
        "sensitivity": rate(tp, tp + fn),
        "specificity": rate(tn, tn + fp),
        "confusion": {"tp": tp, "fn": fn, "tn": tn, "fp": fp},
    }


def binary_report(y_true: np.ndarray, pos_score: np.ndarray, threshold: float) -> dict:
    """`decision_report` at `pos_score >= threshold`, plus the threshold and ROC AUC.

    Args:
        y_true: 1 for the positive (disease) class, 0 otherwise.
        pos_score: probability of the positive class.
        threshold: call positive when pos_score >= threshold.
    """
    rep = decision_report(y_true, np.asarray(pos_score) >= threshold)
    return {"threshold": threshold, **rep, "roc_auc": roc_auc(y_true, pos_score)}


def threshold_for_sensitivity(y_true: np.ndarray, pos_score: np.ndarray, target: float) -> float:
    """A threshold on the positive score whose sensitivity on these cases is at least `target`.

    Among the thresholds that meet the target it takes the highest interval, and returns its
    midpoint: halfway between the k-th highest positive score and the next lower score of any
    case, so no case sits exactly on the threshold (where int8 rounding would flip it).
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(pos_score, dtype=np.float64)
    pos = np.sort(s[y])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive cases to set a sensitivity target on")
    k = max(1, math.ceil(target * len(pos) - 1e-9))
    edge = float(pos[k - 1])
    below = s[s < edge]
    return (edge + float(below.max())) / 2 if len(below) else edge / 2


def output_threshold_for_sensitivity(y_pos: np.ndarray, probs: np.ndarray, pos: int,
                                     target: float) -> float:
    """`threshold_for_sensitivity`, expressed on the model's output P(labels[1]).

    The one rule behind export's operating point and `xray-edge calibrate`. The runner calls
    labels[1] when P(labels[1]) >= threshold; when the positive class is labels[0], "score >= t"
    is "P(labels[1]) <= 1 - t", and the midpoint rule keeps every case off the boundary.

    Args:
        y_pos: True where the case is of the positive (disease) class.
        probs: the model's [N, 1] sigmoid outputs.
        pos: index of the positive class (0 or 1).
        target: sensitivity the threshold must reach on these cases.
    """
    t_pos = threshold_for_sensitivity(y_pos, positive_score(probs, pos), target)
    return float(t_pos if pos == 1 else 1.0 - t_pos)


def positive_index(classes, named: str | None = None, strict: bool = True) -> int:
    """The disease (positive) class of binary figures: the one rule, for train, export, report, calibrate.

    `named` when given; else the one class not named NORMAL when there is exactly one; else
    labels[0] (the tutorial's COVID19). `strict=False`: a `named` that is not one of `classes`
    (a record or manifest written for other labels) falls back to the rule instead of raising.

    Raises:
        ValueError: `named` is not one of `classes` (strict only).
    """
    classes = list(classes)
    if named is not None and (strict or named in classes):
        if named not in classes:
            raise ValueError(f"positive class {named!r} is not one of {classes}")
        return classes.index(named)
    others = [i for i, c in enumerate(classes) if c.upper() != "NORMAL"]
    return others[0] if len(others) == 1 else 0


def min_positives(target: float) -> int:
    """Positives needed before a sensitivity target means anything: one miss moves it by 1 - target."""
    return math.ceil(1 / (1 - target) - 1e-9) if target < 1 else 1 << 30


def operating_point(y_pos: np.ndarray, probs: np.ndarray, pos: int, target: float, chosen_on: str) -> dict:
    """The threshold on P(labels[1]) for `target` sensitivity on these cases, and how sure it is.

    The record every later figure reads (training.json, then the manifest): threshold, the
    cases it was chosen on, the figures there, and a warning when the positives are too few for
    the target (`min_positives`).
    """
    y = np.asarray(y_pos, bool)
    probs = np.asarray(probs, np.float64).reshape(len(y), -1)
    thr = output_threshold_for_sensitivity(y, probs, pos, target)
    called = (probs[:, 0] >= thr) if pos == 1 else (probs[:, 0] < thr)
    rep = decision_report(y, called)
    point = {"threshold": float(thr), "chosen_on": chosen_on, "rule": "threshold_for_sensitivity",
             "target_sensitivity": target, "positives": int(y.sum()), "negatives": int((~y).sum()),
             "validation_sensitivity": rep["sensitivity"], "validation_specificity": rep["specificity"],
             # P(labels[1]) on these cases, as quantiles: the service's drift reference
             "validation_scores": score_distribution(probs[:, -1])}
    need = min_positives(target)
    if y.sum() < need:
        point["warning"] = (f"chosen on {int(y.sum())} positives: a sensitivity target of {target} needs "
                            f"at least {need} (one missed case moves it by {1 / max(1, y.sum()):.0%}); "
                            "add positives to the validation split or lower the target")
    return point


def set_figures(folder_of: np.ndarray, folders: list[str], probs: np.ndarray, classes, pos: int,
                threshold: float) -> dict:
    """Figures of one labelled set (a test source, an external set) at the shipped threshold.

    Args:
        folder_of: index into `folders` per image.
        folders: the set's folder names: model classes, or others (e.g. PNEUMONIA).
        probs: the model's [N, 1] sigmoid outputs, P(labels[1]).
        threshold: the decision threshold on P(labels[1]), as the runner applies it.
    Returns:
        per folder: films, share called each class, mean score of the positive class, and for a
        folder that is no model class its ROC AUC against the negative class ("pneumonia vs
        normal"); sensitivity / specificity with 95% Wilson intervals where the set holds that
        class; ROC AUC where it holds both.
    """
    classes = list(classes)
    folder_of = np.asarray(folder_of, np.int64)
    probs = np.asarray(probs, np.float64).reshape(len(folder_of), -1)
    score = positive_score(probs, pos)
    called = (probs[:, 0] >= threshold).astype(np.int64)  # index of the class called
    neg = 1 - pos
    neg_rows = folder_of == folders.index(classes[neg]) if classes[neg] in folders else np.zeros(len(score), bool)
    out: dict = {"threshold": threshold, "positive_class": classes[pos], "folders": {}}
    for f, name in enumerate(folders):
        rows = folder_of == f
        if not rows.any():
            continue
        entry = {"n": int(rows.sum()),
                 "called": {c: float((called[rows] == i).mean()) for i, c in enumerate(classes)},
                 "mean_score": float(score[rows].mean())}
        if name not in classes and neg_rows.any():
            both = rows | neg_rows
            entry[f"roc_auc_vs_{classes[neg]}"] = roc_auc(rows[both], score[both])
        out["folders"][name] = entry
    in_model = np.isin(folder_of, [folders.index(c) for c in classes if c in folders])
    y_pos = np.asarray([folders[f] == classes[pos] for f in folder_of[in_model]], bool)
    rep = decision_report(y_pos, called[in_model] == pos)
    if y_pos.any():
        out["sensitivity"] = rep["sensitivity"]
    if (~y_pos).any():
        out["specificity"] = rep["specificity"]
    if y_pos.any() and (~y_pos).any():
        out["roc_auc"] = roc_auc(y_pos, score[in_model])
    return out


def score_distribution(scores) -> dict:
    """What export stores: 101 quantiles (0%, 1%, ..., 100%) of the validation scores and n."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    s = s[np.isfinite(s)]
    if s.size == 0:
        return {}
    return {"n": int(s.size), "quantiles": [round(float(q), 6) for q in np.quantile(s, np.linspace(0, 1, 101))]}
