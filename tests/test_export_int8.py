"""The int8 TFLite file (litert-quantizer on the float32 flatbuffer): integer all the way through,
calibrated on the images it is given, and a failed gate that says what to do."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_cli, save_with_record, tiny_model
from test_export import _snapshot, assert_integer_compute, real_images


def _tensors(model_bytes: bytes) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model_bytes)
    return {t["name"]: (np.dtype(t["dtype"]).name, t["quantization_parameters"]["scales"])
            for t in it.get_tensor_details()}, it


def test_int8_is_integer_throughout_and_its_ranges_come_from_the_calibration(phantom_data):
    from xray_edge.export import tflite

    model = tiny_model(seed=9)
    calibration = real_images(phantom_data / "train", 13)[:13]  # not a multiple of the batch
    float32 = tflite.convert_float32(model)
    full = tflite.quantize_int8(float32, calibration)
    tensors, it = _tensors(full)
    assert_integer_compute(it)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    # the 0-255 pixels of the calibration images fill the int8 range exactly: pixel - 128
    assert tuple(inp["quantization"]) == (1.0, -128)

    # darker calibration images give the activations narrower ranges, so smaller scales
    dim = tflite.quantize_int8(float32, (calibration // 8).astype(np.uint8))
    dim_tensors, _ = _tensors(dim)
    shrunk = [n for n, (d, s) in tensors.items() if d != "int32" and len(s) == 1 and n in dim_tensors
              and len(dim_tensors[n][1]) == 1 and dim_tensors[n][1][0] < 0.5 * s[0]]
    assert shrunk, "the calibration images did not set the activation ranges"


def test_calibration_batches_cover_every_image_once_and_repeat_only_seen_ones():
    from xray_edge.export.tflite import _batches

    images = np.arange(23, dtype=np.uint8).reshape(23, 1, 1, 1)
    batches = list(_batches(images, 10))
    assert [len(b) for b in batches] == [10, 10, 10] and all(b.dtype == np.float32 for b in batches)
    seen = np.concatenate(batches).ravel()
    assert set(seen[:23]) == set(range(23)) and set(seen[23:]) <= set(range(23))


def test_int8_route_refuses_an_empty_calibration_set():
    from xray_edge.export import tflite

    with pytest.raises(ValueError, match="calibration images"):
        tflite.quantize_int8(b"unused", np.zeros((0, 200, 200, 3), np.uint8))


def test_failed_int8_gate_says_what_failed_and_what_to_do(tmp_path, phantom_data):
    """A gate int8 cannot meet: exit 1, nothing written, and a message naming the gate, its
    value and two ways out (more calibration images, or the formats that passed)."""
    path = save_with_record(tiny_model(seed=3), tmp_path, ["COVID19", "NORMAL"], phantom_data)
    before = _snapshot(tmp_path)
    r = run_cli("export", "--model", path, "--formats", "float32,int8,onnx", "--int8-atol", "1e-9",
                "--calibration-size", "8")
    assert r.returncode == 1, r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, r.stderr
    assert "int8 max|Δp|" in error[0] and "> 1e-09" in error[0]
    assert "--calibration-size 200; now 8" in error[0] and "--formats float32,onnx" in error[0]
    assert "Traceback" not in r.stderr
    assert _snapshot(tmp_path) == before


def test_failed_int8_gate_does_not_ask_for_calibration_images_there_are_not(tmp_path, phantom_data):
    """With every training image already calibrating, "more" is no remedy: it says so instead."""
    path = save_with_record(tiny_model(seed=3), tmp_path, ["COVID19", "NORMAL"], phantom_data)
    r = run_cli("export", "--model", path, "--formats", "float32,int8", "--int8-atol", "1e-9",
                "--calibration-size", "100000")
    assert r.returncode == 1, r.stderr
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "--calibration-size" not in error[0], r.stderr
    assert "training images calibrated it" in error[0] and "--formats float32" in error[0]
