"""Where a model becomes files: convert each format, prove it, then name it and list it.

For every format: convert to bytes, embed the metadata, write under a temporary name, load it in
the runtime the device uses, compare with Keras on held-out real images, and only if every gate
passes rename it to its final name. Then the manifest is written, also atomically.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.metadata
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from xray_edge import __version__
from xray_edge.backends import open_backend
from xray_edge.errors import XrayEdgeError, first_line
from xray_edge.files import atomic_write_bytes, sha256_file
from xray_edge.manifest import FileEntry, Manifest, write_manifest
from xray_edge.metadata import ModelInfo, read_keras_metadata, tflite_with_metadata
from xray_edge.preprocess import Preprocessing, load_images
from xray_edge.training_record import TrainingRecord
from xray_edge.export import calibration, parity
from xray_edge.export.operating_point import DEFAULT_TARGET_SENSITIVITY, choose_threshold


@dataclass(frozen=True)
class Format:
    name: str
    file: str
    runtime: str  # the edge backend that proves it
    precision: str  # which parity gates apply: float, float16 or int8
    description: str

    @property
    def quantized(self) -> bool:
        return self.precision == "int8"


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("float32", "xray_float32.tflite", "litert", "float", "TFLite float32, builtin ops"),
    Format("int8", "xray_int8.tflite", "litert", "int8", "TFLite full-integer int8, uint8 input"),
    Format("onnx", "xray.onnx", "onnxruntime", "float", "ONNX float32, dynamic batch"),
    Format("float16", "xray_float16.tflite", "litert", "float16", "TFLite float16 weights"),
    Format("onnx-int8", "xray_int8.onnx", "onnxruntime", "int8",
           "ONNX static int8 (QDQ): uint8 activations, int8 per-channel weights"),
)}
DEFAULT_FORMATS = ("float32", "int8", "onnx")


@dataclass
class ExportConfig:
    model: Path
    out: Path
    formats: tuple[str, ...] = DEFAULT_FORMATS
    data: Path | None = None  # images for calibration/parity when there is no training.json
    calibration_size: int = 100  # ~63 ms each in the int8 converter on 2 cores
    parity_size: int = 200
    seed: int = 0
    threshold: float | None = None  # None: chosen on validation for target_sensitivity
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    gates: parity.Gates = field(default_factory=parity.Gates)
    # Hook for tests: lets a test corrupt a converted file before it is proven.
    tamper: Callable[[str, bytes], bytes] | None = None


@dataclass
class ExportResult:
    manifest: Manifest
    results: list[parity.ParityResult]
    timings: dict

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)


def run_export(cfg: ExportConfig, log: Callable[[str], None] = print) -> ExportResult:
    """Convert, prove and write every requested format; see the module docstring.

    Raises:
        XrayEdgeError: bad configuration or inputs (before anything is written).
        A failed parity gate is not an exception: check `ExportResult.passed` (the CLI exits 1).
    """
    unknown = [f for f in cfg.formats if f not in FORMATS]
    if unknown:
        raise XrayEdgeError(f"unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    if not cfg.model.is_file():
        raise XrayEdgeError(f"{cfg.model}: model not found; train one first (make train)")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    import keras

    try:
        model = keras.saving.load_model(cfg.model, compile=False)
    except Exception as exc:  # noqa: BLE001 - zip, h5, deserialization errors
        raise XrayEdgeError(f"{cfg.model}: cannot load Keras model ({first_line(exc)})") from None
    timings["load_model"] = time.perf_counter() - t0
    record = TrainingRecord.read(cfg.model.parent)
    meta = read_keras_metadata(cfg.model)
    classes = record.classes if record else meta.get("classes")
    if not classes:
        raise XrayEdgeError(f"{cfg.model}: no class names (no training.json beside it)")
    spec = record.preprocessing if record else Preprocessing.from_dict(meta.get("preprocessing") or {})
    synthetic = record.synthetic if record else bool(meta.get("synthetic", False))
    binary = int(model.outputs[0].shape[-1]) == 1
    if cfg.threshold is not None:
        threshold, operating_point = cfg.threshold, {"threshold": cfg.threshold, "chosen_on": "given by the user"}
    elif binary:
        threshold, operating_point = choose_threshold(model, record, spec, cfg.target_sensitivity)
    else:
        threshold, operating_point = None, {"threshold": None, "chosen_on": "softmax: highest probability"}
    log(f"threshold: {threshold if threshold is None else round(threshold, 4)} ({operating_point['chosen_on']})")
    info = ModelInfo(tuple(classes), threshold if binary else None, spec, synthetic_data=synthetic)

    sets = calibration.image_sets(record, cfg.data, cfg.calibration_size,
                                  cfg.parity_size, cfg.seed)
    t = time.perf_counter()
    need_cal = any(FORMATS[f].quantized for f in cfg.formats)
    cal_images = (load_images(sets.calibration, spec)[0]
                  if need_cal else np.zeros((0, *spec.shape), np.uint8))
    par_images, _, par_err = load_images(sets.parity, spec)
    for e in par_err:
        log(f"warning: skipped {e}")
    reference = np.asarray(model.predict(par_images, batch_size=16, verbose=0), dtype=np.float32)
    timings["images_and_keras_reference"] = time.perf_counter() - t
    log(f"calibration: {len(cal_images)} images; parity: {len(par_images)} held-out images ({sets.source})")

    cfg.out.mkdir(parents=True, exist_ok=True)
    source_sha = sha256_file(cfg.model)
    results: list[parity.ParityResult] = []
    files: dict[str, FileEntry] = {}
    for name in cfg.formats:
        fmt = FORMATS[name]
        t = time.perf_counter()
        embedded = {**ModelInfo(info.labels, info.threshold, spec, name, synthetic).to_dict(),
                    "source_model_sha256": source_sha, "xray_edge_version": __version__}
        data = _convert(fmt, model, cal_images, embedded)
        t_conv = time.perf_counter() - t
        if cfg.tamper:
            data = cfg.tamper(name, data)
        res, entry = _prove_and_place(fmt, data, cfg.out, reference, par_images, info, cfg.gates, log)
        results.append(res)
        if entry is not None:
            seconds = {"convert": round(t_conv, 2), "parity": round(time.perf_counter() - t - t_conv, 2)}
            files[fmt.file] = dataclasses.replace(entry, seconds=seconds)
        timings[name] = time.perf_counter() - t

    manifest = Manifest(
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        xray_edge_version=__version__,
        labels=info.labels,
        output=({"kind": "sigmoid", "units": 1,
                 "meaning": f"probability of {info.labels[1]!r} (index 1); "
                            f"{info.labels[1]!r} when p >= threshold, else {info.labels[0]!r}"}
                if binary else
                {"kind": "softmax", "units": len(info.labels), "meaning": "probability per label, in order"}),
        threshold=info.threshold,
        operating_point=operating_point,
        positive_class=record.positive_class if record else None,
        preprocessing=spec,
        default=next((FORMATS[f].file for f in ("int8", "float32", "onnx", "onnx-int8", "float16")
                      if FORMATS[f].file in files), None),
        files=files,
        rejected={r.format: r.to_dict() for r in results if not r.passed},
        source_model={"file": cfg.model.name, "sha256": source_sha},
        training={"synthetic": synthetic, "data": record.data if record else None,
                  "classes": list(classes), "counts": record.counts if record else None},
        calibration={"images": len(cal_images), "source": sets.source, "seed": cfg.seed},
        parity_set={"images": int(len(par_images)), "disjoint_from_calibration": True},
        gates=vars(cfg.gates),
        versions=_versions(),
    )
    write_manifest(cfg.out, manifest)
    timings["total"] = time.perf_counter() - t0
    return ExportResult(manifest, results, timings)


def _prove_and_place(fmt: Format, data: bytes, out: Path, reference: np.ndarray, images: np.ndarray,
                     info: ModelInfo, gates: parity.Gates, log) -> tuple[parity.ParityResult, FileEntry | None]:
    """Write `data` under a temporary name, prove it in its runtime, and only then name it.

    Returns the parity result and, when it passed, the file's manifest entry.
    """
    final = out / fmt.file
    tmp = out / f".{fmt.file}.unproven{final.suffix}"
    atomic_write_bytes(tmp, data)
    try:
        backend = open_backend(tmp, fmt.runtime)
        candidate = parity.predict_each(backend, images)
        res = parity.compare(fmt.name, fmt.runtime, reference, candidate, info, fmt.precision, gates)
        log(res.line())
        if not res.passed:
            log(f"  {fmt.name}: REFUSED ({'; '.join(res.failed_gates)}); not written as {final.name}")
            final.unlink(missing_ok=True)  # an older file under this name would now be unproven
            return res, None
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return res, FileEntry(
        format=fmt.name, description=fmt.description, size=final.stat().st_size,
        sha256=sha256_file(final), runtime=f"{backend.name} {backend.version}",
        input={"name": backend.input_name, "dtype": str(backend.input_dtype),
               "shape": [d if isinstance(d, int) else None for d in backend.input_shape],
               "quantization": list(getattr(backend, "input_quant", ()) or []) or None},
        output={"name": backend.output_name,
                "quantization": list(getattr(backend, "output_quant", ()) or []) or None},
        parity=res.to_dict(),
    )


def _convert(fmt: Format, model, cal_images: np.ndarray, embedded: dict) -> bytes:
    from xray_edge.export import tflite

    if fmt.name in ("onnx", "onnx-int8"):
        from xray_edge.export.onnx import keras_to_onnx, quantize_qdq

        float_model = keras_to_onnx(model, embedded)
        return float_model if fmt.name == "onnx" else quantize_qdq(float_model, cal_images, embedded)
    if fmt.name == "int8":
        flat = tflite.convert_int8(model, cal_images)
    elif fmt.name == "float16":
        flat = tflite.convert_float16(model)
    else:
        flat = tflite.convert_float32(model)
    return tflite_with_metadata(flat, embedded)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("tensorflow", "tensorflow-cpu", "keras", "onnx", "onnxruntime", "ai-edge-litert", "numpy", "pillow"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
