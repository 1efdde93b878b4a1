"""Keras model -> TFLite flatbuffers (float32, float16 weights, full-integer int8), on public,
maintained APIs only.

Route: a `tf.function` over the Keras model, with its variables tracked by a `tf.Module`, handed
to `TFLiteConverter.from_concrete_functions`. Without the module
(`from_concrete_functions([fn], trackable_obj=model)`) the converter reports success and writes
a file with no weights that returns a constant; with it the file carries every weight (the parity
gate checks it on every export). Builtin ops only: the device has no TensorFlow for Flex ops.

int8 starts from the float32 flatbuffer (no second conversion): litert-quantizer, Google's
maintained post-training quantizer for `.tflite` files, calibrates it on real images and writes
full-integer int8. Figures: docs/export.md.
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


def quantize_int8(float32: bytes, calibration: np.ndarray) -> bytes:
    """Full-integer int8 from the float32 flatbuffer, by litert-quantizer: int8 weights (per
    channel) and activations, int8 image input (pixel - 128), int8 output.

    Calibration runs the float32 file in LiteRT and keeps the plain min and max of every
    activation over the images (`qsv_utils.min_max_update`): litert-quantizer's default moving
    average of per-batch ranges moved the outputs far from Keras on this model (docs/export.md).

    Args:
        float32: a flatbuffer from `convert_float32`.
        calibration: uint8 [N, H, W, C] real images from the one preprocessing (0-255 pixels;
            the model divides by 255 itself).
    """
    import os

    from litert_quantizer import Quantizer, calibrator, recipe, recipe_manager
    from litert_quantizer.utils import qsv_utils

    from xray_edge.backends import quiet_stderr

    if len(calibration) == 0:
        raise ValueError("int8 export needs calibration images")
    int8 = recipe.static_wi8_ai8()
    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(int8)
    with quiet_stderr():  # LiteRT's delegate line and the calibrator's progress bar
        calib = calibrator.Calibrator(float32, num_threads=os.cpu_count() or 1,
                                      mode=calibrator.CalibrationMode.CALIBRATION_PROFILER_BASED,
                                      qsv_update_func=qsv_utils.min_max_update)
        signature = next(iter(calib.get_signature_list()))
        batches = [{INPUT_NAME: b} for b in _batches(calibration, CALIBRATION_BATCH)]
        calib.calibrate({signature: batches}, manager)
        result = Quantizer(float32, int8).quantize(calib.get_model_qsvs(), enable_progress_bar=False,
                                                   enable_progress_report=False)
    return bytes(result.quantized_model)


def _batches(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Equal-sized float32 batches; the last is topped up with images already seen, which leaves
    every min and max unchanged (the calibrator sizes its input once, from the first batch)."""
    size = min(size, len(images))
    for start in range(0, len(images), size):
        batch = images[start:start + size]
        if len(batch) < size:
            batch = np.concatenate([batch, images[:size - len(batch)]])
        yield batch.astype(np.float32)
