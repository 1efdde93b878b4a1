"""Metric code against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xray_edge import metrics


def test_wilson_at_zero_and_n():
    lo, hi = metrics.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)  # 3.84 / 13.84
    lo, hi = metrics.wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 - 0.2775, abs=1e-4)
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_middle_case_by_hand():
    # k=8, n=10, z=1.96: centre (0.8 + 0.19208)/1.38416, half 1.96*sqrt(0.016+0.009604)/1.38416
    z = 1.959964
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    assert metrics.wilson_interval(8, 10) == pytest.approx((centre - half, centre + half))
    assert metrics.wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)


def test_auc_hand_cases():
    y = np.array([0, 0, 1, 1])
    assert metrics.roc_auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert metrics.roc_auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    # one of four pairs misordered, one tied: (2 + 0.5) / 4
    assert metrics.roc_auc(y, np.array([0.1, 0.5, 0.5, 0.9])) == pytest.approx(0.875)
    assert metrics.roc_auc(y, np.array([0.1, 0.6, 0.5, 0.9])) == pytest.approx(0.75)
    assert math.isnan(metrics.roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_binary_report_counts_and_rates():
    y = np.array([1, 1, 1, 0, 0])
    s = np.array([0.9, 0.6, 0.4, 0.7, 0.1])
    r = metrics.binary_report(y, s, 0.5)
    assert r["confusion"] == {"tp": 2, "fn": 1, "tn": 1, "fp": 1}
    assert r["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert r["specificity"]["value"] == pytest.approx(1 / 2)
    assert r["accuracy"]["value"] == pytest.approx(3 / 5)


def test_threshold_for_sensitivity_meets_target():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    for target in (0.8, 0.9, 0.95, 1.0):
        t = metrics.threshold_for_sensitivity(y, s, target)
        sens = (s[y == 1] >= t).mean()
        assert sens >= target
        # the highest interval that meets it: just above the next positive score misses it
        higher = np.sort(s[(y == 1) & (s >= t)])
        if target < 1.0:
            assert (s[y == 1] >= np.nextafter(higher[0], 2)).mean() < target
        assert not np.any(s == t)  # no case sits on the threshold


def test_threshold_for_sensitivity_by_hand():
    y = np.array([1, 1, 1, 1, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.2, 0.1])
    # 75% of 4 positives = 3: the third-highest positive is 0.6; next lower score is 0.3
    assert metrics.threshold_for_sensitivity(y, s, 0.75) == pytest.approx(0.45)
    assert metrics.threshold_for_sensitivity(y, s, 1.0) == pytest.approx(0.25)


def test_confusion_matrix():
    m = metrics.confusion_matrix([0, 1, 2, 2], [0, 2, 2, 1], 3)
    assert m.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]


def test_one_decision_rule_for_runner_training_and_report():
    """A probability exactly at the threshold is labels[1] for the runner, and counted so."""
    from xray_edge.classify import decide, predicted_classes
    from xray_edge.metadata import ModelInfo
    from xray_edge.train.trainer import evaluate

    probs = np.array([[0.3], [0.42], [0.9]], dtype=np.float32)
    thr = float(probs[1, 0])
    info = ModelInfo(("COVID19", "NORMAL"), thr)
    assert [decide(p, info, thr)[0] for p in probs] == ["COVID19", "NORMAL", "NORMAL"]
    assert predicted_classes(probs, thr).tolist() == [0, 1, 1]
    # COVID19 (index 0) positive: the case at the threshold is called NORMAL, a missed positive
    m = evaluate(probs, np.array([0, 0, 1]), ["COVID19", "NORMAL"], pos=0, threshold=thr)
    assert m["confusion"] == {"tp": 1, "fn": 1, "tn": 1, "fp": 0}
    assert metrics.positive_score(probs, 0) == pytest.approx(1 - probs[:, 0])
    softmax = np.array([[0.2, 0.5, 0.3]])
    assert predicted_classes(softmax, None).tolist() == [1]
