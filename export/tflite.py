"""Keras model -> TFLite flatbuffers (float32, float16 weights, full-integer int8).

Route: a `tf.function` over the Keras model, with its variables tracked by a `tf.Module`, handed
to `TFLiteConverter.from_concrete_functions`. Without the module
(`from_concrete_functions([fn], trackable_obj=model)`) the converter reports success and writes
a file with no weights that returns a constant; with it the file carries every weight (the parity
gate checks it on every export). Builtin ops only: the device has no TensorFlow for Flex ops.

int8 starts from the float32 flatbuffer that export already made instead of converting the
Keras graph a second time: activation ranges measured on it (`ranges`, or the converter's own
calibrator for models that module does not cover), then the converter's MLIR quantizer, called
as the converter calls it (`quantize_int8`). These are private TensorFlow APIs, so the versions
are pinned in pyproject.toml, tests compare this route with the converter's public one, and an
import failure falls back to the public route. Figures: docs/export.md.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import numpy as np

from xray_edge.backends import quiet_stderr
from xray_edge.preprocess import release_freed_memory

INPUT_NAME = "image"
# Images per calibration step: fewer interpreter calls for the same min/max ranges.
CALIBRATION_BATCH = 10


def _converter(model):
    import tensorflow as tf

    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    forward, variables = _forward(model)
    holder = tf.Module()
    holder.tracked = variables
    # no autograph: Keras 3 traces its own predict step without it (do_not_convert), and
    # rewriting the forward's source costs about 0.5 s
    fn = tf.function(forward, autograph=False,
                     input_signature=[tf.TensorSpec((None, *shape), tf.float32, name=INPUT_NAME)])
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], holder)
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    # The converter's own provenance record costs two Python flatbuffer round trips of the
    # whole file; the manifest and the embedded metadata already say how the file was made.
    conv.exclude_conversion_metadata = True
    return conv


def _forward(model):
    """The function to convert and the variables it reads.

    TFLite's FULLY_CONNECTED stores its weight as [units, inputs], Keras as [inputs, units], so
    the converter folds a transpose of every Dense kernel at build time: 2-3 s of the float32
    conversion for the tutorial's 41M-weight Dense (docs/export.md). For a single chain of
    layers, each Dense on [batch, features] is traced as a matmul with an already transposed
    copy of its kernel, which the converter takes as is; the parity gate proves the result like
    any other. Any other model is traced whole.
    """
    import tensorflow as tf

    from xray_edge.export.model_check import layer_chain

    try:
        chain = layer_chain(model)
    except Exception:  # noqa: BLE001 - merges, shared layers, anything the walk does not know
        chain = None
    if chain is None or not any(_plain_dense(layer, shape) for layer, shape in chain):
        return (lambda image: model(image, training=False)), [getattr(v, "value", v) for v in model.variables]

    steps, variables, replaced = [], [], set()
    for layer, shape in chain:
        if _plain_dense(layer, shape):
            # tf.transpose: 0.2 s for the 41M weights, where numpy's strided copy takes 1.5 s
            kernel_t = tf.Variable(tf.transpose(layer.kernel.value), name=f"{layer.name}_kernel_t")
            variables.append(kernel_t)
            replaced.add(id(layer.kernel))
            steps.append(lambda x, layer=layer, k=kernel_t: _dense(layer, k, x))
        else:
            steps.append(lambda x, layer=layer: layer(x, training=False))
    variables += [getattr(v, "value", v) for v in model.variables if id(v) not in replaced]

    def forward(image):
        x = image
        for step in steps:
            x = step(x)
        return x

    return forward, variables


def _plain_dense(layer, in_shape: tuple) -> bool:
    import keras

    return (type(layer) is keras.layers.Dense and len(in_shape) == 2 and layer.compute_dtype == "float32"
            and not getattr(layer, "lora_enabled", False) and getattr(layer, "quantization_mode", None) is None)


def _dense(layer, kernel_t, x):
    import tensorflow as tf

    y = tf.matmul(x, kernel_t, transpose_b=True)
    if layer.use_bias:
        y = y + layer.bias.value
    return layer.activation(y)


def convert_float32(model) -> bytes:
    with _without_buffer_dedup():
        return _converter(model).convert()


@contextlib.contextmanager
def _without_buffer_dedup():
    """The converter ends by storing identical read-only buffers once, found in Python by
    unpacking and repacking the whole flatbuffer: 1.5 s for the tutorial's 164 MB, to save
    nothing, since a Keras model's weight tensors are not copies of each other (a file with two
    equal ones is only larger, never different in what it computes). Skipped for this call; if
    a TensorFlow moves the function, the step simply runs."""
    import sys

    lite = sys.modules.get("tensorflow.lite.python.lite")
    original = getattr(lite, "_deduplicate_readonly_buffers", None)
    if original is None:
        yield
        return
    lite._deduplicate_readonly_buffers = lambda flatbuffer: flatbuffer
    try:
        yield
    finally:
        lite._deduplicate_readonly_buffers = original


def start_tensorflow(threads: int | None = None, onednn: bool = True) -> None:
    """Import TensorFlow and Keras with the garbage collector paused, then freeze what they made.

    The import creates about a million Python objects; collecting again and again while it runs
    costs about 0.9 s, and every later full collection would walk them all. Only the first
    call in a process does anything.

    Args:
        threads: TensorFlow's threads per operation (None: all cores). Settable only here,
            before TensorFlow runs its first operation, like `onednn`.
        onednn: TensorFlow's oneDNN kernels. Off, Keras runs the export's few images more
            slowly, but a loaded model keeps 350 MB less (RssAnon 420 against 773 MB for the
            tutorial's): off where two TensorFlow processes share the memory.
    """
    import gc
    import os
    import sys

    if "tensorflow" in sys.modules:
        return
    if not onednn:
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    # TFLite imports JAX, when installed, only for its JAX converter: 0.6 s of start-up. Kept
    # when Keras itself is told to run on JAX, which then needs it.
    jax_hidden = "jax" not in sys.modules and os.environ.get("KERAS_BACKEND", "tensorflow") == "tensorflow"
    if jax_hidden:
        sys.modules["jax"] = None  # makes `import jax` raise ImportError, which TFLite expects
    collecting = gc.isenabled()
    gc.disable()
    try:
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
    finally:
        if collecting:
            gc.enable()
        if jax_hidden and sys.modules.get("jax", 0) is None:
            del sys.modules["jax"]
    gc.freeze()
    if threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)


def convert_float16(model) -> bytes:
    """float16 weights (half the size), float32 compute and I/O."""
    import tensorflow as tf

    conv = _converter(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.target_spec.supported_types = [tf.float16]
    return conv.convert()


def quantize_int8(float32: bytes, calibration: np.ndarray, threads: int | None = None) -> bytes:
    """Full-integer int8 from a float32 flatbuffer: uint8 image input, uint8 output.

    The same two steps `TFLiteConverter` takes for `representative_dataset` +
    `TFLITE_BUILTINS_INT8` + uint8 I/O (tensorflow/lite/python/lite.py, `_quantize`): record
    min/max of every tensor over the calibration images, then quantize with the MLIR quantizer.
    The ranges are measured by `ranges` where it covers the model, else by the converter's
    calibrator.

    Args:
        float32: a flatbuffer from `convert_float32` (no metadata needed).
        calibration: uint8 [N, H, W, C] real images from the one preprocessing; the activation
            ranges are measured on them (0-255 pixels, the model divides by 255 itself).
        threads: for measuring the ranges (None: every core; 1 beside other work).

    Raises:
        XrayEdgeError: an activation took a NaN or infinite value (on the measured route; the
            calibrator only warns about NaN).
        ImportError: this TensorFlow keeps those private functions elsewhere (use
            `convert_int8_with_converter`).
    """
    import tensorflow as tf
    from tensorflow.lite.python.convert import mlir_quantize

    from xray_edge.export import ranges

    if len(calibration) == 0:
        raise ValueError("int8 export needs calibration images")

    if ranges.covered(float32):
        measured = ranges.measure(float32, _batches(calibration, CALIBRATION_BATCH),
                                  threads or os.cpu_count() or 1)
        release_freed_memory()  # the interpreter's kept tensors, before the quantizer's peak
        calibrated = ranges.write(float32, measured)
    else:
        calibrated = _calibrate(float32, calibration)
    del float32  # only the calibrated copy is needed from here
    with quiet_stderr():  # the quantizer prints its settings from C++ on every call
        return bytes(mlir_quantize(calibrated, disable_per_channel=False,
                                   input_data_type=tf.uint8, output_data_type=tf.uint8))


def _calibrate(float32: bytes, calibration: np.ndarray) -> bytes:
    """The converter's own calibrator: the float32 flatbuffer with every tensor's min/max."""
    from tensorflow.lite.python.optimize.calibrator import Calibrator, add_intermediate_tensors

    from xray_edge.export.ranges import has_lstm

    # Only LSTM-type operators need intermediate tensors; adding none still rewrites the whole
    # flatbuffer (0.7 s for the tutorial's model), so it is called only when one is there.
    calibrator = Calibrator(add_intermediate_tensors(float32) if has_lstm(float32) else float32)
    calibrated = calibrator.calibrate(lambda: ([b] for b in _batches(calibration, CALIBRATION_BATCH)))
    del calibrator
    release_freed_memory()  # the calibration interpreter's buffers, before the quantizer's peak
    return calibrated


def _batches(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Equal-sized float32 batches; the last is topped up with images already seen, which leaves
    every min and max unchanged (the calibrator sizes its input once, from the first batch)."""
    size = min(size, len(images))
    for start in range(0, len(images), size):
        batch = images[start:start + size]
        if len(batch) < size:
            batch = np.concatenate([batch, images[:size - len(batch)]])
        yield batch.astype(np.float32)


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
