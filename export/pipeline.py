"""Where a model becomes files: check it, convert each format, prove each file, publish the set.

The steps, each timed and named in any error:
1. load the Keras model and what training recorded beside it;
2. check that every requested format can be made from it (`model_check`), before converting;
3. convert float32 TFLite first: int8 starts from it, in a second process when that pays
   (`int8_process`), and runs beside every step below until its own proof;
4. choose the operating point, load the parity images, run Keras on them;
5. convert the other formats; write each file into a staging folder (`staging`) and prove it in
   the runtime the device uses, against Keras on held-out images;
6. only if every file passed: publish the set, manifest last. Otherwise nothing changes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import importlib.metadata
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from xray_edge import __version__
from xray_edge.errors import XrayEdgeError, first_line
from xray_edge.files import sha256_file
from xray_edge.manifest import FileEntry, Manifest
from xray_edge.metadata import ModelInfo, read_keras_metadata, tflite_with_metadata
from xray_edge.preprocess import Preprocessing, load_images, release_freed_memory
from xray_edge.training_record import TrainingRecord
from xray_edge.export import calibration, int8_process, parity
from xray_edge.export.formats import DEFAULT_FILE_ORDER, DEFAULT_FORMATS, FORMATS, Format, ModelSource
from xray_edge.export.model_check import check_model
from xray_edge.export.operating_point import DEFAULT_TARGET_SENSITIVITY, choose_threshold
from xray_edge.export.staging import Staging

__all__ = ["DEFAULT_FORMATS", "FORMATS", "ExportConfig", "ExportFailed", "ExportResult", "run_export"]


@dataclass
class ExportConfig:
    model: Path
    out: Path
    formats: tuple[str, ...] = DEFAULT_FORMATS
    data: Path | None = None  # images for calibration/parity when there is no training.json
    calibration_size: int = 100
    parity_size: int = 200
    seed: int = 0
    threshold: float | None = None  # None: chosen on validation for target_sensitivity
    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    gates: parity.Gates = field(default_factory=parity.Gates)
    int8_process: bool | None = None  # quantize int8 in a second process; None: when it pays
    # Hooks for tests: corrupt a converted file before it is proven; interrupt the export
    # before a step ("convert onnx", "place manifest.json", ...).
    tamper: Callable[[str, bytes], bytes] | None = None
    on_step: Callable[[str], None] | None = None


class ExportFailed(XrayEdgeError):
    """A step of the export failed. The message names the step.

    `partial` is True only when publishing itself failed between two renames: then the folder
    may hold new model files beside the old manifest, which the runner refuses (export again).
    Otherwise nothing was published."""

    def __init__(self, message: str, partial: bool = False):
        super().__init__(message)
        self.partial = partial


@dataclass
class ExportResult:
    manifest: Manifest  # published only when `passed`
    results: list[parity.ParityResult]
    timings: dict[str, float]  # seconds per step, and "total"

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)


@dataclass
class _Source:
    """What the export knows about the Keras model before converting it."""

    record: TrainingRecord | None
    info: ModelInfo  # labels, threshold, preprocessing
    operating_point: dict
    sha256: str
    sigmoid: bool  # one sigmoid unit (else a softmax over the labels)


def run_export(cfg: ExportConfig, log: Callable[[str], None] = print) -> ExportResult:
    """Convert, prove and publish every requested format; see the module docstring.

    Returns:
        The result; `passed` is False when a file failed its gates (then nothing was published).

    Raises:
        XrayEdgeError: a bad configuration, found before anything is read or written.
        ExportFailed: a step failed (its name and the reason in one line); nothing was published.
    """
    formats = _formats(cfg)
    steps = _Steps(log, cfg.on_step)
    with contextlib.ExitStack() as cleanup:
        with steps("load model"):
            # started first, so that its TensorFlow start overlaps this process's
            aside = cleanup.enter_context(int8_process.Int8Process()) if _int8_aside(cfg, formats) else None
            model = _load_keras(cfg.model, lean=aside is not None)
            record = TrainingRecord.read(cfg.model.parent)
            meta = read_keras_metadata(cfg.model)
            spec = record.preprocessing if record else Preprocessing.from_dict(meta.get("preprocessing") or {})
        with steps("check model"):
            check_model(model, spec, [f.name for f in formats], record.classes if record else meta.get("classes"))
            sets = calibration.image_sets(record, cfg.data, cfg.calibration_size, cfg.parity_size, cfg.seed)
        here = [f for f in formats if not (aside and f.name == "int8")]  # made in this process
        source = ModelSource(model, [f.name for f in formats])
        float_first = bool(source.FROM_FLOAT_TFLITE & set(source.formats))
        if float_first:
            with steps("convert float32"):  # first: int8 starts from it
                _float32_first(source, aside, here, cfg.model, sets, spec, log)
        with steps("images and Keras reference"):
            cal_images, (par_paths, par_images) = _images(sets, spec, any(f.needs_calibration for f in here), log)
            reference = np.asarray(model.predict(par_images, batch_size=16, verbose=0), dtype=np.float32)
            log(_images_line(cal_images, par_images, sets, aside))
        with steps("operating point"):  # on the validation split, which the parity images mostly are
            src = _describe(cfg, model, record, meta, spec, known=dict(zip(par_paths, reference)))
            log(f"threshold: {_round(src.info.threshold)} ({src.operating_point['chosen_on']})")
        del model  # the source holds it until the last conversion
        proof = functools.partial(_prove, reference=reference, images=par_images, info=src.info,
                                  gates=cfg.gates, steps=steps, log=log)

        with steps("open staging folder"):
            stage = Staging(cfg.out, before=cfg.on_step)
        with stage:
            for i, fmt in enumerate(here):
                early = float_first and fmt.name == "float32"  # converted in its own step above
                _convert(fmt, source, cal_images, src, stage, steps, cfg.tamper, early)
                source.release_float_tflite_unless(here[i + 1:])
            source.release()  # the Keras model and cached conversions: memory back for the proofs
            release_freed_memory()
            # one thread each while int8 is made aside: the second core is its
            proven = [proof(fmt, stage, threads=1 if aside else None) for fmt in here]
            if aside:
                proven.append(_collect_aside(aside, src, stage, proof, cfg.tamper, steps, log))
            results, files = _results_and_files(formats, proven, _convert_seconds(steps.timings, aside))
            n_cal = aside.images if aside else len(cal_images)
            manifest = _manifest(cfg, src, files, results, n_cal, len(par_images), sets.source)
            _publish(stage, manifest, results, cfg.out, steps, log)
    steps.timings["total"] = time.perf_counter() - steps.start
    return ExportResult(manifest, results, steps.timings)


def _float32_first(source: ModelSource, aside: int8_process.Int8Process | None, here: list[Format],
                   model_path: Path, sets: calibration.ImageSets, spec: Preprocessing, log) -> None:
    """Convert float32 before anything else and hand it to the int8 process, if there is one;
    keep it only if a format made here still starts from it."""
    if aside:  # decoded there while this process converts
        aside.calibrate_on(model_path, sets.calibration, spec)
    float32 = source.float_tflite()
    if aside:
        aside.quantize(float32)
        log("int8: calibrating and quantizing in a second process, beside the next steps")
    del float32
    source.release_float_tflite_unless(here)


def _convert_seconds(timings: dict[str, float], aside: int8_process.Int8Process | None) -> dict[str, float]:
    """Conversion seconds per format, from the step timings; int8 made aside by the second
    process's own figures (its step here is only the wait for it)."""
    seconds = {name[len("convert "):]: t for name, t in timings.items() if name.startswith("convert ")}
    if aside:
        seconds["int8"] = round(aside.figures["images"] + aside.figures["quantize"], 2)
    return seconds


def _results_and_files(formats: list[Format], proven: list[tuple[parity.ParityResult, FileEntry | None]],
                       seconds: dict[str, float]) -> tuple[list[parity.ParityResult], dict[str, FileEntry]]:
    """Every format's parity result, and the manifest entry of each that passed, in the order asked."""
    asked = [f.name for f in formats]
    results = sorted((res for res, _ in proven), key=lambda r: asked.index(r.format))
    passed = {e.format: e for _, e in proven if e}
    files = {}
    for f in formats:
        if f.name in passed:
            entry = passed[f.name]
            files[f.file] = replace(entry, seconds={"convert": seconds[f.name], **entry.seconds})
    return results, files


def _publish(stage: Staging, manifest: Manifest, results: list[parity.ParityResult], out: Path,
             steps: "_Steps", log) -> None:
    """Publish the staged set if every file passed; otherwise say which failed and publish nothing."""
    if not all(r.passed for r in results):
        failed = ", ".join(f"{r.format} ({'; '.join(r.failed_gates)})" for r in results if not r.passed)
        log(f"refused: {failed}; nothing was written to {out}")
        return
    try:
        with steps("publish"):
            stage.publish(manifest, owned=[f.file for f in FORMATS.values()])
    except ExportFailed as exc:
        raise ExportFailed(str(exc), partial=bool(stage.changed)) from exc.__cause__


def _int8_aside(cfg: ExportConfig, formats: list[Format]) -> bool:
    if not any(f.name == "int8" for f in formats):
        return False
    return int8_process.worth_it(cfg.model) if cfg.int8_process is None else cfg.int8_process


def _images_line(cal_images: np.ndarray, par_images: np.ndarray, sets: calibration.ImageSets,
                 aside: int8_process.Int8Process | None) -> str:
    if aside:
        cal = f"calibration: {len(sets.calibration)} images, decoded in the second process; "
    else:
        cal = f"calibration: {len(cal_images)} images; " if len(cal_images) else ""
    return f"{cal}parity: {len(par_images)} held-out images ({sets.source})"


def _convert(fmt: Format, source: ModelSource, cal_images: np.ndarray, src: "_Source", stage: Staging,
             steps: "_Steps", tamper, early: bool) -> None:
    """Write one format into the staging folder, with its embedded metadata. A format converted
    `early`, in its own step (float32: int8 starts from it), only gets its metadata here."""
    with steps(f"write {fmt.name}" if early else f"convert {fmt.name}"):
        data = fmt.convert(source, cal_images, _embedded(src, fmt))
        stage.write(fmt.file, tamper(fmt.name, data) if tamper else data)


def _collect_aside(aside: int8_process.Int8Process, src: "_Source", stage: Staging, proof: Callable,
                   tamper, steps: "_Steps", log) -> tuple[parity.ParityResult, FileEntry | None]:
    """Wait for the int8 file made in the second process, then stage and prove it."""
    fmt = FORMATS["int8"]
    with steps("convert int8"):
        data = tflite_with_metadata(aside.result(), _embedded(src, fmt))
        fig = aside.figures
        log(f"  int8, in the second process: {aside.images} images decoded in {fig['images']:.1f} s, "
            f"calibrated and quantized in {fig['quantize']:.1f} s, peak memory {fig['peak_gib']:.2f} GiB")
        stage.write(fmt.file, tamper(fmt.name, data) if tamper else data)
    return proof(fmt, stage)


def _prove(fmt: Format, stage: Staging, threads: int | None = None, *, reference: np.ndarray,
           images: np.ndarray, info: ModelInfo, gates: parity.Gates, steps: "_Steps", log
           ) -> tuple[parity.ParityResult, FileEntry | None]:
    """Prove one staged file against Keras on the parity images; returns its result and, if it
    passed, its manifest entry."""
    with steps(f"prove {fmt.name}") as t:
        res, backend = parity.prove(fmt.name, fmt.runtime, stage.path(fmt.file), reference,
                                    images, info, fmt.gates, gates, threads)
        log(res.line())
    release_freed_memory()  # the runtime's buffers, before the next step (or the int8 process) peaks
    if not res.passed:
        return res, None
    entry = _file_entry(fmt, stage.path(fmt.file), backend, res)
    return res, replace(entry, seconds={"prove": t.seconds})


class _Steps:
    """Names, times and logs each step; turns any failure inside one into `ExportFailed`."""

    def __init__(self, log: Callable[[str], None], on_step: Callable[[str], None] | None):
        self._log = log
        self._on_step = on_step or (lambda name: None)
        self.timings: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        timer = _Timer()
        try:
            self._on_step(name)
            yield timer
        except ExportFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: name the step, one line
            raise ExportFailed(f"{name}: {first_line(exc)}") from exc
        timer.seconds = round(time.perf_counter() - timer.start, 2)
        self.timings[name] = timer.seconds
        # CPU time beside wall time: on a shared machine the ratio between runs is what holds
        self._log(f"  {name}: {timer.seconds:.1f} s wall, {time.process_time() - timer.cpu_start:.1f} s CPU, "
                  f"this process's peak so far {int8_process.peak_gib():.2f} GiB")


class _Timer:
    def __init__(self):
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.seconds = 0.0


def _formats(cfg: ExportConfig) -> list[Format]:
    unknown = [f for f in cfg.formats if f not in FORMATS]
    if unknown:
        raise XrayEdgeError(f"unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
    if not cfg.formats:
        raise XrayEdgeError(f"no format given; choose from {', '.join(FORMATS)}")
    if not cfg.model.is_file():
        raise XrayEdgeError(f"{cfg.model}: model not found; train one first (make train)")
    return [FORMATS[f] for f in dict.fromkeys(cfg.formats)]


def _load_keras(path: Path, lean: bool = False):
    """`lean` while int8 is made aside: one thread per TensorFlow operation (a core for each
    process) and no oneDNN (less memory for two processes)."""
    from xray_edge.export.tflite import start_tensorflow

    if lean:
        start_tensorflow(threads=1, onednn=False)
    else:
        start_tensorflow()
    import keras

    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - zip, h5, deserialization errors
        raise XrayEdgeError(f"{path}: cannot load Keras model ({first_line(exc)})") from None


def _describe(cfg: ExportConfig, model, record: TrainingRecord | None, meta: dict,
              spec: Preprocessing, known: dict) -> _Source:
    classes = record.classes if record else meta.get("classes")
    if not classes:
        raise XrayEdgeError(f"{cfg.model}: no class names (no training.json beside it)")
    synthetic = record.synthetic if record else bool(meta.get("synthetic", False))
    binary = int(model.outputs[0].shape[-1]) == 1
    if cfg.threshold is not None:
        threshold, point = cfg.threshold, {"threshold": cfg.threshold, "chosen_on": "given by the user"}
    elif binary:
        threshold, point = choose_threshold(model, record, spec, cfg.target_sensitivity, known)
    else:
        threshold, point = None, {"threshold": None, "chosen_on": "softmax: highest probability"}
    info = ModelInfo(tuple(classes), threshold if binary else None, spec, synthetic_data=synthetic)
    return _Source(record, info, point, sha256_file(cfg.model), binary)


def _images(sets: calibration.ImageSets, spec: Preprocessing, need_calibration: bool, log):
    cal = (load_images(sets.calibration, spec)[0] if need_calibration
           else np.zeros((0, *spec.shape), np.uint8))
    par, ok, errors = load_images(sets.parity, spec)
    for e in errors:
        log(f"warning: skipped {e}")
    return cal, ([sets.parity[i] for i in ok], par)


def _embedded(src: _Source, fmt: Format) -> dict:
    """The metadata written inside a file, so that the file alone is enough on a device."""
    info = replace(src.info, format=fmt.name)
    return {**info.to_dict(), "source_model_sha256": src.sha256, "xray_edge_version": __version__}


def _file_entry(fmt: Format, path: Path, backend, res: parity.ParityResult) -> FileEntry:
    return FileEntry(
        format=fmt.name, description=fmt.description, size=path.stat().st_size,
        sha256=sha256_file(path), runtime=f"{backend.name} {backend.version}",
        input={"name": backend.input_name, "dtype": str(backend.input_dtype),
               "shape": [d if isinstance(d, int) else None for d in backend.input_shape],
               "quantization": list(getattr(backend, "input_quant", ()) or []) or None},
        output={"name": backend.output_name,
                "quantization": list(getattr(backend, "output_quant", ()) or []) or None},
        parity=res.to_dict(),
    )


def _manifest(cfg: ExportConfig, src: _Source, files: dict[str, FileEntry],
              results: list[parity.ParityResult], n_cal: int, n_par: int, image_source: str) -> Manifest:
    info, record = src.info, src.record
    return Manifest(
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        xray_edge_version=__version__,
        labels=info.labels,
        output=_output_meaning(info, src.sigmoid),
        threshold=info.threshold,
        operating_point=src.operating_point,
        positive_class=record.positive_class if record else None,
        preprocessing=info.preprocessing,
        default=next((FORMATS[f].file for f in DEFAULT_FILE_ORDER if FORMATS[f].file in files), None),
        files=files,
        rejected={r.format: r.to_dict() for r in results if not r.passed},
        source_model={"file": cfg.model.name, "sha256": src.sha256},
        training={"synthetic": info.synthetic_data, "data": record.data if record else None,
                  "classes": list(info.labels), "counts": record.counts if record else None},
        calibration={"images": n_cal, "source": image_source, "seed": cfg.seed},
        parity_set={"images": n_par, "disjoint_from_calibration": True},
        gates=vars(cfg.gates),
        versions=_versions(),
    )


def _output_meaning(info: ModelInfo, sigmoid: bool) -> dict:
    if sigmoid:
        return {"kind": "sigmoid", "units": 1,
                "meaning": f"probability of {info.labels[1]!r} (index 1); "
                           f"{info.labels[1]!r} when p >= threshold, else {info.labels[0]!r}"}
    return {"kind": "softmax", "units": len(info.labels), "meaning": "probability per label, in order"}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("tensorflow", "tensorflow-cpu", "keras", "onnx", "onnxruntime", "ai-edge-litert", "numpy", "pillow"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
