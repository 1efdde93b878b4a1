"""Parity: every exported format, loaded in its edge runtime, agrees with Keras on real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import export_folder, keras_probs, save_with_record, tiny_model
from xray_edge.backends import open_backend
from xray_edge.manifest import read_manifest
from xray_edge.preprocess import load_image
from xray_edge.export.parity import FLOAT16_MAX_ABS_DIFF, FLOAT_MAX_ABS_DIFF, INT8_MAX_ABS_DIFF
from xray_edge.export.pipeline import FORMATS

TESTED_FORMATS: set[str] = set()


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder`, hidden ones included, with its sha256."""
    from xray_edge.files import sha256_file

    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def real_images(folder: Path, n: int = 12) -> np.ndarray:
    from xray_edge.inputs import walk_images

    paths = list(walk_images(folder))
    step = max(1, len(paths) // n)
    return np.stack([load_image(p) for p in paths[::step][:n]])


def check_against_keras(artifacts: Path, fmt: str, images: np.ndarray) -> float:
    """Independently of the export's own check: load the file, run each image, compare."""
    TESTED_FORMATS.add(fmt)
    f = FORMATS[fmt]
    manifest = json.loads((artifacts / "manifest.json").read_text())
    assert f.file in manifest["files"], manifest.get("rejected")
    backend = open_backend(artifacts / f.file, f.runtime)
    got = np.stack([backend.predict(x) for x in images])
    ref = keras_probs(artifacts / "model.keras", images)
    diff = float(np.abs(got - ref).max())
    limit = {"float": FLOAT_MAX_ABS_DIFF, "float16": FLOAT16_MAX_ABS_DIFF, "int8": INT8_MAX_ABS_DIFF}
    assert diff <= limit[f.gates], (fmt, diff)
    assert np.ptp(ref) > 1e-3, "Keras outputs are constant: agreement would prove nothing"
    return diff


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_tiny_model_parity(tiny_artifacts, phantom_data, fmt):
    # int8 ranges hold for images like the calibration set (here phantoms): measured, a tiny
    # model calibrated on phantoms drifts by 0.23 on real X-rays. Real X-rays for int8 are
    # covered by the model trained and calibrated on the shared set below.
    check_against_keras(tiny_artifacts, fmt, real_images(phantom_data / "test", 12))


@pytest.mark.parametrize("fmt", ["float32", "onnx", "float16"])
def test_tiny_model_float_parity_on_real_xrays(tiny_artifacts, shared_data, fmt):
    check_against_keras(tiny_artifacts, fmt, real_images(shared_data))


@pytest.mark.parametrize("fmt", ["float32", "int8", "onnx", "onnx-int8"])
def test_shared_trained_model_parity(shared_artifacts, shared_data, fmt):
    check_against_keras(shared_artifacts, fmt, real_images(shared_data, 16))


@pytest.fixture(scope="module")
def full_untrained_artifacts(tmp_path_factory, phantom_data):
    from xray_edge.train.model import build_model

    import keras

    keras.utils.set_random_seed(7)
    folder = tmp_path_factory.mktemp("full")
    path = save_with_record(build_model(2), folder, ["COVID19", "NORMAL"], phantom_data)
    res = export_folder(path, formats=("float32", "onnx"), parity_size=16)
    assert res.passed, [r.line() for r in res.results]
    return folder


@pytest.mark.parametrize("fmt", ["float32", "onnx"])
def test_full_tutorial_model_parity(full_untrained_artifacts, shared_data, fmt):
    check_against_keras(full_untrained_artifacts, fmt, real_images(shared_data, 8))


def test_every_registered_format_has_a_parity_test(request):
    """Runs after the parity tests above (pytest keeps file order): each registered format must
    have had its parity checked in this run, assertions included, not just collected."""
    collected = {item.callspec.params["fmt"] for item in request.session.items
                 if getattr(item, "originalname", "") == "test_tiny_model_parity"}
    if not collected:
        pytest.skip("the parity tests are not selected in this run")
    assert TESTED_FORMATS == set(FORMATS), f"formats without a passing parity check: {set(FORMATS) - TESTED_FORMATS}"


# ---------------------------------------------------------------- the gate refuses broken files
def test_wrong_calibration_scale_is_refused(tmp_path, phantom_data):
    """The classic bug: calibrating on /255 pixels when the model takes 0-255. Must not ship."""
    from xray_edge.export import tflite

    model_path = save_with_record(tiny_model(seed=3), tmp_path, ["COVID19", "NORMAL"], phantom_data)
    import keras

    model = keras.saving.load_model(model_path)
    wrong = np.stack([load_image(p) for p in sorted((phantom_data / "train").rglob("*.png"))[:16]])
    broken = tflite.quantize_int8(tflite.convert_float32(model), (wrong / 255.0).astype(np.float32))

    def tamper(name, data):
        from xray_edge.metadata import tflite_with_metadata

        return tflite_with_metadata(broken, {"labels": ["COVID19", "NORMAL"]}) if name == "int8" else data

    before = _snapshot(tmp_path)
    res = export_folder(model_path, formats=("float32", "int8"), tamper=tamper)
    int8 = next(r for r in res.results if r.format == "int8")
    assert not int8.passed and "max|Δp|" in int8.failed_gates
    assert next(r for r in res.results if r.format == "float32").passed
    # all or nothing: the float32 file passed, but the set failed, so nothing was written
    assert _snapshot(tmp_path) == before
    assert "int8" in res.manifest.rejected and "xray_int8.tflite" not in res.manifest.files


def test_weightless_file_is_refused(tmp_path, phantom_data):
    """A constant-output model (what from_concrete_functions without tracking writes) fails."""
    import keras

    from xray_edge.export import onnx as onnx_export

    model_path = save_with_record(tiny_model(seed=4), tmp_path, ["COVID19", "NORMAL"], phantom_data)
    constant = keras.Sequential([keras.Input((200, 200, 3)), keras.layers.Flatten(),
                                 keras.layers.Dense(1, activation="sigmoid", kernel_initializer="zeros")])
    res = export_folder(model_path, formats=("onnx",),
                        tamper=lambda n, d: onnx_export.keras_to_onnx(constant, {"labels": ["A", "B"]}))
    assert not res.passed and not (tmp_path / "xray.onnx").exists()
    assert set(_snapshot(tmp_path)) == {"model.keras", "training.json"}  # no staging left either


def test_onnx_export_refuses_layers_it_does_not_translate():
    import keras

    from xray_edge.export import onnx as onnx_export
    from xray_edge.export.layers import UnsupportedLayer

    pooled = keras.Sequential([keras.Input((200, 200, 3)), keras.layers.GlobalAveragePooling2D(),
                               keras.layers.Dense(1, activation="sigmoid")])
    with pytest.raises(UnsupportedLayer, match="GlobalAveragePooling2D"):
        onnx_export.keras_to_onnx(pooled, {})


def test_cli_export_exits_nonzero_when_a_gate_fails(tmp_path, phantom_data):
    from conftest import run_cli

    model_path = save_with_record(tiny_model(seed=5), tmp_path, ["COVID19", "NORMAL"], phantom_data)
    r = run_cli("export", "--model", model_path, "--formats", "float32", "--float-atol", "0")
    # a zero tolerance cannot be met by a converted float model (diffs ~1e-7): refused, exit 1
    assert r.returncode == 1, r.stderr
    assert "✗ float32" in r.stdout + r.stderr and "parity gate failed" in r.stderr
    assert not (tmp_path / "xray_float32.tflite").exists()


def test_manifest_binds_everything(tiny_artifacts):
    m = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert read_manifest(tiny_artifacts / "manifest.json").to_dict() == m  # the record reads back whole
    assert m["labels"] == ["COVID19", "NORMAL"] and m["threshold"] == 0.5
    assert m["input"]["preprocessing"]["version"] and m["input"]["shape"] == [1, 200, 200, 3]
    assert m["source_model"]["sha256"] and m["training"]["synthetic"] is True
    assert {"tensorflow-cpu", "keras", "onnx"} & set(m["versions"])
    from xray_edge.files import sha256_file

    for name, entry in m["files"].items():
        assert entry["sha256"] == sha256_file(tiny_artifacts / name)
        assert entry["size"] == (tiny_artifacts / name).stat().st_size
        assert entry["parity"]["passed"] and entry["parity"]["images"] > 0
        # seconds are kept to 0.01 s: a tiny model converts in less
        assert set(entry["seconds"]) == {"convert", "prove"} and min(entry["seconds"].values()) >= 0, name
        assert sum(entry["seconds"].values()) > 0, name
    int8 = m["files"]["xray_int8.tflite"]
    assert int8["input"]["dtype"] == "int8" and int8["input"]["quantization"] == [1.0, -128]
    onnx_entry = m["files"]["xray.onnx"]
    assert onnx_entry["input"]["name"] == "image" and onnx_entry["input"]["shape"][0] is None


def test_int8_file_is_integer_only_with_builtin_ops(tiny_artifacts):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(tiny_artifacts / "xray_int8.tflite"))
    ops = {op["op_name"] for op in it._get_ops_details()}
    assert {"CONV_2D", "FULLY_CONNECTED"} <= ops and not any(o.startswith("Flex") for o in ops)
    assert_integer_compute(it)


def assert_integer_compute(it) -> None:
    """Every operator computes on int8 (int32 for biases and shapes); the one float tensor
    litert-quantizer leaves is a dequantized copy that only a SHAPE operator reads."""
    dtypes = {t["index"]: np.dtype(t["dtype"]).name for t in it.get_tensor_details()}
    assert "int8" in dtypes.values()
    for op in it._get_ops_details():
        used = {dtypes[i] for i in [*op["inputs"], *op["outputs"]] if i >= 0}
        if op["op_name"] == "DEQUANTIZE":
            readers = [o["op_name"] for o in it._get_ops_details() if set(op["outputs"]) & set(o["inputs"])]
            assert readers == ["SHAPE"], readers
        elif op["op_name"] != "SHAPE":
            assert "float32" not in used, (op["op_name"], used)


def test_operating_point_reuses_known_outputs_and_skips_undecodable_files(tiny_artifacts, tmp_path):
    """The threshold is the same whether Keras' outputs are computed here, partly given or all
    given (then the model is never called); a file that cannot be decoded is left out each way."""
    from dataclasses import replace

    import keras

    from xray_edge.export.operating_point import choose_threshold
    from xray_edge.preprocess import load_images
    from xray_edge.training_record import TrainingRecord

    record = TrainingRecord.read(tiny_artifacts)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    # the fixture's record holds out a test split only: it serves as the validation split here
    record = replace(record, files={**record.files, "validation": record.files["test"] + [str(bad)]},
                     labels={**record.labels, "validation": record.labels["test"] + [0]})
    model = keras.saving.load_model(tiny_artifacts / "model.keras", compile=False)
    paths = record.split("validation")[0]
    images, ok, errors = load_images(paths, record.preprocessing)
    assert len(errors) == 1 and len(ok) == len(paths) - 1
    known = dict(zip((paths[i] for i in ok), model.predict(images, verbose=0)))

    computed = choose_threshold(model, record, record.preprocessing, 0.95)
    all_given = choose_threshold(None, record, record.preprocessing, 0.95, known=known)
    half = dict(list(known.items())[::2])
    partly = choose_threshold(model, record, record.preprocessing, 0.95, known=half)
    assert computed[1]["chosen_on"] == f"validation split, {len(ok)} images"
    for threshold, point in (all_given, partly):
        assert threshold == pytest.approx(computed[0], abs=1e-6)
        assert point["chosen_on"] == computed[1]["chosen_on"]
        assert point["validation_sensitivity"] == computed[1]["validation_sensitivity"]


def test_equalized_recipe_travels_to_the_device(tmp_path, phantom_data):
    """A model trained with --intensity equalize: export proves it on equalized films, the
    manifest carries the step, and classify (no TensorFlow) applies it: Keras on equalized input."""
    from conftest import run_cli
    from xray_edge.inputs import walk_images
    from xray_edge.preprocess import Preprocessing

    spec = Preprocessing(intensity="equalize")
    path = save_with_record(tiny_model(), tmp_path, ["COVID19", "NORMAL"], phantom_data, preprocessing=spec)
    assert export_folder(path, formats=("float32", "onnx")).passed
    assert read_manifest(tmp_path / "manifest.json").preprocessing == spec
    films = list(walk_images(phantom_data / "test"))[:4]
    want = keras_probs(path, np.stack([load_image(p, spec) for p in films]))
    plain = keras_probs(path, np.stack([load_image(p) for p in films]))
    assert np.abs(want - plain).max() > 1e-3, "equalizing changed nothing: the test would prove nothing"
    r = run_cli("classify", "--model", tmp_path, "--json", *films)
    assert r.returncode == 0, r.stderr
    got = [json.loads(line) for line in r.stdout.splitlines()]
    for g, w in zip(got, want):
        assert abs(g["scores"]["NORMAL"] - float(w[-1])) < 1e-4, (g, w)  # NORMAL is the last output
