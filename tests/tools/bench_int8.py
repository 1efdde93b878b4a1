"""Time an int8 route on a trained model and compare its outputs with Keras.

    .venv/bin/python tests/tools/tree_memory.py -- \
        .venv/bin/python tests/tools/bench_int8.py --artifacts artifacts --route converter

Routes: `converter`, TensorFlow's public `TFLiteConverter` with a representative dataset (what
export uses); `litert-quantizer`, the float32 flatbuffer quantized by litert-quantizer with plain
min/max calibration (needs `pip install litert-quantizer`). Prints the seconds of each step and,
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


def litert_quantizer_int8(float32: bytes, calibration: np.ndarray) -> bytes:
    from litert_quantizer import Quantizer, calibrator, recipe, recipe_manager
    from litert_quantizer.utils import qsv_utils

    rec = recipe.static_wi8_ai8()
    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(rec)
    # its default moving average of per-image ranges flipped half the decisions here
    calib = calibrator.Calibrator(float32, num_threads=os.cpu_count() or 1,
                                  qsv_update_func=qsv_utils.min_max_update)
    key = calib.get_signature_list()[0] if hasattr(calib, "get_signature_list") else "serving_default"
    calib.calibrate({key: [{"image": x[None].astype(np.float32)} for x in calibration]}, manager)
    result = Quantizer(float32, rec).quantize(calib.get_model_qsvs(), enable_progress_report=False)
    return bytes(result.quantized_model)


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
        int8 = timed(f"converter int8 ({len(cal)} images)", lambda: tflite.convert_int8(model, cal))
    else:
        flat = timed("float32 conversion", lambda: tflite.convert_float32(model))
        del model
        int8 = timed(f"litert-quantizer int8 ({len(cal)} images)", lambda: litert_quantizer_int8(flat, cal))
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
