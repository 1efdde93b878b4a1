"""The int8 route (float32 flatbuffer -> activation ranges measured in LiteRT, or the converter's
calibrator -> MLIR quantizer, private TensorFlow APIs) against the converter's public route and
its calibrator: same ranges, same quantization parameters, same raw outputs."""

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
    batches = list(_batches(images, 10))
    assert [len(b) for b in batches] == [10, 10, 10] and all(b.dtype == np.float32 for b in batches)
    seen = np.concatenate(batches).ravel()
    assert set(seen[:23]) == set(range(23)) and set(seen[23:]) <= set(range(23))


def test_int8_route_refuses_an_empty_calibration_set():
    from xray_edge.export import tflite

    with pytest.raises(ValueError, match="calibration images"):
        tflite.quantize_int8(b"unused", np.zeros((0, 200, 200, 3), np.uint8))


def _stored_ranges(flatbuffer: bytes) -> dict[int, tuple[float, float]]:
    from tensorflow.lite.python import schema_py_generated as schema

    graph = schema.Model.GetRootAs(flatbuffer, 0).Subgraphs(0)
    out = {}
    for i in range(graph.TensorsLength()):
        q = graph.Tensors(i).Quantization()
        if q is not None and q.MinLength():
            out[i] = (q.Min(0), q.Max(0))
    return out


def test_measured_ranges_are_the_calibrators(phantom_data):
    """The ranges recorded in LiteRT are the calibrator's: the same tensors, the same min and
    max up to float rounding (XNNPACK sums in another order), stored where the calibrator stores them."""
    from xray_edge.export import ranges, tflite

    flat = tflite.convert_float32(tiny_model(seed=4))
    calibration = real_images(phantom_data / "train", 13)[:13]
    assert ranges.covered(flat)
    theirs = _stored_ranges(tflite._calibrate(flat, calibration))
    ours = ranges.measure(flat, tflite._batches(calibration, tflite.CALIBRATION_BATCH))

    assert set(ours) == set(theirs) and len(ours) >= 5
    for i, (low, high) in theirs.items():
        np.testing.assert_allclose(ours[i], (low, high), rtol=1e-5, atol=1e-6, err_msg=f"tensor {i}")
    assert any(high > low > -1e-6 for low, high in ours.values())  # real activations, not zeros
    stored = _stored_ranges(ranges.write(flat, ours))
    assert stored == {i: (float(np.float32(lo)), float(np.float32(hi))) for i, (lo, hi) in ours.items()}


def test_a_non_finite_activation_is_refused_in_one_line():
    """An infinite or NaN activation is an error naming the tensor, not a range (the calibrator
    only warns about NaN). 255 * 3e38 overflows float32 in the rescaling's product."""
    import keras

    from xray_edge.errors import XrayEdgeError
    from xray_edge.export import ranges, tflite

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Rescaling(3e38),
                              keras.layers.Flatten(), keras.layers.Dense(1, activation="sigmoid")])
    flat = tflite.convert_float32(model)
    assert ranges.measure(flat, [np.zeros((2, 8, 8, 3), np.float32)])  # finite: measured
    with pytest.raises(XrayEdgeError, match="tensor '[^']*rescaling[^']*' took a non-finite value") as err:
        ranges.measure(flat, [np.zeros((2, 8, 8, 3), np.float32), np.full((2, 8, 8, 3), 255, np.float32)])
    assert "\n" not in str(err.value)


def test_models_the_measurement_does_not_cover_keep_the_calibrator(monkeypatch, phantom_data):
    """A model in several subgraphs (a Keras LSTM becomes a WHILE loop) is left to the
    calibrator; and the calibrator's route, forced for the tiny model, gives the same
    quantization as the measured one."""
    import keras
    import tensorflow as tf

    from xray_edge.export import ranges, tflite

    keras.utils.set_random_seed(2)
    lstm = keras.Sequential([keras.Input((6, 3)), keras.layers.LSTM(4), keras.layers.Dense(1)])
    fn = tf.function(lambda x: lstm(x), input_signature=[tf.TensorSpec((1, 6, 3), tf.float32)])
    looped = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], lstm).convert()
    from tensorflow.lite.python import schema_py_generated as schema

    assert schema.Model.GetRootAs(looped, 0).SubgraphsLength() > 1 and not ranges.covered(looped)

    flat = tflite.convert_float32(tiny_model(seed=9))
    calibration = real_images(phantom_data / "train", 13)[:13]
    measured = _quantization(tflite.quantize_int8(flat, calibration))
    monkeypatch.setattr(ranges, "covered", lambda flatbuffer: False)
    calibrated = _quantization(tflite.quantize_int8(flat, calibration))
    assert measured.keys() == calibrated.keys()
    for name, (dtype, shape, scales, zeros) in calibrated.items():
        assert measured[name][:2] == (dtype, shape), name
        np.testing.assert_allclose(measured[name][2], scales, rtol=1e-5, err_msg=name)
        np.testing.assert_array_equal(measured[name][3], zeros, err_msg=name)
