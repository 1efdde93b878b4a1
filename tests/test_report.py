"""The per-format report and the operating point chosen for a target sensitivity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from conftest import keras_probs, run_cli
from xray_edge.classify import decide
from xray_edge.metadata import ModelInfo
from xray_edge.preprocess import load_image


def test_threshold_meets_target_sensitivity_on_validation(shared_artifacts):
    """Recompute, independently of export: Keras on the validation files, the runner's rule."""
    m = json.loads((shared_artifacts / "manifest.json").read_text())
    rec = json.loads((shared_artifacts / "training.json").read_text())
    op = m["operating_point"]
    # chosen once, at training; export reuses it and says so
    assert op["chosen_on"].startswith("training.json: validation split at training")
    assert op["target_sensitivity"] == 0.95 and m["threshold"] == rec["operating_point"]["threshold"]
    metrics_json = json.loads((shared_artifacts / "metrics.json").read_text())
    assert metrics_json["threshold"] == m["threshold"]  # train's test figures are at the shipped threshold
    paths = [Path(p) for p in rec["files"]["validation"]]
    y = np.asarray(rec["labels"]["validation"])
    probs = keras_probs(shared_artifacts / "model.keras", np.stack([load_image(p) for p in paths]))
    info = ModelInfo(tuple(m["labels"]), m["threshold"])
    called = np.array([decide(p, info, m["threshold"])[0] for p in probs])
    positive = m["positive_class"]
    sens = (called[y == m["labels"].index(positive)] == positive).mean()
    assert sens >= 0.95, (sens, m["threshold"])


def test_report_rows_and_columns_filled(shared_artifacts):
    r = run_cli("report", "--artifacts", shared_artifacts, "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    formats = [row["format"].split()[0] for row in rep["rows"]]
    assert formats[0] == "keras" and set(formats[1:]) == {"float32", "int8", "onnx", "onnx-int8"}
    n = sum(rep["images_per_class"].values())
    assert n == len(rep["labels"]) > 10
    for row in rep["rows"]:
        assert row["size_mb"] > 1 and row["latency_p50_ms"] > 0 and len(row["probabilities"]) == n
        for key in ("at_manifest_threshold", "at_0.5"):
            at = row[key]
            assert at["sensitivity"]["n"] + at["specificity"]["n"] == n
            lo, hi = at["sensitivity"]["ci95"]
            assert 0 <= lo <= at["sensitivity"]["value"] <= hi <= 1
    assert rep["rows"][0]["max_abs_diff_vs_keras"] == 0.0 and rep["rows"][0]["at_0.5"]["flips_vs_keras"] == 0
    md = (shared_artifacts / "report.md").read_text()
    formats_part, per_source = md.split("## Test split per data source")
    assert "Not a medical device" in md and formats_part.count("| keras") == 2
    assert per_source.count("| keras") == 2  # one source, its two class folders
    assert set(rep["sources"]) == {"chest-xray-small"}
    for png in ("report_roc.png", "report_confusion.png", "report_calibration.png"):
        assert (shared_artifacts / png).stat().st_size > 5000


def test_report_marks_synthetic_data(tiny_artifacts):
    r = run_cli("report", "--artifacts", tiny_artifacts)
    assert r.returncode == 0, r.stderr
    assert "SYNTHETIC" in (tiny_artifacts / "report.md").read_text()


def test_report_per_source_and_external_through_every_format(tiny_artifacts, tmp_path):
    """The test split per data source and an external set (one model class + PNEUMONIA), every format."""
    import shutil

    from xray_edge.train.phantom import generate_source

    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)
    rec = json.loads((art / "training.json").read_text())
    n = len(rec["files"]["test"])
    rec["sources"] = [{"name": "hospital_a"}, {"name": "hospital_b"}]
    rec["file_sources"] = {"test": [i % 2 for i in range(n)]}
    (art / "training.json").write_text(json.dumps(rec))
    ext = generate_source(tmp_path / "ext", {"NORMAL": 5, "PNEUMONIA": 4}, seed=4)
    r = run_cli("report", "--artifacts", art, "--saliency-images", "0", "--external", f"hosp_c={ext}", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    formats = [row["format"] for row in rep["rows"]]
    assert set(rep["sources"]) == {"hospital_a", "hospital_b"}
    for name, per_format in rep["sources"].items():
        assert list(per_format) == formats
        assert sum(f["n"] for f in per_format[formats[0]]["folders"].values()) in (n // 2, n - n // 2)
    e = rep["external"]["hosp_c"]["formats"]
    assert list(e) == formats
    for f in e.values():
        assert f["folders"]["NORMAL"]["n"] == 5 and f["folders"]["PNEUMONIA"]["n"] == 4
        assert "specificity" in f and "sensitivity" not in f and "roc_auc_vs_NORMAL" in f["folders"]["PNEUMONIA"]
    # every exported file agrees with Keras on the share called, within the int8 gate's flips
    keras_share = e[formats[0]]["folders"]["NORMAL"]["called"]["NORMAL"]
    assert all(abs(f["folders"]["NORMAL"]["called"]["NORMAL"] - keras_share) <= 0.2 for f in e.values())
    md = (art / "report.md").read_text()
    assert "## Test split per data source" in md and "## External sets" in md and "hosp_c" in md
