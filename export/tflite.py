"""Keras model -> TFLite flatbuffers (float32, float16 weights, full-integer int8), through
TensorFlow's public converter only.

Route: a `tf.function` over the Keras model, with its variables tracked by a `tf.Module`, handed
to `TFLiteConverter.from_concrete_functions`. Without the module
(`from_concrete_functions([fn], trackable_obj=model)`) the converter reports success and writes
a file with no weights that returns a constant; with it the file carries every weight (the parity
gate checks it on every export). Builtin ops only: the device has no TensorFlow for Flex ops.

int8 is the converter's post-training full-integer quantization: a representative dataset of
real images (min/max of every activation over them), uint8 input and output. Figures:
docs/export.md.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

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
    # The manifest and the embedded metadata say how the file was made; the converter's own
    # record would cost two more passes over the whole flatbuffer.
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


def convert_int8(model, calibration: np.ndarray) -> bytes:
    """Full-integer int8: uint8 image input, uint8 output, int8 weights (per channel).

    Args:
        model: the Keras model.
        calibration: uint8 [N, H, W, C] real images from the one preprocessing; the activation
            ranges are their min and max (0-255 pixels, the model divides by 255 itself).
    """
    import tensorflow as tf

    from xray_edge.backends import quiet_stderr

    if len(calibration) == 0:
        raise ValueError("int8 export needs calibration images")
    conv = _converter(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([b] for b in _batches(calibration, CALIBRATION_BATCH))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.uint8
    conv.inference_output_type = tf.uint8
    with quiet_stderr():  # the quantizer prints its settings from C++
        return conv.convert()


def _batches(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Equal-sized float32 batches; the last is topped up with images already seen, which leaves
    every min and max unchanged (the calibrator sizes its input once, from the first batch)."""
    size = min(size, len(images))
    for start in range(0, len(images), size):
        batch = images[start:start + size]
        if len(batch) < size:
            batch = np.concatenate([batch, images[:size - len(batch)]])
        yield batch.astype(np.float32)
