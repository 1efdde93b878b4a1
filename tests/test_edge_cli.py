"""`xray-edge classify`, `info` and `bench` end to end, in new processes, on exported models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import keras_probs, run_cli
from xray_edge.inputs import walk_images
from xray_edge.preprocess import load_image


def _lines(text: str) -> list[str]:
    return [l for l in text.splitlines() if l.strip() and not l.startswith(("INFO:", "warning: this model"))]


def _keras_labels(artifacts: Path, paths: list[Path]) -> list[str]:
    m = json.loads((artifacts / "manifest.json").read_text())
    labels, thr = m["labels"], m["threshold"]
    p = keras_probs(artifacts / "model.keras", np.stack([load_image(x) for x in paths]))[:, 0]
    return [labels[1] if v >= thr else labels[0] for v in p]


@pytest.mark.parametrize("file_name", ["xray_int8.tflite", "xray_float32.tflite", "xray.onnx", "xray_int8.onnx"])
def test_labels_agree_with_keras_on_real_images(shared_artifacts, shared_data, file_name):
    paths = sorted(walk_images(shared_data / "train"))[::5]
    r = run_cli("classify", "--model", shared_artifacts, "--file", file_name, *paths)
    assert r.returncode == 0, r.stderr
    rows = [l.split("\t") for l in _lines(r.stdout)]
    assert [Path(row[0]) for row in rows] == paths
    agree = sum(a == b for a, b in zip([row[1] for row in rows], _keras_labels(shared_artifacts, paths)))
    assert agree == len(paths), f"{agree}/{len(paths)} agree"
    # the printed figure is the probability of the printed label, on the manifest's threshold
    m = json.loads((shared_artifacts / "manifest.json").read_text())
    thr, second = m["threshold"], m["labels"][1]
    for _, label, prob in rows:
        floor = thr if label == second else 1 - thr
        assert floor - 1e-3 <= float(prob) <= 1.0, (label, prob, thr)


def test_json_output_fields(tiny_artifacts, phantom_data):
    img = next(walk_images(phantom_data / "test"))
    r = run_cli("classify", "--model", tiny_artifacts, "--json", img)
    assert r.returncode == 0, r.stderr
    d = json.loads(_lines(r.stdout)[0])
    assert set(d) >= {"path", "label", "scores", "threshold", "model", "sha256", "backend", "ms"}
    assert d["backend"] == "litert" and d["model"].endswith("xray_int8.tflite")
    assert abs(sum(d["scores"].values()) - 1) < 1e-5 and d["label"] in d["scores"]


def test_folder_glob_and_stdin(tiny_artifacts, phantom_data):
    folder = phantom_data / "test"
    n = len(list(walk_images(folder)))
    r1 = run_cli("classify", "-m", tiny_artifacts, folder)
    r2 = run_cli("classify", "-m", tiny_artifacts, str(folder / "*" / "*.png"))
    paths = "\n".join(str(p) for p in walk_images(folder)) + "\n"
    r3 = run_cli("classify", "-m", tiny_artifacts, "-", input=paths)
    for r in (r1, r2, r3):
        assert r.returncode == 0, r.stderr
        assert len(_lines(r.stdout)) == n
    assert sorted(_lines(r1.stdout)) == sorted(_lines(r2.stdout)) == sorted(_lines(r3.stdout))


def test_threshold_override_changes_decisions(tiny_artifacts, phantom_data):
    img = next(walk_images(phantom_data / "test"))
    lo = run_cli("classify", "-m", tiny_artifacts, "--threshold", "0", img)
    hi = run_cli("classify", "-m", tiny_artifacts, "--threshold", "1", img)
    assert _lines(lo.stdout)[0].split("\t")[1] == "NORMAL"  # P(NORMAL) >= 0 always
    assert _lines(hi.stdout)[0].split("\t")[1] == "COVID19"


def test_no_tensorflow_or_keras_on_the_classify_path(tiny_artifacts, phantom_data):
    img = next(walk_images(phantom_data / "test"))
    code = ("import sys\nfrom xray_edge.cli import main\n"
            f"try:\n main(['classify', '-m', {str(tiny_artifacts)!r}, {str(img)!r}])\n"
            "except SystemExit as e:\n assert e.code == 0, e.code\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras')]\n"
            "print('HEAVY', bad)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in r.stdout, r.stdout + r.stderr
    assert "\tCOVID19\t" in r.stdout or "\tNORMAL\t" in r.stdout


def test_lone_model_file_uses_embedded_labels(tiny_artifacts, phantom_data, tmp_path):
    img = next(walk_images(phantom_data / "test"))
    ref = _lines(run_cli("classify", "-m", tiny_artifacts, "--file", "xray_int8.tflite", img).stdout)
    for name in ("xray_int8.tflite", "xray.onnx"):
        lone = tmp_path / name
        shutil.copy(tiny_artifacts / name, lone)  # no manifest beside it
        r = run_cli("classify", "-m", lone, img)
        assert r.returncode == 0, r.stderr
        label, p = _lines(r.stdout)[0].split("\t")[1:]
        assert label == ref[0].split("\t")[1]
        assert abs(float(p) - float(ref[0].split("\t")[2])) < 0.02


# ---------------------------------------------------------------- bad inputs: exit 1, others done
def test_every_bad_input_is_one_line_and_the_rest_are_classified(tiny_artifacts, phantom_data, tmp_path):
    good = next(walk_images(phantom_data / "test"))
    jpeg = tmp_path / "src.jpg"
    Image.fromarray(np.full((300, 300), 90, np.uint8)).save(jpeg)
    bad = {
        "zero.jpg": b"",
        "truncated.jpg": jpeg.read_bytes()[:300],
        "truncated.png": good.read_bytes()[:300],
        "report.jpg": b"not an image at all",
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "folder.png").mkdir()
    Image.new("L", (1, 1)).save(tmp_path / "dot.png")
    from test_preprocess import _png_header_only

    (tmp_path / "bomb.png").write_bytes(_png_header_only(30000, 30000))
    args = [good, *(tmp_path / n for n in bad), tmp_path / "folder.png", tmp_path / "dot.png",
            tmp_path / "bomb.png", tmp_path / "missing.jpg", good]
    r = run_cli("classify", "-m", tiny_artifacts, *args)
    assert r.returncode == 1
    assert len(_lines(r.stdout)) == 2  # both good images, before and after the bad ones
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == len(args) - 2, r.stderr
    assert "Traceback" not in r.stderr
    for needle in ("zero.jpg", "truncated.jpg", "truncated.png", "report.jpg", "folder.png",
                   "dot.png", "bomb.png", "missing.jpg"):
        assert any(needle in e for e in errors), needle


def test_dicom_classifies(tiny_artifacts, tmp_path):
    pytest.importorskip("pydicom")
    from test_dicom import film, write_dicom

    p = write_dicom(tmp_path / "scan.dcm", film())
    r = run_cli("classify", "-m", tiny_artifacts, p)
    assert r.returncode == 0, r.stderr
    r = run_cli("classify", "-m", tiny_artifacts, write_dicom(tmp_path / "nopix.dcm", None))
    assert r.returncode == 1 and "no pixel data" in r.stderr


# ---------------------------------------------------------------- model errors: exit 2, one line
def _copy(artifacts: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in ("manifest.json", "xray_int8.tflite", "xray.onnx"):
        shutil.copy(artifacts / f, dst / f)
    return dst


def _model_error(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith("INFO:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_sha_mismatch_is_refused(tiny_artifacts, phantom_data, tmp_path):
    art = _copy(tiny_artifacts, tmp_path / "a")
    with open(art / "xray_int8.tflite", "r+b") as f:
        f.seek(5000)
        f.write(b"\x00\x01\x02")
    img = next(walk_images(phantom_data / "test"))
    assert "sha256" in _model_error(run_cli("classify", "-m", art, img))


def test_truncated_and_fake_model_files(tiny_artifacts, phantom_data, tmp_path):
    img = next(walk_images(phantom_data / "test"))
    data = (tiny_artifacts / "xray_int8.tflite").read_bytes()
    (tmp_path / "cut.tflite").write_bytes(data[: len(data) // 3])
    (tmp_path / "fake.tflite").write_bytes(b"hello, I am not a model" * 10)
    (tmp_path / "fake.onnx").write_bytes(b"\x08\x07garbage" * 10)
    for name in ("cut.tflite", "fake.tflite", "fake.onnx"):
        msg = _model_error(run_cli("classify", "-m", tmp_path / name, img))
        assert name in msg and ("not a loadable" in msg or "metadata" in msg), msg


def test_missing_and_malformed_manifest(tiny_artifacts, phantom_data, tmp_path):
    img = next(walk_images(phantom_data / "test"))
    art = _copy(tiny_artifacts, tmp_path / "a")
    (art / "manifest.json").write_text("{not json")
    assert "not valid JSON" in _model_error(run_cli("classify", "-m", art, img))
    (art / "manifest.json").write_text(json.dumps({"schema": 1}))
    assert "malformed" in _model_error(run_cli("classify", "-m", art, img))
    (art / "manifest.json").unlink()
    assert "manifest not found" in _model_error(run_cli("classify", "-m", art, img))


def test_runtime_that_cannot_load_names_the_extra(tiny_artifacts, phantom_data):
    img = next(walk_images(phantom_data / "test"))
    r = run_cli("classify", "-m", tiny_artifacts, "--backend", "tflite", img)
    msg = _model_error(r)
    assert "pip install 'xray-edge[tflite]'" in msg or "xray-edge[litert]" in msg


def test_backend_that_cannot_run_the_file_type(tiny_artifacts, phantom_data):
    img = next(walk_images(phantom_data / "test"))
    msg = _model_error(run_cli("classify", "-m", tiny_artifacts, "--file", "xray.onnx", "--backend", "litert", img))
    assert "cannot run .onnx" in msg


# ---------------------------------------------------------------- info, bench, help
def test_info_matches_manifest(tiny_artifacts):
    r = run_cli("info", tiny_artifacts, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout[r.stdout.index("{"):])
    m = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert d["sha256"] == m["files"]["xray_int8.tflite"]["sha256"]
    assert d["labels"] == m["labels"] and d["input"]["dtype"] == "int8"
    assert d["quantization"]["input"][0] > 0 and d["parity_at_export"]["passed"]


def test_bench_prints_figures(tiny_artifacts):
    r = run_cli("bench", tiny_artifacts, "--runs", "5", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout[r.stdout.index("{"):])
    assert d["latency_p50_ms"] > 0 and d["images_per_s_with_decode"] > 0 and d["peak_rss_mb"] > 0


def test_every_command_has_help():
    from xray_edge.cli import main

    for name, cmd in main.commands.items():
        assert cmd.help and len(cmd.help) > 40, name
        r = run_cli(name, "--help")
        assert r.returncode == 0 and "Usage" in r.stdout


# ---------------------------------------------------------------- tflite-runtime (numpy<2 venv)
def test_tflite_runtime_gives_the_same_raw_int8_output(tiny_artifacts, phantom_data):
    py = os.environ.get("XRAY_EDGE_TFLITE_PYTHON")
    if not py or not Path(py).exists():
        pytest.skip("no tflite-runtime environment (make test creates .venv-tflite)")
    probe = subprocess.run([py, "-c", "import tflite_runtime, numpy; print(numpy.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"tflite-runtime not importable there: {probe.stderr[-200:]}")
    imgs = list(walk_images(phantom_data / "test"))[:6]
    ours = run_cli("classify", "-m", tiny_artifacts, "--json", *imgs)
    theirs = run_cli("classify", "-m", tiny_artifacts, "--json", "--backend", "tflite", *imgs, python=py)
    assert theirs.returncode == 0, theirs.stderr
    a = [json.loads(l) for l in _lines(ours.stdout)]
    b = [json.loads(l) for l in _lines(theirs.stdout)]
    assert [x["backend"] for x in b] == ["tflite"] * len(imgs)
    assert [x["scores"] for x in a] == [x["scores"] for x in b]  # same int8 outputs, same scale


def test_training_and_export_name_their_extra_on_an_edge_install(phantom_data, tiny_artifacts):
    """The tflite environment is a device install: no Keras, no TensorFlow."""
    py = os.environ.get("XRAY_EDGE_TFLITE_PYTHON")
    if not py or not Path(py).exists():
        pytest.skip("no edge-only environment (make test creates .venv-tflite)")
    r = run_cli("train", "--data", phantom_data, python=py)
    assert r.returncode == 2 and "pip install 'xray-edge[train]'" in r.stderr, r.stderr
    r = run_cli("export", "--model", tiny_artifacts / "model.keras", python=py)
    assert r.returncode == 2 and "pip install 'xray-edge[export]'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_softmax_model_classifies_with_three_labels(tmp_path, phantom_data):
    from conftest import export_folder, save_with_record, tiny_model

    classes = ["COVID19", "NORMAL", "PNEUMONIA"]
    model = tiny_model(num_classes=3)
    path = save_with_record(model, tmp_path / "art", classes[:2], phantom_data)
    rec = json.loads((tmp_path / "art" / "training.json").read_text())
    rec["classes"] = classes
    (tmp_path / "art" / "training.json").write_text(json.dumps(rec))
    res = export_folder(path, formats=("float32", "onnx"))
    assert res.passed and res.manifest.threshold is None and res.manifest.output["kind"] == "softmax"
    imgs = list(walk_images(phantom_data / "test"))[:4]
    r = run_cli("classify", "-m", tmp_path / "art", "--file", "xray.onnx", "--json", *imgs)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in _lines(r.stdout)]
    ref = keras_probs(path, np.stack([load_image(p) for p in imgs]))
    assert [row["label"] for row in rows] == [classes[i] for i in ref.argmax(1)]
    assert all(set(row["scores"]) == set(classes) for row in rows)
