"""Keras model -> TFLite flatbuffers (float32, float16 weights, full-integer int8).

Route: a `tf.function` over the Keras model, with its variables tracked by a `tf.Module`, handed
to `TFLiteConverter.from_concrete_functions`. Without the module
(`from_concrete_functions([fn], trackable_obj=model)`) the converter reports success and writes
a file with no weights that returns a constant; with it the file carries every weight (the parity
gate checks it on every export). Builtin ops only: the device has no TensorFlow for Flex ops.

int8 starts from the float32 flatbuffer that export already made instead of converting the
Keras graph a second time: the converter's own calibrator and MLIR quantizer, called as the
converter calls them (`quantize_int8`). They are private TensorFlow APIs, so the versions are
pinned in pyproject.toml, a test compares this route with the converter's public one, and an
import failure falls back to the public route. Figures: docs/export.md.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from xray_edge.backends import quiet_stderr

INPUT_NAME = "image"
# Images per calibration step: fewer interpreter calls for the same min/max ranges.
CALIBRATION_BATCH = 10


def _converter(model):
    import tensorflow as tf

    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    holder = tf.Module()
    holder.tracked = [getattr(v, "value", v) for v in model.variables]
    fn = tf.function(lambda image: model(image, training=False),
                     input_signature=[tf.TensorSpec((None, *shape), tf.float32, name=INPUT_NAME)])
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], holder)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    # The converter's own provenance record costs two Python flatbuffer round trips of the
    # whole file; the manifest and the embedded metadata already say how the file was made.
    conv.exclude_conversion_metadata = True
    return conv


def convert_float32(model) -> bytes:
    return _converter(model).convert()


def convert_float16(model) -> bytes:
    """float16 weights (half the size), float32 compute and I/O."""
    import tensorflow as tf

    conv = _converter(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf.float16]
    return conv.convert()


def quantize_int8(float32: bytes, calibration: np.ndarray) -> bytes:
    """Full-integer int8 from a float32 flatbuffer: uint8 image input, uint8 output.

    The same two calls `TFLiteConverter` makes for `representative_dataset` +
    `TFLITE_BUILTINS_INT8` + uint8 I/O (tensorflow/lite/python/lite.py, `_quantize`): record
    min/max of every tensor over the calibration images, then quantize with the MLIR quantizer.

    Args:
        float32: a flatbuffer from `convert_float32` (no metadata needed).
        calibration: uint8 [N, H, W, C] real images from the one preprocessing; the activation
            ranges are measured on them (0-255 pixels, the model divides by 255 itself).

    Raises:
        ImportError: this TensorFlow keeps those private functions elsewhere (use
            `convert_int8_with_converter`).
    """
    import tensorflow as tf
    from tensorflow.lite.python.convert import mlir_quantize
    from tensorflow.lite.python.optimize.calibrator import Calibrator, add_intermediate_tensors

    if len(calibration) == 0:
        raise ValueError("int8 export needs calibration images")

    calibrator = Calibrator(add_intermediate_tensors(float32))
    calibrated = calibrator.calibrate(lambda: _batches(calibration, CALIBRATION_BATCH))
    with quiet_stderr():  # the quantizer prints its settings from C++ on every call
        return bytes(mlir_quantize(calibrated, disable_per_channel=False,
                                   input_data_type=tf.uint8, output_data_type=tf.uint8))


def _batches(images: np.ndarray, size: int) -> Iterator[list[np.ndarray]]:
    """Equal-sized float32 batches; the last is topped up with images already seen, which leaves
    every min and max unchanged (the calibrator sizes its input once, from the first batch)."""
    size = min(size, len(images))
    for start in range(0, len(images), size):
        batch = images[start:start + size]
        if len(batch) < size:
            batch = np.concatenate([batch, images[:size - len(batch)]])
        yield [batch.astype(np.float32)]


def convert_int8_with_converter(model, calibration: np.ndarray) -> bytes:
    """The converter's public int8 route (a second float conversion inside): the reference the
    tests compare `quantize_int8` with, and the fallback when its private imports fail."""
    import tensorflow as tf

    if len(calibration) == 0:
        raise ValueError("int8 export needs calibration images")

    def representative() -> Iterator[list[np.ndarray]]:
        for img in calibration:
            yield [img[None].astype(np.float32)]

    conv = _converter(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.uint8
    conv.inference_output_type = tf.uint8
    return conv.convert()
