"""The shortcut detector: the frame share flags a planted marker; the report's saliency page.

A hospital's burned-in label that correlates with the diagnosis is the classic shortcut. Here
every COVID19 phantom carries a bright square in its top-left corner: a model trained on them
reads the square, not the lungs, and the frame share must say so, against the same training
without the marker, whose attribution falls on the lung opacities (the phantom generator's lung
mask gives the exact "lung share").
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from phantom_models import fit_tiny, phantom_arrays
from xray_edge import explain as ex

COVID = 0  # phantom class index; the sigmoid output is P(NORMAL)


@pytest.fixture(scope="module")
def models():
    out = {}
    for marker in (True, False):
        x, y, _ = phantom_arrays(30, seed=0, marker=marker)
        out[marker] = fit_tiny(x, y)
    return out


def _covid_test_images(marker: bool):
    x, y, lungs = phantom_arrays(6, seed=1, marker=marker)  # seeds unseen in training
    return x, y, lungs


def _shares(model, x, lungs):
    """(frame share, lung share) of the occlusion attribution for P(COVID19), per image."""
    def p_covid(batch):
        return 1 - model.predict(batch, verbose=0, batch_size=128)[:, 0]

    frame, lung = [], []
    for img, mask in zip(x, lungs):
        _, _, pixels = ex.occlusion_scores(img, p_covid)
        frame.append(ex.frame_share(pixels))
        lung.append(ex.share_inside(pixels, mask))
    return np.array(frame), np.array(lung)


@pytest.mark.parametrize("marker", [True, False])
def test_models_learn_the_task(models, marker):
    x, y, _ = _covid_test_images(marker)
    called_normal = models[marker].predict(x, verbose=0)[:, 0] >= 0.5
    assert (called_normal == (y == 1)).mean() >= 0.9  # attribution of a working model, not noise


def test_frame_share_flags_a_planted_corner_marker(models):
    x, y, lungs = _covid_test_images(marker=True)
    covid = y == COVID
    frame_marked, lung_marked = _shares(models[True], x[covid], lungs[covid])
    x, y, lungs = _covid_test_images(marker=False)
    frame_clean, lung_clean = _shares(models[False], x[covid], lungs[covid])
    # the shortcut: nearly all attribution in the frame, nearly none on the lungs
    assert frame_marked.min() > 0.7 and np.median(lung_marked) < 0.1, (frame_marked, lung_marked)
    # the honest model: little in the frame, most on the lungs (which cover ~30% of the image)
    assert np.median(frame_clean) < 0.3 and frame_clean.max() < 0.45, frame_clean
    assert np.median(lung_clean) > 0.5, lung_clean


def test_grad_cam_sees_the_marker_too(models):
    from xray_edge.export.report.saliency import grad_cam

    shares = {}
    for marker in (True, False):
        x, y, _ = _covid_test_images(marker)
        covid = y == COVID
        cams = grad_cam(models[marker], x[covid], np.zeros(covid.sum(), int))  # explain COVID19
        shares[marker] = np.array([ex.frame_share(c) for c in cams])
    assert np.median(shares[True]) > 0.5 > np.median(shares[False]), shares


def test_report_saliency_page(tiny_artifacts):
    from xray_edge.export.report import render
    from xray_edge.export.report.build import build_report

    rep = build_report(tiny_artifacts, saliency_per_class=2)
    render.write(rep, tiny_artifacts)
    sal = rep["saliency"]
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    rows = [(r["format"], r["file"], r["method"]) for r in sal["rows"]]
    assert rows == [("keras", "model.keras", "Grad-CAM")] + [
        (e["format"], name, "occlusion") for name, e in manifest["files"].items()]
    assert len(sal["images"]) == 4
    for r in sal["rows"]:
        assert len(r["per_image"]) == 4 and set(r["by_class"]) == set(manifest["labels"])
        finite = [s for s in r["per_image"] if np.isfinite(s)]
        assert all(0 <= s <= 1 for s in finite)
        if finite:
            assert r["frame_share"] == pytest.approx(np.mean(finite), abs=1e-4)
    md = (tiny_artifacts / "report.md").read_text()
    assert "**Frame share**" in md and "| Grad-CAM | model.keras |" in md
    assert (tiny_artifacts / "report_saliency.png").stat().st_size > 10_000
