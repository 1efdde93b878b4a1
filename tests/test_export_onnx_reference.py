"""Our ONNX emitter against the maintained converter: tf2onnx, fed the same Keras model as a
concrete function (its `from_keras` fails on Keras 3), must compute what `xray.onnx` computes on
real images, in onnxruntime, within the float gate."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import keras_probs
from test_export import real_images
from xray_edge.export.parity import FLOAT_MAX_ABS_DIFF

tf2onnx = pytest.importorskip("tf2onnx")


def _tf2onnx_model(keras_model) -> bytes:
    import tensorflow as tf

    from xray_edge.export.onnx import ONNX_OPSET

    shape = tuple(int(d) for d in keras_model.inputs[0].shape[1:])
    spec = (tf.TensorSpec((None, *shape), tf.float32, name="image"),)
    fn = tf.function(lambda image: keras_model(image, training=False), input_signature=spec)
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=ONNX_OPSET)
    return proto.SerializeToString()


def _run(model: bytes, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return sess.run(None, {name: images.astype(np.float32)})[0]


def test_emitter_computes_what_tf2onnx_computes(tiny_artifacts, phantom_data):
    import keras

    images = real_images(phantom_data / "test", 12)
    model = keras.saving.load_model(tiny_artifacts / "model.keras", compile=False)
    theirs = _run(_tf2onnx_model(model), images)
    ours = _run((tiny_artifacts / "xray.onnx").read_bytes(), images)  # whole batch: dynamic axis
    reference = keras_probs(tiny_artifacts / "model.keras", images)
    assert np.ptp(reference) > 1e-3, "Keras outputs are constant: agreement would prove nothing"
    assert ours.shape == theirs.shape == reference.shape
    assert float(np.abs(ours - theirs).max()) <= FLOAT_MAX_ABS_DIFF
    assert float(np.abs(theirs - reference).max()) <= FLOAT_MAX_ABS_DIFF  # the yardstick itself holds
