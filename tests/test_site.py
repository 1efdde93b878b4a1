"""`xray-edge calibrate` and site.json: a threshold for the site's own score distribution.

The model is a tiny CNN trained on phantoms of one contrast; its operating point is chosen at
export on a validation split of that contrast. The "site" has darker films, where the model's
scores shift towards NORMAL: the exported threshold misses COVID19 cases there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import export_folder, keras_probs, run_cli
from phantom_models import fit_tiny, phantom_arrays
from xray_edge import metrics, site
from xray_edge.classify import predicted_classes
from xray_edge.errors import ModelError
from xray_edge.files import sha256_file
from xray_edge.preprocess import load_image
from xray_edge.train.phantom import CLASSES
from xray_edge.training_record import TrainingRecord

TARGET = 0.95
FILE = "xray_float32.tflite"  # float: the independent Keras check agrees to 1e-6


def darker(a):
    return a * 0.6


def _write_pngs(folder: Path, x: np.ndarray, y: np.ndarray, prefix: str) -> list[str]:
    paths = []
    for i, (img, label) in enumerate(zip(x, y)):
        p = folder / CLASSES[label] / f"{prefix}_{i:03d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[:, :, 0]).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """(artifacts folder exported with a validation-chosen threshold, site folder of darker films)."""
    root = tmp_path_factory.mktemp("site")
    x, y, _ = phantom_arrays(30, seed=0)
    model = fit_tiny(x, y, epochs=6)
    art = root / "artifacts"
    art.mkdir()
    model.save(art / "model.keras")
    xv, yv, _ = phantom_arrays(12, seed=1)
    train_files = _write_pngs(root / "source" / "train", x[::3], y[::3], "train")
    val_files = _write_pngs(root / "source" / "validation", xv, yv, "val")
    TrainingRecord(classes=list(CLASSES), positive_class="COVID19", data=str(root / "source"), synthetic=True,
                   files={"train": train_files, "validation": val_files, "test": val_files},
                   labels={"train": y[::3].tolist(), "validation": yv.tolist(), "test": yv.tolist()}).write(art)
    result = export_folder(art / "model.keras", formats=("float32", "int8"), target_sensitivity=TARGET)
    assert result.passed, [r.line() for r in result.results]
    xs, ys, _ = phantom_arrays(12, seed=7, transform=darker)
    _write_pngs(root / "site", xs, ys, "site")
    return art, root / "site"


@pytest.fixture
def artifacts(shifted, tmp_path):
    """A private copy: each test writes its own site.json."""
    return Path(shutil.copytree(shifted[0], tmp_path / "artifacts"))


def _site_probs(art: Path, site_dir: Path):
    paths = sorted(site_dir.glob("*/*.png"))
    y = np.array([CLASSES.index(p.parent.name) for p in paths])
    return keras_probs(art / "model.keras", np.stack([load_image(p) for p in paths])), y == 0


def test_calibrate_restores_target_sensitivity_at_shifted_site(artifacts, shifted):
    site_dir = shifted[1]
    before = {p.name: sha256_file(p) for p in artifacts.iterdir() if p.is_file()}
    r = run_cli("calibrate", "--model", artifacts, "--file", FILE, "--data", site_dir,
                "--target-sensitivity", TARGET, "--json")
    assert r.returncode == 0, r.stderr
    rec = json.loads((artifacts / "site.json").read_text())
    assert rec == json.loads(r.stdout)
    # the model files and the manifest are untouched; site.json is bound to the file it measured
    assert {p.name: sha256_file(p) for p in artifacts.iterdir() if p.is_file() and p.name != "site.json"} == before
    assert rec["model_sha256"] == before[FILE] and rec["model_file"] == FILE
    assert rec["counts"] == {"COVID19": 12, "NORMAL": 12} and rec["rule"]["target_sensitivity"] == TARGET

    # recomputed independently with Keras and the runner's rule
    manifest_thr = json.loads((artifacts / "manifest.json").read_text())["threshold"]
    probs, covid = _site_probs(artifacts, site_dir)

    def sensitivity(thr):
        return (predicted_classes(probs, thr)[covid] == 0).mean()

    def specificity(thr):
        return (predicted_classes(probs, thr)[~covid] == 1).mean()

    assert rec["previous_threshold"] == manifest_thr
    assert sensitivity(manifest_thr) < TARGET, "the darker site should shift scores past the threshold"
    assert sensitivity(rec["threshold"]) >= TARGET
    for key, thr in (("previous", manifest_thr), ("site", rec["threshold"])):
        f = rec["figures"][key]
        assert f["sensitivity"]["value"] == pytest.approx(sensitivity(thr))
        assert f["specificity"]["value"] == pytest.approx(specificity(thr))
        lo, hi = f["sensitivity"]["ci95"]
        assert lo <= f["sensitivity"]["value"] <= hi
    assert 0 <= rec["figures"]["split_half"]["sensitivity"] <= 1


def test_classify_takes_site_json_only_for_its_own_file(artifacts, shifted):
    r = run_cli("calibrate", "--model", artifacts, "--file", FILE, "--data", shifted[1])
    assert r.returncode == 0, r.stderr
    assert "previous threshold" in r.stdout and "site threshold" in r.stdout
    thr = json.loads((artifacts / "site.json").read_text())["threshold"]
    img = next(shifted[1].glob("COVID19/*.png"))

    def classify(*extra):
        return run_cli("classify", "--model", artifacts, "--json", *extra, img)

    d = json.loads(classify("--file", FILE).stdout.splitlines()[-1])
    assert (d["threshold"], d["threshold_source"]) == (thr, "site.json")
    d = json.loads(classify("--file", FILE, "--threshold", "0.3").stdout.splitlines()[-1])
    assert (d["threshold"], d["threshold_source"]) == (0.3, "--threshold")
    # another file of the same folder: refused in one line, exit 2
    r = classify("--file", "xray_int8.tflite")
    assert r.returncode == 2 and r.stdout == ""
    err = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith(("INFO", "warning"))]
    assert len(err) == 1 and "site.json" in err[0] and "calibrate" in err[0]
    # without site.json: the manifest's
    (artifacts / "site.json").unlink()
    d = json.loads(classify("--file", FILE).stdout.splitlines()[-1])
    assert d["threshold_source"] == "manifest"


def test_too_few_images_is_one_line_error(artifacts, shifted, tmp_path):
    small = tmp_path / "small"
    for cls, n in (("COVID19", 9), ("NORMAL", 12)):
        (small / cls).mkdir(parents=True)
        for p in sorted((shifted[1] / cls).glob("*.png"))[:n]:
            shutil.copy(p, small / cls / p.name)
    r = run_cli("calibrate", "--model", artifacts, "--file", FILE, "--data", small)
    assert r.returncode == 2 and not (artifacts / "site.json").exists()
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("INFO")]
    assert len(lines) == 1 and "COVID19: 9" in lines[0] and "at least 10" in lines[0]


def test_bad_files_are_skipped_and_wide_intervals_warned(artifacts, shifted, tmp_path):
    site_dir = Path(shutil.copytree(shifted[1], tmp_path / "site"))
    (site_dir / "NORMAL" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = run_cli("calibrate", "--model", artifacts, "--file", FILE, "--data", site_dir,
                "--max-ci-width", "0.2")
    assert r.returncode == 1, r.stderr  # as classify: some inputs failed, the rest were used
    assert "broken.png" in r.stderr and "warning: wide 95% interval" in r.stderr
    rec = json.loads((artifacts / "site.json").read_text())
    assert rec["counts"] == {"COVID19": 12, "NORMAL": 12} and "broken.png" in rec["skipped"][0]
    r = run_cli("calibrate", "--model", artifacts, "--file", FILE, "--data", shifted[1],
                "--max-ci-width", "1")
    assert r.returncode == 0 and "warning: wide" not in r.stderr


# --------------------------------------------------------------------------- units
def _record(sha: str, thr: float = 0.7) -> site.SiteCalibration:
    return site.SiteCalibration(model_file="m.tflite", model_sha256=sha, threshold=thr, previous_threshold=0.5,
                                rule={"target_sensitivity": 0.95}, counts={"A": 10, "B": 10}, figures={})


def test_resolve_threshold_binding(tmp_path):
    model = tmp_path / "m.tflite"
    mine, other = "a" * 64, "b" * 64
    assert site.resolve_threshold(model, mine, 0.5, "manifest", None) == (0.5, "manifest")
    _record(mine).write(tmp_path)
    assert site.resolve_threshold(model, mine, 0.5, "manifest", None) == (0.7, "site.json")
    assert site.resolve_threshold(model, mine, 0.5, "manifest", 0.2) == (0.2, "--threshold")
    with pytest.raises(ModelError, match="made for m.tflite"):
        site.resolve_threshold(model, other, 0.5, "manifest", None)
    assert site.resolve_threshold(model, other, 0.5, "manifest", 0.2) == (0.2, "--threshold")
    (tmp_path / "site.json").write_text('{"schema": 1, "model_sha256": "short"}')
    with pytest.raises(ModelError, match="malformed"):
        site.resolve_threshold(model, mine, 0.5, "manifest", None)


def test_record_round_trip():
    rec = _record("c" * 64)
    assert site.SiteCalibration.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec


@pytest.mark.parametrize("pos", [0, 1])
def test_output_threshold_meets_target_by_the_runners_rule(pos):
    rng = np.random.default_rng(pos)
    probs = rng.uniform(0, 1, (60, 1))
    y_pos = rng.uniform(0, 1, 60) < (probs[:, 0] if pos == 1 else 1 - probs[:, 0])
    thr = metrics.output_threshold_for_sensitivity(y_pos, probs, pos, 0.9)
    called = predicted_classes(probs, thr) == pos
    assert called[y_pos].mean() >= 0.9
    # and it is the highest such threshold: one case fewer called positive misses the target
    k = int(called[y_pos].sum())
    assert (k - 1) / y_pos.sum() < 0.9
