"""Time export's int8 route against the converter's public one on a trained model, and compare them.

    .venv/bin/python tests/tools/bench_int8.py --artifacts /tmp/exp-art [--calibration 100]

Prints the wall and CPU time of the float32 conversion, of the activation ranges measured both
ways (the converter's calibrator, and export's `ranges` in LiteRT), of the MLIR quantization and
of the converter's own int8 route; then how many tensors differ between export's int8 file and
the converter's in dtype, shape or zero point, the largest relative scale difference, and how
many raw uint8 outputs differ on the held-out images. Figures: docs/export.md.
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
    print(f"{label:<46} {time.perf_counter() - wall:6.1f} s wall {time.process_time() - cpu:6.1f} s CPU", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", type=Path, required=True, help="folder with model.keras and training.json")
    ap.add_argument("--calibration", type=int, default=100)
    ap.add_argument("--parity", type=int, default=40)
    ap.add_argument("--batch", type=int, default=None, help="images per calibration step "
                    "(default: export's CALIBRATION_BATCH)")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter
    from tensorflow.lite.python.convert import mlir_quantize
    from tensorflow.lite.python.optimize.calibrator import Calibrator

    from xray_edge.export import calibration, ranges, tflite
    from xray_edge.preprocess import load_images
    from xray_edge.training_record import TrainingRecord

    record = TrainingRecord.read(args.artifacts)
    sets = calibration.image_sets(record, None, args.calibration, args.parity, 0)
    cal = load_images(sets.calibration, record.preprocessing)[0]
    par = load_images(sets.parity, record.preprocessing)[0]
    model = keras.saving.load_model(args.artifacts / "model.keras", compile=False)

    batch = args.batch or tflite.CALIBRATION_BATCH
    flat = timed("float32 conversion", lambda: tflite.convert_float32(model))
    timed(f"calibrator ({len(cal)} images, {batch} per step)",
          lambda: Calibrator(flat).calibrate(lambda: ([b] for b in tflite._batches(cal, batch))))
    measured = timed(f"ranges in LiteRT ({len(cal)} images, {batch} per step)",
                     lambda: ranges.measure(flat, tflite._batches(cal, batch)))
    calibrated = timed("ranges written into the flatbuffer", lambda: ranges.write(flat, measured))
    ours = timed("MLIR quantization", lambda: bytes(mlir_quantize(
        calibrated, disable_per_channel=False, input_data_type=tf.uint8, output_data_type=tf.uint8)))
    ref = timed("converter's public int8 route", lambda: tflite.convert_int8_with_converter(model, cal))

    def params(b):
        it = Interpreter(model_content=b)
        return {t["name"]: t for t in it.get_tensor_details()}, it

    (pa, ia), (pb, ib) = params(ours), params(ref)
    differ = [n for n in pb if n not in pa or pa[n]["dtype"] != pb[n]["dtype"]
              or list(pa[n]["shape"]) != list(pb[n]["shape"])
              or not np.array_equal(pa[n]["quantization_parameters"]["zero_points"],
                                    pb[n]["quantization_parameters"]["zero_points"])]
    rel = max((float(np.max(np.abs(pa[n]["quantization_parameters"]["scales"] - pb[n]["quantization_parameters"]["scales"])
                            / np.maximum(pb[n]["quantization_parameters"]["scales"], 1e-30)))
               for n in pb if n in pa and len(pb[n]["quantization_parameters"]["scales"])), default=0.0)
    print(f"tensors: {len(pb)}; differing in dtype/shape/zero point: {len(differ)}; max relative scale difference {rel:.1e}")

    def raw(it):
        it.allocate_tensors()
        i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
        out = []
        for x in par:
            it.set_tensor(i, x[None])
            it.invoke()
            out.append(it.get_tensor(o).copy())
        return np.concatenate(out)

    ra, rb = raw(ia), raw(ib)
    print(f"raw uint8 outputs differing: {int(np.sum(ra != rb))} of {ra.size} ({len(par)} held-out images)")


if __name__ == "__main__":
    main()
