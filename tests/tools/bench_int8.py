"""Time an int8 route on a trained model and compare its outputs with Keras.

    .venv/bin/python tests/tools/tree_memory.py -- \
        .venv/bin/python tests/tools/bench_int8.py --artifacts artifacts --route converter

Routes: `litert-quantizer`, the float32 flatbuffer quantized by export's `tflite.quantize_int8`
(what export uses); `converter`, TensorFlow's public `TFLiteConverter` with a representative
dataset, a second conversion of the Keras graph. Prints the seconds of each step and,
on the held-out images, max |Δp| against Keras and the decisions flipped at 0.5. Run each route
in its own process (under tree_memory.py for its peak memory). Figures: docs/export.md.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def timed(label: str, fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    print(f"{label:<40} {time.perf_counter() - wall:6.1f} s wall {time.process_time() - cpu:6.1f} s CPU", flush=True)
    return out


def converter_int8(model, calibration: np.ndarray) -> bytes:
    """TensorFlow's public int8 route: a second conversion of the Keras graph, calibrated by a
    representative dataset, uint8 input and output."""
    import tensorflow as tf

    shape = tuple(int(d) for d in model.inputs[0].shape[1:])
    holder = tf.Module()
    holder.tracked = [getattr(v, "value", v) for v in model.variables]
    fn = tf.function(lambda image: model(image, training=False),
                     input_signature=[tf.TensorSpec((None, *shape), tf.float32, name="image")])
    conv = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], holder)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([b] for b in np.array_split(calibration.astype(np.float32), 10))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.uint8
    conv.exclude_conversion_metadata = True
    return conv.convert()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", type=Path, required=True, help="folder with model.keras and training.json")
    ap.add_argument("--route", choices=("converter", "litert-quantizer"), default="converter")
    ap.add_argument("--calibration", type=int, default=100)
    ap.add_argument("--parity", type=int, default=200)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from xray_edge.backends import open_backend
    from xray_edge.export import calibration, tflite
    from xray_edge.preprocess import load_images
    from xray_edge.training_record import TrainingRecord

    record = TrainingRecord.read(args.artifacts)
    sets = calibration.image_sets(record, None, args.calibration, args.parity, 0)
    cal = load_images(sets.calibration, record.preprocessing)[0]
    par = load_images(sets.parity, record.preprocessing)[0]
    model = timed("load Keras model", lambda: keras.saving.load_model(args.artifacts / "model.keras", compile=False))
    reference = model.predict(par, batch_size=16, verbose=0)
    if args.route == "converter":
        int8 = timed(f"converter int8 ({len(cal)} images)", lambda: converter_int8(model, cal))
    else:
        flat = timed("float32 conversion", lambda: tflite.convert_float32(model))
        del model
        int8 = timed(f"litert-quantizer int8 ({len(cal)} images)", lambda: tflite.quantize_int8(flat, cal))
    path = Path(f"/tmp/bench_int8_{os.getpid()}.tflite")
    path.write_bytes(int8)
    try:
        backend = open_backend(path, "litert")
        print(f"input {backend.input_dtype} quantization {getattr(backend, 'input_quant', None)}")
        out = np.stack([backend.predict(x) for x in par])
    finally:
        path.unlink()
    diff = np.abs(out - reference)
    flips = int(np.sum((out[:, -1] >= 0.5) != (reference[:, -1] >= 0.5)))
    print(f"{args.route}: {len(int8) / 1e6:.1f} MB, {len(par)} held-out images: max|Δp| {diff.max():.4f}, "
          f"mean {diff.mean():.4f}, decisions flipped at 0.5: {flips}")


if __name__ == "__main__":
    main()
