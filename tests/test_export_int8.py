"""The int8 route (float32 flatbuffer -> calibrator -> MLIR quantizer, private TensorFlow APIs)
against the converter's own public route: same quantization parameters, same raw outputs."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_model
from test_export import real_images


def _quantization(model_bytes: bytes) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model_bytes)
    return {t["name"]: (np.dtype(t["dtype"]).name, tuple(t["shape"]),
                        t["quantization_parameters"]["scales"], t["quantization_parameters"]["zero_points"])
            for t in it.get_tensor_details()}


def _raw_outputs(model_bytes: bytes, images: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model_bytes)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    raw = []
    for img in images:
        it.set_tensor(inp, img[None])
        it.invoke()
        raw.append(it.get_tensor(out).copy())
    return np.concatenate(raw)


def test_int8_route_matches_the_converters_own(phantom_data):
    from xray_edge.export import tflite

    model = tiny_model(seed=9)
    # 13 images: not a multiple of the calibration batch, so the topped-up last batch is used
    calibration = real_images(phantom_data / "train", 13)[:13]
    assert len(calibration) == 13 and len(calibration) % tflite.CALIBRATION_BATCH
    ours = tflite.quantize_int8(tflite.convert_float32(model), calibration)
    reference = tflite.convert_int8_with_converter(model, calibration)

    q_ours, q_ref = _quantization(ours), _quantization(reference)
    assert q_ours.keys() == q_ref.keys()
    for name, (dtype, shape, scales, zeros) in q_ref.items():
        o_dtype, o_shape, o_scales, o_zeros = q_ours[name]
        assert (o_dtype, o_shape) == (dtype, shape), name
        # batched calibration sums in another order: ranges agree to float rounding
        np.testing.assert_allclose(o_scales, scales, rtol=1e-5, err_msg=name)
        np.testing.assert_array_equal(o_zeros, zeros, err_msg=name)
    assert {d for d, *_ in q_ours.values()} >= {"uint8", "int8"} and "float32" not in {d for d, *_ in q_ours.values()}

    images = real_images(phantom_data / "test", 12)
    raw_ours, raw_ref = _raw_outputs(ours, images), _raw_outputs(reference, images)
    assert raw_ours.dtype == np.uint8 and np.ptp(raw_ref) > 10  # outputs spread: equality means something
    np.testing.assert_array_equal(raw_ours, raw_ref)


def test_calibration_batches_cover_every_image_once_and_repeat_only_seen_ones():
    from xray_edge.export.tflite import _batches

    images = np.arange(23, dtype=np.uint8).reshape(23, 1, 1, 1)
    batches = [b[0] for b in _batches(images, 10)]
    assert [len(b) for b in batches] == [10, 10, 10] and all(b.dtype == np.float32 for b in batches)
    seen = np.concatenate(batches).ravel()
    assert set(seen[:23]) == set(range(23)) and set(seen[23:]) <= set(range(23))


def test_int8_route_refuses_an_empty_calibration_set():
    from xray_edge.export import tflite

    with pytest.raises(ValueError, match="calibration images"):
        tflite.quantize_int8(b"unused", np.zeros((0, 200, 200, 3), np.uint8))
