"""The `xray-edge` command line: parses, calls the library, prints. Nothing else lives here.

Heavy packages load only inside the commands that need them: `classify`, `info` and `bench`
import neither TensorFlow nor Keras; `train` and `export` import them when they run.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from xray_edge import __version__
from xray_edge.errors import ImageError, XrayEdgeError

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


class ToolError(click.ClickException):
    """A model or configuration error: one line on stderr, exit 2 (usage/model errors)."""

    exit_code = EXIT_USAGE


@contextmanager
def tool_errors():
    """The one place where the tool's own errors become a one-line message and exit 2."""
    try:
        yield
    except XrayEdgeError as exc:
        raise ToolError(str(exc)) from None


def _probability(ctx, param, value):
    """A probability in [0, 1]; click's FloatRange lets NaN through."""
    if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
        raise click.BadParameter(f"{value} is not a probability between 0 and 1")
    return value


backend_option = click.option(
    "--backend", type=click.Choice(["auto", "litert", "tflite", "onnxruntime"]), default="auto",
    show_default=True, help="Runtime; auto picks by file type and what is installed.")
threads_option = click.option(
    "--threads", type=click.IntRange(1), default=None,
    help="Interpreter threads. Default: all cores (measured gains: docs/edge.md).")


def gate_options(fn):
    """--accept-modality/-body-part/-view: widen the input gate on purpose (xray-edge info shows it)."""
    for name, what in (("view", "ViewPosition"), ("body-part", "BodyPartExamined"), ("modality", "Modality")):
        fn = click.option(f"--accept-{name}", f"accept_{name.replace('-', '_')}", multiple=True,
                          metavar="NAME", help=f"Also accept DICOM files of this {what} (repeatable); "
                          "by default only chest radiographs get a label.")(fn)
    return fn


def _gate_rules(loaded, accept_modality=(), accept_body_part=(), accept_view=()):
    """The model's input gate, widened by the --accept-* options, with a warning when it is."""
    from xray_edge.gate import rules_for

    rules = rules_for(loaded)
    wider = [f"{what} {v.upper()}" for what, vs in (("Modality", accept_modality),
             ("BodyPartExamined", accept_body_part), ("ViewPosition", accept_view)) for v in vs]
    if wider:
        click.secho(f"warning: input gate widened on request: also accepting {', '.join(wider)}",
                    fg="yellow", err=True)
    return rules.accepting(accept_modality, accept_body_part, accept_view)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="xray-edge")
def main() -> None:
    """Chest X-ray classifier from training to a Raspberry Pi.

    \b
    Typical flow:
      xray-edge train --data DATA        # DATA/train/<class>/*  -> artifacts/model.keras
      xray-edge export                   # -> .tflite (float32, int8), .onnx, manifest.json
      xray-edge classify scan.jpg        # on the device: no TensorFlow needed
      xray-edge calibrate --data SITE    # this site's threshold, in site.json
      xray-edge explain scan.jpg         # where the model looks: a heat map PNG

    Not a medical device: a research and engineering tool.
    """


# --------------------------------------------------------------------------- train
@main.command()
@click.option("--data", type=click.Path(path_type=Path), multiple=True,
              help="A data source: ROOT/train/<class>/* (and optionally ROOT/test/<class>/*) or ROOT/<class>/*; "
                   "repeat for several sources (validation and test are stratified by source and class; "
                   "ROOT/labels.csv with file,patient keeps a patient's films on one side). "
                   "Default: generate the synthetic phantom set in data/phantom.")
@click.option("--classes", default=None,
              help="Comma-separated classes to train, e.g. COVID19,NORMAL; other folders are left out "
                   "and a source may hold only some. Default: every class folder found.")
@click.option("--external", multiple=True, callback=lambda c, p, v: _named_folders(v), metavar="NAME=DIR",
              help="An external set DIR/<class>/* measured after training at the chosen threshold; it "
                   "chooses nothing (repeatable; one class is enough; other folders such as PNEUMONIA "
                   "get the share called and the mean score).")
@click.option("--balance", type=click.Choice(["none", "class", "source-class"]), default="class",
              show_default=True, help="Sample weights: every class the same weight in the loss, or every "
                                      "class and within it every source.")
@click.option("--target-sensitivity", type=click.FloatRange(0, 1, min_open=True), default=0.95,
              show_default=True, help="The operating point: the threshold reaching this sensitivity for the "
                                      "disease class on validation, used by every figure and by export.")
@click.option("--photometric", type=click.FloatRange(0, 0.9), default=None,
              help="Contrast, gamma and noise augmentation strength (0: off). Default: 0.3 with --data, "
                   "0 on the phantoms (the recipe study, docs/training.md).")
@click.option("--border-erase", type=click.FloatRange(0, 1), default=None,
              help="Chance per training image of blanking an outer band where markers sit (0: off). "
                   "Default: 0.5 with --data, 0 on the phantoms.")
@click.option("--degrade", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Chance per training image of a blur, and of a JPEG-like re-compression, as films get "
                   "copied into publications (0: off; measured in docs/training.md).")
@click.option("--intensity", type=click.Choice(["none", "equalize"]), default="none", show_default=True,
              help="Part of the one preprocessing, recorded with the model: 'equalize' spreads each film's "
                   "grey levels by histogram equalisation, on every device too (docs/training.md).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True,
              help="Output folder for model.keras, metrics and plots.")
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Default: 8 with --data (four times the tutorial's updates per epoch; the recipe study), "
                   "32 on the phantoms (the tutorial's).")
@click.option("--learning-rate", type=click.FloatRange(0, min_open=True), default=1e-4, show_default=True,
              help="Adam learning rate. The tutorial used 1e-3, which can collapse to a constant "
                   "output on small real sets (docs/training.md); a collapsed run is refused.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Stratified share of train/ held out for validation (never augmented).")
@click.option("--patience", type=click.IntRange(1), default=20, show_default=True,
              help="Early stopping patience on val_accuracy.")
@click.option("--zoom", type=click.FloatRange(0, 0.9), default=0.2, show_default=True)
@click.option("--no-flip", is_flag=True, help="Disable random horizontal flips.")
@click.option("--seed", type=int, default=1337, show_default=True, help="Same seed, machine and backend: same run.")
@click.option("--positive-class", default=None,
              help="The disease class for sensitivity/ROC. Default: the class not named NORMAL.")
@click.option("--phantom-size", type=click.IntRange(4), default=100, show_default=True,
              help="Training phantoms per class when --data is not given.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Where decoded images are cached. Default: $XDG_CACHE_HOME/xray-edge or ~/.cache/xray-edge.")
@click.option("--backend", type=click.Choice(["auto", "tensorflow", "jax", "torch"]), default="auto",
              show_default=True, help="Keras backend. auto: KERAS_BACKEND if set, else JAX where it can "
                                      "use a visible NVIDIA GPU, else Keras' default (TensorFlow).")
@click.option("--devices", default="1", show_default=True, callback=lambda c, p, v: _devices_option(v),
              help="Train data-parallel on N devices, or 'all' (JAX backend; batch size a multiple of N).")
@click.option("--precision", type=click.Choice(["float32", "mixed_bfloat16"]), default="float32",
              show_default=True, help="mixed_bfloat16 computes in bfloat16 (faster on recent GPUs); "
                                      "variables and the saved model stay float32.")
@click.option("--json", "as_json", is_flag=True, help="Print the test metrics as JSON.")
def train(data, classes, external, balance, target_sensitivity, photometric, border_erase, degrade, intensity, out, epochs,
          batch_size, learning_rate, val_fraction, patience, zoom, no_flip, seed,
          positive_class, phantom_size, cache_dir, backend, devices, precision, as_json):
    """Train the tutorial's CNN on one or more folders of chest X-rays.

    Writes model.keras (best epoch), training.json (sources, splits, the operating point chosen
    on validation), history.json, training.png, samples.png, metrics.json and roc.png to --out.
    metrics.json holds the test split at the operating point, per source under `sources`, and
    each --external set under `external`. Needs the training extra: pip install 'xray-edge[train]'.

    \b
    Example (two sources, two external sets):
      xray-edge train --data covid_set --data hospital_normals --classes COVID19,NORMAL \\
        --external nih=nih-adult --external figure1=figure1-covid
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from xray_edge.train import launch
    from xray_edge.train.dataset import discover, external_sets

    class_list = tuple(c.strip() for c in classes.split(",") if c.strip()) if classes else None
    knobs = launch.recipe(bool(data), photometric=photometric, border_erase=border_erase, batch_size=batch_size)
    with tool_errors():
        if not data:
            data = (launch.default_phantoms(phantom_size),)
            click.echo(f"no --data: using synthetic phantoms in {data[0]}", err=True)
        # a bad dataset fails here, in a second, before Keras is even imported
        discover(list(data), list(class_list) if class_list else None)
        external_sets(external)
        from xray_edge.train.outputs import check_out

        check_out(out)  # so does an --out that cannot take the files (not after training)
    # nvidia-smi is asked once per run, for a few seconds at most: make train hands on its answer
    answer = launch.gpu_answer(os.environ.get("XRAY_EDGE_SMI_ANSWER"))
    if answer.problem:
        _log_line(f"warning: {answer.problem}; training without a GPU")
    gpus = list(answer.gpus)
    chosen = launch.keras_backend(None if backend == "auto" else backend, os.environ.get("KERAS_BACKEND"), gpus)
    if chosen:
        os.environ["KERAS_BACKEND"] = chosen  # read once, when Keras is first imported (next line)
    try:
        from xray_edge.preprocess import Preprocessing
        from xray_edge.train.trainer import TrainConfig
        from xray_edge.train.trainer import train as run_train
    except ImportError as exc:
        raise ToolError(f"training needs the extra: pip install 'xray-edge[train]' ({exc.name} missing)") from None
    with tool_errors():
        cfg = TrainConfig(data=data if len(data) > 1 else data[0], classes=class_list, external=external,
                          balance=balance, target_sensitivity=target_sensitivity,
                          photometric=knobs["photometric"], border=knobs["border_erase"], degrade=degrade,
                          preprocessing=Preprocessing(intensity=intensity),
                          out=out, epochs=epochs, batch_size=knobs["batch_size"],
                          learning_rate=learning_rate, val_fraction=val_fraction, patience=patience,
                          zoom=zoom, flip=not no_flip, seed=seed, positive_class=positive_class,
                          cache_dir=cache_dir or _default_cache_dir(), precision=precision,
                          devices=devices, visible_gpus=tuple(gpus),
                          # Keras redraws its bar many times a step: one line per epoch in logs
                          verbose=1 if sys.stderr.isatty() else 2)
        with contextlib.redirect_stdout(sys.stderr):  # Keras' progress: stdout is for results
            result = run_train(cfg, log=_log_line, progress=_ProgressBars())
    m = result.metrics
    if as_json:
        from xray_edge.files import dumps

        click.echo(dumps(m, indent=2))  # an undefined figure (one class in the test split) is null
        return
    rec = result.record
    click.echo(f"\nsaved {result.model_path} (best epoch {rec.best_epoch} of {rec.epochs_run}; "
               f"{rec.seconds['total']:.0f} s)")
    op = m.get("operating_point") or {}
    if op.get("threshold") is not None:
        click.echo(f"operating point: P({m['classes'][1]}) >= {op['threshold']:.4f} ({op['chosen_on']}, "
                   f"{op.get('positives', '?')} {m['positive_class']}; target sensitivity "
                   f"{op.get('target_sensitivity')})")
    click.echo(f"test split ({m['source']}): {_test_line(m)}")
    if len(m.get("sources", {})) > 1:
        for name, s in m["sources"].items():
            click.echo(f"  source {name}: {_test_line(s)}")
    for name, e in m.get("external", {}).items():
        click.echo(f"external {name}: {_external_line(e)}")
    if rec.synthetic:
        click.secho("SYNTHETIC DATA: these figures say the pipeline works, nothing about X-rays.",
                    fg="yellow", err=True)


def _defined(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _test_line(m: dict) -> str:
    """n, accuracy and, for two classes, ROC AUC, sensitivity, specificity at the operating point."""
    line = f"n={m['n']} accuracy={m['accuracy']:.3f}"
    if _defined(m.get("roc_auc")):  # not for a split with one class
        line += (f" ROC AUC={m['roc_auc']:.3f} sensitivity={m['sensitivity']['value']:.3f} "
                 f"specificity={m['specificity']['value']:.3f} at threshold {m['threshold']:.4f}")
    return line


def _external_line(e: dict) -> str:
    parts = []
    for name, f in e["folders"].items():
        called = ", ".join(f"{v:.0%} {c}" for c, v in f["called"].items())
        auc = [f"ROC AUC vs {k[len('roc_auc_vs_'):]} {v:.3f}" for k, v in f.items() if k.startswith("roc_auc_vs_")]
        parts.append(f"{name} {f['n']}: called {called}" + (f" ({auc[0]})" if auc else ""))
    if "roc_auc" in e:
        parts.append(f"ROC AUC {e['roc_auc']:.3f}")
    return "; ".join(parts)


def _named_folders(values) -> tuple:
    """NAME=DIR pairs of --external."""
    out = []
    for v in values:
        name, sep, folder = v.partition("=")
        if not sep or not name or not folder:
            raise click.BadParameter(f"{v!r}: expected NAME=DIR, e.g. nih=../shared/data/nih-adult")
        out.append((name, Path(folder)))
    return tuple(out)


def _devices_option(value: str):
    if value == "all":
        return value
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise click.BadParameter(f"{value!r}: a number of devices (1, 2, ...) or 'all'")
    return n


def _log_line(line: str) -> None:
    warn = line.startswith(("warning", "***"))
    click.secho(line, err=True, fg="yellow" if warn else None)


class _ProgressBars:
    """Draws the library's progress(label, done, total) calls as click progress bars on stderr."""

    def __init__(self):
        self.bar, self.label, self.done = None, None, 0

    def __call__(self, label: str, done: int, total: int) -> None:
        if label != self.label:
            self._close()
            if done >= total:
                return
            self.bar = click.progressbar(length=total, label=label, file=sys.stderr)
            self.bar.__enter__()
            self.label, self.done = label, 0
        self.bar.update(done - self.done)
        self.done = done
        if done >= total:
            self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
        self.bar, self.label = None, None


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xray-edge"


# --------------------------------------------------------------------------- export
@main.command()
@click.option("--model", type=click.Path(path_type=Path), default=Path("artifacts/model.keras"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder. Default: the model's folder.")
@click.option("--formats", default="float32,int8,onnx", show_default=True,
              help="Comma-separated: float32, int8, onnx (the default three), float16, onnx-int8.")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Images for calibration and parity when the model has no training.json beside it.")
@click.option("--calibration-size", type=click.IntRange(1), default=100, show_default=True,
              help="Training images (drawn reproducibly) that calibrate the int8 ranges.")
@click.option("--parity-size", type=click.IntRange(1), default=200, show_default=True,
              help="Held-out images on which every format is compared with Keras.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None,
              help="Decision threshold on P(labels[1]) to record in the manifest. "
                   "Default: chosen on the validation split for --target-sensitivity.")
@click.option("--target-sensitivity", type=click.FloatRange(0, 1, min_open=True), default=0.95, show_default=True,
              help="Sensitivity for the disease class that the chosen threshold must reach on validation.")
@click.option("--float-atol", type=float, default=None, help="Gate: max |Δp| for float formats (default 1e-4).")
@click.option("--int8-atol", type=float, default=None, help="Gate: max |Δp| for int8 (default 0.05).")
@click.option("--int8-max-flips", type=float, default=None,
              help="Gate: share of parity images whose decision may flip in int8 (default 0.01).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export(model, out, formats, data, calibration_size, parity_size, threshold, target_sensitivity,
           float_atol, int8_atol, int8_max_flips, as_json):
    """Convert model.keras to TFLite float32, TFLite int8 and ONNX, each proven against Keras.

    The model is checked first (every requested format must be able to translate it); each file
    is then converted into a staging folder, loaded back in its edge runtime and compared with
    Keras on held-out real images. Only when every file passes is the set moved into place,
    manifest last; otherwise the output folder is left as it was and the command exits 1.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Found, not imported: TensorFlow starts inside the export.
    needs = ("keras", "tensorflow", "onnx") + (("litert_quantizer",) if "int8" in formats.split(",") else ())
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        raise ToolError(f"export needs the extra: pip install 'xray-edge[export]' ({', '.join(missing)} missing)")
    from xray_edge.export import parity
    from xray_edge.export.pipeline import ExportConfig, ExportFailed, run_export

    g = parity.Gates()
    gates = parity.Gates(
        float_max_abs_diff=float_atol if float_atol is not None else g.float_max_abs_diff,
        int8_max_abs_diff=int8_atol if int8_atol is not None else g.int8_max_abs_diff,
        int8_max_flip_rate=int8_max_flips if int8_max_flips is not None else g.int8_max_flip_rate)
    cfg = ExportConfig(model=model, out=out or model.parent,
                       formats=tuple(f.strip() for f in formats.split(",") if f.strip()), data=data,
                       calibration_size=calibration_size, parity_size=parity_size,
                       threshold=threshold, target_sensitivity=target_sensitivity, gates=gates)
    with tool_errors():  # bad configuration: exit 2; a failed step or gate: exit 1, below
        try:
            result = run_export(cfg, log=lambda s: click.echo(s, err=as_json))
        except ExportFailed as exc:
            state = ("its model files may not match its manifest (the runner refuses those): export again"
                     if exc.partial else "was left as it was")
            click.echo(f"error: export failed at {exc}; {cfg.out} {state}", err=True)
            sys.exit(EXIT_SOME_FAILED)
    if as_json:
        from xray_edge.files import dumps

        click.echo(dumps(result.manifest.to_dict(), indent=2))
    elif result.passed:
        click.echo(format_files_table(result.manifest))
        click.echo(f"manifest: {cfg.out / 'manifest.json'}  ({result.timings['total']:.1f} s)")
    if not result.passed:
        click.echo(f"error: parity gate {result.remedy}; nothing was written, {cfg.out} was left as it was",
                   err=True)
        sys.exit(EXIT_SOME_FAILED)


def format_files_table(manifest) -> str:
    rows = [("file", "format", "size", "runtime", "max|Δp|", "flips")]
    for name, e in manifest.files.items():
        p = e.parity or {}
        rows.append((name, e.format, f"{e.size / 1e6:.1f} MB", e.runtime,
                     f"{p['max_abs_diff']:.1e}", f"{p['decision_flips']}/{p['images']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# --------------------------------------------------------------------------- report
@main.command()
@click.option("--artifacts", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=Path("artifacts"), show_default=True, help="Folder with manifest.json and model.keras.")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Test images as DATA/<class>/* or DATA/test/<class>/*. Default: the training's test split.")
@click.option("--saliency-images", type=click.IntRange(0), default=4, show_default=True,
              help="Test images per class on the saliency page (Grad-CAM and occlusion); 0 skips it.")
@click.option("--external", multiple=True, callback=lambda c, p, v: _named_folders(v), metavar="NAME=DIR",
              help="An external set DIR/<class>/* run through every format at the manifest's threshold "
                   "(repeatable; folders that are no model class get the share called and the mean score).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json instead of the table.")
def report(artifacts, data, saliency_images, external, as_json):
    """Measure every exported format on the same test images; write report.md, report.json, plots.

    One row per format, Keras first: size, load time, batch-of-one latency, max |Δp| and flips vs
    Keras, accuracy, ROC AUC, sensitivity and specificity with 95% Wilson intervals, at the
    manifest's operating point and at 0.5; then the test split per data source and each --external
    set at the manifest's operating point, for every format through its edge runtime.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from xray_edge.export.report import render
    from xray_edge.export.report.build import build_report

    with tool_errors():
        rep = build_report(artifacts, data, saliency_per_class=saliency_images, external=external)
    render.write(rep, artifacts)
    if as_json:
        from xray_edge.files import dumps

        click.echo(dumps(rep, indent=2))  # an undefined figure (a one-class set) is null
        return
    click.echo(render.table(rep))
    click.echo(f"\nwrote {artifacts / 'report.md'}, report.json and report_*.png")


# --------------------------------------------------------------------------- classify
_MODEL_HELP = ("An artifacts folder with manifest.json (uses its default file, int8 TFLite) "
               "or a single .tflite / .onnx file.")


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", "-m", default="artifacts", show_default=True, help=_MODEL_HELP)
@click.option("--file", "file_name", default=None,
              help="Which file of the artifacts folder, e.g. xray_float32.tflite or xray.onnx.")
@backend_option
@click.option("--threshold", type=float, default=None, callback=_probability,
              help="Override the operating point (P(labels[1]) >= threshold). Default: site.json "
                   "beside the model when it was made for this file (xray-edge calibrate), else the manifest's.")
@threads_option
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per line, for every input: results and {path, error} records.")
@click.option("-0", "--null", "nul", is_flag=True, help="Paths on stdin end with NUL (find -print0).")
@gate_options
def classify(inputs, model, file_name, backend, threshold, threads, as_json, nul,
             accept_modality, accept_body_part, accept_view):
    """Classify images: files, folders (recursive), globs, or - to read paths from stdin.

    \b
    Prints one line per image:  PATH<TAB>LABEL<TAB>PROBABILITY
    Errors go to stderr, one line per input (and as {"path", "error"} records with --json).
    Only chest radiographs get a label: other inputs are refused with the rule they break
    ("refused: PATH: not a chest radiograph: Modality MR"; {"status": "refused"} with --json).
    Exit codes: 0 all classified, 1 some inputs failed or were refused (the rest printed),
    2 usage/model error.

    \b
    Examples:
      xray-edge classify scan.jpg
      xray-edge classify --model artifacts/xray.onnx scans/ --json
      find /pacs -name '*.dcm' -print0 | xray-edge classify -0 -
    """
    # numpy's OpenBLAS starts a thread per core at import; classify does no linear algebra, and
    # one thread saves about a quarter of a cold start's CPU (farm-bench, docs/edge.md). A value
    # the user set is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    # The imports and the model load below make objects that live until exit: collecting
    # garbage among them cost about a tenth of a cold start (perf). Off until they are made,
    # then frozen (never traversed again, at exit neither) and on for the images.
    gc.disable()
    try:
        from xray_edge.gate import NotChestRadiograph
        from xray_edge.inputs import expand_inputs, read_paths
        from xray_edge.output import Printer

        with tool_errors():
            # mapped: a one-shot process need not copy the model into memory (model.open_model)
            clf, loaded, threshold_source = _open_classifier(model, file_name, backend, threads, threshold,
                                                             mapped=True)
            clf.rules = _gate_rules(loaded, accept_modality, accept_body_part, accept_view)
    finally:
        gc.freeze()
        gc.enable()
    if clf.info.synthetic_data:
        click.secho("warning: this model was trained on SYNTHETIC phantom data, not X-rays", fg="yellow", err=True)
    stdin = read_paths(click.get_binary_stream("stdin"), nul) if "-" in inputs else ()
    items = expand_inputs(inputs, stdin)
    out = Printer(as_json, progress=_wants_progress(inputs))
    if out.progress:
        items = list(items)  # the bar needs the count
        out.start(len(items))
    failed = 0
    with out:
        for item in clf.classify_paths(items, workers=min(4, os.cpu_count() or 1)):
            if isinstance(item, NotChestRadiograph):
                failed += 1
                out.refused(item.path, item.reason, item.rule)
            elif isinstance(item, ImageError):
                failed += 1
                out.error(item.path, item.reason)
            else:
                out.result(item, {"threshold": clf.threshold, "threshold_source": threshold_source,
                                  "model": os.fsdecode(loaded.path),
                                  "sha256": loaded.sha256, "backend": clf.backend.name})
    sys.exit(EXIT_SOME_FAILED if failed else EXIT_OK)


def _wants_progress(inputs) -> bool:
    """A bar for folders, on a terminal only: never in pipes or logs."""
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
    return tty and any(os.path.isdir(i) for i in inputs if i != "-")


def _open_classifier(model, file_name, backend, threads, threshold, mapped=False):
    from xray_edge.classify import Classifier
    from xray_edge.model import open_model
    from xray_edge.site import resolve_threshold

    loaded = open_model(model, file_name, backend, threads or os.cpu_count(), mapped=mapped)
    threshold, source = resolve_threshold(loaded.path, loaded.sha256, loaded.info.threshold,
                                          "manifest" if loaded.resolved.manifest else "model file", threshold)
    return Classifier(loaded.backend, loaded.info, threshold), loaded, source


# --------------------------------------------------------------------------- info
@main.command()
@click.argument("model", default="artifacts")
@click.option("--file", "file_name", default=None, help="Which file of an artifacts folder.")
@backend_option
@click.option("--json", "as_json", is_flag=True)
def info(model, file_name, backend, as_json):
    """Show a model's labels, input, quantization, size, sha256 and recorded parity."""
    from xray_edge.info import describe

    with tool_errors():
        d = describe(model, file_name, backend)
    if not as_json:  # the gate's rules as a sentence; --json gives them as data
        from xray_edge.gate import GateRules, summary

        gate = d["input_gate"]
        d["input_gate"] = f"({gate['source']}) " + summary(GateRules.from_dict(
            {k: v for k, v in gate.items() if k != "source"}))
    _print_fields(d, as_json)


# --------------------------------------------------------------------------- bench
@main.command()
@click.argument("model", default="artifacts")
@click.option("--file", "file_name", default=None, help="Which file of an artifacts folder.")
@backend_option
@click.option("--runs", type=click.IntRange(1), default=100, show_default=True)
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Image to decode in the images/s figure. Default: a generated 1024x1024 JPEG.")
@threads_option
@click.option("--json", "as_json", is_flag=True)
def bench(model, file_name, backend, runs, image, threads, as_json):
    """Time a model on this machine: load, first invoke, batch-of-one latency, images/s, memory."""
    from xray_edge.bench import run_bench

    with tool_errors():
        d = run_bench(model, file_name, backend, runs, image, threads or os.cpu_count())
    _print_fields(d, as_json)


def _print_fields(d: dict, as_json: bool) -> None:
    """One `name  value` line per field, or the dict as JSON."""
    if as_json:
        from xray_edge.files import dumps

        click.echo(dumps(d, indent=2))
        return
    width = max(map(len, d)) + 2
    for k, v in d.items():
        click.echo(f"{k:<{width}}{json.dumps(v) if isinstance(v, (dict, list)) else v}")


# --------------------------------------------------------------------------- calibrate
@main.command()
@click.option("--model", "-m", default="artifacts", show_default=True, help=_MODEL_HELP)
@click.option("--file", "file_name", default=None, help="Which file of the artifacts folder to calibrate.")
@backend_option
@click.option("--data", "site_dir", type=click.Path(path_type=Path), required=True,
              help="This site's labelled images: DATA/<class>/* with the model's class names.")
@click.option("--target-sensitivity", type=click.FloatRange(0, 1, min_open=True), default=0.95,
              show_default=True, help="Sensitivity for the disease class that the threshold must reach here.")
@click.option("--max-ci-width", type=click.FloatRange(0, 1), default=None,
              help="Warn when a 95% interval at the new threshold is wider than this (default 0.25).")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print site.json's content.")
@gate_options
def calibrate(model, file_name, backend, site_dir, target_sensitivity, max_ci_width, threads, as_json,
              accept_modality, accept_body_part, accept_view):
    """Choose this site's threshold on its own labelled images; write site.json beside the model.

    Classifies DATA/<class>/* with the model file classify would use, chooses the threshold with
    export's rule (the target sensitivity for the disease class) and prints sensitivity and
    specificity, with 95% Wilson intervals, at the previous and the new threshold. classify then
    uses site.json for this file (and refuses it for any other); the model files and manifest.json
    are not changed.
    """
    from xray_edge import site
    from xray_edge.files import check_writable
    from xray_edge.model import open_model

    with tool_errors():
        loaded = open_model(model, file_name, backend, threads or os.cpu_count())
        rules = _gate_rules(loaded, accept_modality, accept_body_part, accept_view)
        check_writable(loaded.path.parent / site.SITE_NAME)  # before the site's images are read
        rec, errors = site.calibrate_model(loaded, site_dir, target_sensitivity, rules)
        path = rec.write(loaded.path.parent)
    for e in errors:
        # the gate's refusals are decisions, not broken files
        click.echo(f"{'refused' if ': not a chest radiograph: ' in e else 'error'}: {e} (skipped)", err=True)
    if rec.ignored:
        click.echo(f"warning: ignored folders of {site_dir} (no class of the model): "
                   f"{', '.join(rec.ignored)}; the classes are {', '.join(loaded.info.labels)}", err=True)
    if as_json:
        from xray_edge.files import dumps

        click.echo(dumps(rec.to_dict(), indent=2))
    else:
        click.echo(site.summary(rec))
        click.echo(f"wrote {path} (for {rec.model_file}, sha256 {rec.model_sha256[:12]}...)")
    width = site.DEFAULT_MAX_CI_WIDTH if max_ci_width is None else max_ci_width
    for w in site.wide_intervals(rec.figures, width):
        click.echo(f"warning: wide 95% interval at the site threshold: {w} (wider than {width}); "
                   "more images per class narrow it", err=True)
    sys.exit(EXIT_SOME_FAILED if errors else EXIT_OK)

# --------------------------------------------------------------------------- explain
@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for one NAME.explain.png per image.")
@click.option("--model", "-m", default="artifacts", show_default=True, help=_MODEL_HELP)
@click.option("--file", "file_name", default=None, help="Which file of the artifacts folder.")
@backend_option
@click.option("--threshold", type=float, default=None, callback=_probability,
              help="As in classify: default site.json for this file, else the manifest's.")
@click.option("--grid", type=click.IntRange(2, 50), default=8, show_default=True,
              help="Occlusion positions per side (grid x grid + 1 invokes per image).")
@click.option("--patch", type=click.IntRange(1), default=50, show_default=True,
              help="Side of the occluding square, in model-input pixels (200 x 200).")
@click.option("--size", "max_side", type=click.IntRange(64, 1024), default=512, show_default=True,
              help="Longest side of the PNG's picture, in pixels (the original's aspect is kept).")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image with the grid of scores.")
@gate_options
def explain(inputs, out_dir, model, file_name, backend, threshold, grid, patch, max_side, threads, as_json,
            accept_modality, accept_body_part, accept_view):
    """Where the model looks: an occlusion heat map over each X-ray, as a PNG.

    Each patch of the model's input is covered in turn with the image's mean grey and the image
    classified again (batch of one, the runtime classify uses, any format); bright regions are
    those whose loss lowers the probability of the label given. The picture keeps the original
    file's aspect; the caption gives label, probability and the frame share (see README).
    Exit codes as classify.
    """
    from xray_edge import explain as ex
    from xray_edge.inputs import expand_inputs, read_paths
    from xray_edge.gate import NotChestRadiograph, loader
    from xray_edge.output import Printer

    with tool_errors():
        clf, loaded, _ = _open_classifier(model, file_name, backend, threads, threshold)
        rules = _gate_rules(loaded, accept_modality, accept_body_part, accept_view)
        ex.check_out_dir(out_dir)  # a file in the way or a read-only folder: before any work
    stdin = read_paths(click.get_binary_stream("stdin")) if "-" in inputs else ()
    done = ex.explain_paths(expand_inputs(inputs, stdin), clf.backend.predict, clf.info, clf.threshold,
                            out_dir, ex.Occlusion(grid=grid, patch=patch), max_side,
                            load=loader(rules))
    extra = {"model": os.fsdecode(loaded.path), "threshold": clf.threshold}
    out = Printer(as_json)
    with out:
        for item in done:
            if isinstance(item, ImageError):
                if isinstance(item, NotChestRadiograph):
                    out.refused(item.path, item.reason, item.rule)
                else:
                    out.error(item.path, item.reason)
            else:
                r = item.explanation
                out.record(f"{item.path}\t{r.label}\t{r.probability:.3f}\t{item.png}", {**item.to_dict(), **extra})
    sys.exit(EXIT_SOME_FAILED if out.failed else EXIT_OK)


# --------------------------------------------------------------------------- serve / status
def _size(ctx, param, value):
    """'500M', '2G', '1000000' -> bytes."""
    if value is None:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = value.strip().upper().rstrip("B")
    mult = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        size = int(float(number) * mult)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a size (e.g. 500M, 2G)") from None
    if size <= 0:
        raise click.BadParameter(f"{value!r} is not a positive size")
    return size


def _destination(ctx, param, value):
    from xray_edge.serve.report_sr import parse_destination

    try:
        return parse_destination(value) if value else None
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@main.command()
@click.option("--model", "-m", default="artifacts", show_default=True, help=_MODEL_HELP)
@click.option("--file", "file_name", default=None, help="Which file of the artifacts folder.")
@backend_option
@threads_option
@click.option("--spool", "spool_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for received films, results.jsonl, quarantine/ and outbox/ (the only place written).")
@click.option("--watch", "watch_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Take each complete file a viewer writes into this folder (originals are not changed).")
@click.option("--watch-settle", type=click.FloatRange(0), default=2.0, show_default=True,
              help="Seconds a watched file must stay unchanged before it is taken.")
@click.option("--dicom-port", type=click.IntRange(1, 65535), default=None, help="Listen for DICOM C-STORE/C-ECHO on this port.")
@click.option("--ae-title", default="XRAY_EDGE", show_default=True, help="Our AE title.")
@click.option("--allow-ae", default="", help="Comma-separated calling AE titles allowed (default: any).")
@click.option("--bind", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--forward", default=None, callback=_destination,
              help="Send each DICOM report (Basic Text SR) to AE@host:port too.")
@click.option("--max-spool", default=None, callback=_size,
              help="Refuse new films (DICOM status 0xA700) once waiting films take this much (e.g. 2G).")
@click.option("--log-phi", is_flag=True, help="Write patient name, ID and birth date into results.jsonl.")
@click.option("--threshold", type=float, default=None, callback=_probability,
              help="Override the operating point (default: site.json, else the manifest's).")
@click.option("--exit-when-idle", is_flag=True, help="Classify what the spool holds, then exit (no receivers needed).")
@gate_options
def serve(model, file_name, backend, threads, spool_dir, watch_dir, watch_settle, dicom_port, ae_title, allow_ae, bind,
          forward, max_spool, log_phi, threshold, exit_when_idle, accept_modality, accept_body_part, accept_view):
    """Run unattended: receive films, classify each, write results, reports and drift warnings.

    \b
    Films arrive by DICOM (--dicom-port) and/or a folder (--watch); each is made durable in
    --spool before it is acknowledged, classified like `classify` (same model, manifest and
    site.json), and gets one line in SPOOL/results.jsonl. Unreadable films go to SPOOL/quarantine/
    with a reason; DICOM films get a Basic Text SR in SPOOL/outbox/. SIGTERM finishes the current
    film and exits 0; after a crash, films without a result are classified on restart, once.

    \b
    Examples:
      xray-edge serve --model artifacts --spool /var/lib/xray-edge --dicom-port 11112
      xray-edge serve --model artifacts --spool spool --watch /srv/viewer-export
      xray-edge status --spool /var/lib/xray-edge
    """
    from xray_edge.serve.receive import ScpConfig
    from xray_edge.serve.service import Receivers, serve as run_service
    from xray_edge.serve.worker import ServeConfig

    if dicom_port is None and watch_dir is None and not exit_when_idle:
        raise click.UsageError("give --dicom-port N and/or --watch DIR (or --exit-when-idle)")
    if (dicom_port is not None or forward) and importlib.util.find_spec("pynetdicom") is None:
        raise ToolError("DICOM networking needs the extra: pip install 'xray-edge[serve]'")
    if not 0 < len(ae_title.strip()) <= 16:
        raise click.BadParameter("an AE title has 1 to 16 characters", param_hint="--ae-title")
    allowed = tuple(a.strip() for a in allow_ae.split(",") if a.strip())
    with tool_errors():
        clf, loaded, source = _open_classifier(model, file_name, backend, threads, threshold)
        clf.rules = _gate_rules(loaded, accept_modality, accept_body_part, accept_view)  # as classify
    receivers = Receivers(
        dicom=ScpConfig(dicom_port, ae_title.strip(), bind, allowed) if dicom_port is not None else None,
        watch=watch_dir, watch_settle=watch_settle)
    cfg = ServeConfig(our_ae=ae_title.strip(), forward=forward, log_phi=log_phi, stop_when_idle=exit_when_idle,
                      workers=min(2, os.cpu_count() or 1))
    try:
        code = run_service(spool_dir, clf, loaded, source, receivers, cfg, max_spool)
    except OSError as exc:
        raise ToolError(f"{getattr(exc, 'filename', None) or spool_dir}: {exc.strerror or exc}") from None
    sys.exit(code)


@main.command()
@click.option("--spool", "spool_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--json", "as_json", is_flag=True)
def status(spool_dir, as_json):
    """Films received, classified, quarantined, rates per label, last film, drift state of a spool."""
    from xray_edge.serve.status import format_status, spool_status

    s = spool_status(spool_dir)
    click.echo(json.dumps(s, indent=1) if as_json else format_status(s))


if __name__ == "__main__":  # pragma: no cover
    main()
