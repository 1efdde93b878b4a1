"""Where a model becomes files: check it, convert each format, prove each file, publish the set.

The steps, each timed and named in any error:
1. load the Keras model and what training recorded beside it;
2. check that every requested format can be made from it (`model_check`), before converting;
3. load the calibration and parity images, run Keras on the parity images, choose the
   operating point;
4. convert each format into a staging folder (`staging`), then prove each file in the runtime
   the device uses, against Keras on the held-out images;
5. only if every file passed: publish the set, manifest last. Otherwise nothing changes.
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
from xray_edge.gate import rules_for_films
from xray_edge.manifest import FileEntry, Manifest
from xray_edge.metadata import ModelInfo, read_keras_metadata
from xray_edge.preprocess import Preprocessing, load_images
from xray_edge.training_record import TrainingRecord
from xray_edge.export import calibration, parity
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
    remedy: str = ""  # when a file failed its gates: what failed and what to do, one line

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
    input_gate: dict = field(default_factory=dict)  # xray_edge.gate.GateRules, with its reference


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
    with steps("load model"):
        model = _load_keras(cfg.model)
        record = TrainingRecord.read(cfg.model.parent)
        meta = read_keras_metadata(cfg.model)
        spec = record.preprocessing if record else Preprocessing.from_dict(meta.get("preprocessing") or {})
    with steps("check model"):
        check_model(model, spec, [f.name for f in formats], record.classes if record else meta.get("classes"))
        sets = calibration.image_sets(record, cfg.data, cfg.calibration_size, cfg.parity_size, cfg.seed)
    with steps("images and Keras reference"):
        cal_images, (par_paths, par_plain) = _images(sets, spec, any(f.needs_calibration for f in formats), log)
        par_images = (np.stack([spec.adjust(im) for im in par_plain])  # no copy without a step
                      if spec.intensity != "none" and len(par_plain) else par_plain)
        reference = np.asarray(model.predict(par_images, batch_size=16, verbose=0), dtype=np.float32)
        cal = f"calibration: {len(cal_images)} images; " if len(cal_images) else ""
        log(f"{cal}parity: {len(par_images)} held-out images ({sets.source})")
    with steps("operating point"):  # on the validation split, which the parity images mostly are
        src = _describe(cfg, model, record, meta, spec, known=dict(zip(par_paths, reference)))
        log(f"threshold: {_round(src.info.threshold)} ({src.operating_point['chosen_on']})")
        # the input gate, with the statistics of the films the model came from: in the manifest
        # and inside every file, so that a file copied alone flags the same films
        src = replace(src, input_gate=rules_for_films(par_plain))  # as the gate sees them
    source = ModelSource(model, [f.name for f in formats])
    del model  # the source holds it until the last conversion
    proof = functools.partial(_prove, reference=reference, images=par_images, info=src.info,
                              gates=cfg.gates, steps=steps, log=log)

    with steps("open staging folder"):
        stage = Staging(cfg.out, before=cfg.on_step)
    with stage:
        # int8 last: it needs the float32 flatbuffer only, so the Keras model is released first
        for fmt in sorted(formats, key=lambda f: f.name == "int8"):
            with steps(f"convert {fmt.name}"):
                if fmt.name == "int8":
                    source.release(keep_float_tflite=True)
                data = fmt.convert(source, cal_images, _embedded(src, fmt))
                stage.write(fmt.file, cfg.tamper(fmt.name, data) if cfg.tamper else data)
        source.release()  # memory back for the proofs
        proven = [proof(fmt, stage) for fmt in formats]
        seconds = {name[len("convert "):]: t for name, t in steps.timings.items() if name.startswith("convert ")}
        results, files = _results_and_files(formats, proven, seconds)
        manifest = _manifest(cfg, src, files, results, len(cal_images), len(par_images), sets.source)
        manifest = replace(manifest, input_gate=src.input_gate)
        _publish(stage, manifest, results, cfg.out, steps, log)
    steps.timings["total"] = time.perf_counter() - steps.start
    return ExportResult(manifest, results, steps.timings, remedy(results, cfg, len(cal_images), sets.pool))


def remedy(results: list[parity.ParityResult], cfg: ExportConfig, calibrated: int = 0,
           available: int = 0) -> str:
    """What to do about the formats that failed their gates, in one sentence ("" if none did).

    `calibrated`: images that calibrated int8; `available`: training images there were to draw
    from (more are suggested only when there are more)."""
    failed = [r for r in results if not r.passed]
    if not failed:
        return ""
    passed = [f for f in dict.fromkeys(cfg.formats) if f not in {r.format for r in failed}]
    what = "; ".join(f"{r.format} " + (r.error or ", ".join(
        f"{c['gate']} {c['value']:.3g} > {c['limit']:.3g}" for c in r.checks if not c["ok"]) or "no parity images")
        for r in failed)
    hints = []
    if any(FORMATS[r.format].needs_calibration and not r.error for r in failed):
        if calibrated and available and calibrated >= available:
            what += (f" (all {calibrated} training images calibrated it: films this close to the "
                     f"threshold flip however int8 is calibrated, docs/training.md)")
        else:
            hints.append(f"calibrate int8 on more training images (--calibration-size "
                         f"{max(2 * cfg.calibration_size, 200)}; now {cfg.calibration_size})")
    if passed:
        hints.append(f"export the formats that passed (--formats {','.join(passed)})")
    return f"failed: {what}" + (f". Try: {', or '.join(hints)}" if hints else "")


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


def _prove(fmt: Format, stage: Staging, *, reference: np.ndarray,
           images: np.ndarray, info: ModelInfo, gates: parity.Gates, steps: "_Steps", log
           ) -> tuple[parity.ParityResult, FileEntry | None]:
    """Prove one staged file against Keras on the parity images; returns its result and, if it
    passed, its manifest entry."""
    with steps(f"prove {fmt.name}") as t:
        res, backend = parity.prove(fmt.name, fmt.runtime, stage.path(fmt.file), reference,
                                    images, info, fmt.gates, gates)
        log(res.line())
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
                  f"this process's peak so far {_peak_gib():.2f} GiB")


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


def _peak_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _load_keras(path: Path):
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
    par, ok, errors = load_images(sets.parity, spec.geometry)  # before the intensity step: see the gate
    for e in errors:
        log(f"warning: skipped {e}")
    return cal, ([sets.parity[i] for i in ok], par)


def _embedded(src: _Source, fmt: Format) -> dict:
    """The metadata written inside a file, so that the file alone is enough on a device."""
    info = replace(src.info, format=fmt.name)
    return {**info.to_dict(), "source_model_sha256": src.sha256, "xray_edge_version": __version__,
            "input_gate": src.input_gate}


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
