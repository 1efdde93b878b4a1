"""Train the tutorial's CNN on a dataset folder and write the model and its evidence.

Recipe (the tutorial's, except the learning rate): batch 32, Adam, binary cross-entropy, zoom 0.2
+ horizontal flip on training images only, a 20% validation split stratified by source and class
(whole patients) that is never augmented, 30 epochs, early stopping on val_accuracy (patience 20),
best checkpoint kept. Adam 1e-4 because the tutorial's 1e-3 can collapse to a constant output on
small real sets; a collapsed run is detected and never saved as model.keras.

The operating point is chosen once, here, on the validation split, and stored in training.json;
every figure after training is at that threshold. External sets (`external`) are measured after
the model and its threshold are fixed: they choose nothing. Evidence: docs/training.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import keras
import numpy as np

from xray_edge.classify import predicted_classes
from xray_edge.errors import XrayEdgeError
from xray_edge.files import atomic_write_json, sha256_file
from xray_edge.metadata import KERAS_MEMBER
from xray_edge.train.plotting import roc
from xray_edge.training_record import TrainingRecord
from xray_edge.preprocess import DEFAULT, Preprocessing
from xray_edge import metrics
from xray_edge.folders import ClassImages
from xray_edge.train.augment import Degrade, Photometric, ZoomFlip
from xray_edge.train.batches import Batches, predict
from xray_edge.train.cache import Decoded, Progress, decode_to_store
from xray_edge.train.dataset import (Dataset, Split, balance_weights, discover, external_sets,
                                     strata, stratified_split)
from xray_edge.train.device import Devices, Gpu, training_devices, unused_gpu_warning
from xray_edge.train.outputs import COLLAPSED_MODEL, MODEL, TrainOutputs, check_out

# A run is called collapsed when its validation outputs barely move or rank no better than chance.
COLLAPSE_MIN_SPREAD = 0.02  # max - min of validation probabilities
COLLAPSE_AUC_BAND = 0.05  # |AUC - 0.5| below this
PRECISIONS = ("float32", "mixed_bfloat16")

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


class TrainingCollapsed(XrayEdgeError):
    """Training produced a model that predicts (nearly) the same thing for every image."""


@dataclass
class TrainConfig:
    data: Path | tuple[Path, ...]  # one source, or several
    out: Path = Path("artifacts")
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 1e-4
    val_fraction: float = 0.2
    test_fraction: float = 0.2  # held out of train/ only when the dataset has no test/
    patience: int = 20
    zoom: float = 0.2
    flip: bool = True
    seed: int = 1337
    cache_dir: Path | None = None
    workers: int | None = None
    positive_class: str | None = None  # the disease class; default: metrics.positive_index's rule
    classes: tuple[str, ...] | None = None  # None: every class folder found
    external: tuple[tuple[str, Path], ...] = ()  # (name, folder) sets measured after training
    balance: str = "class"  # sample weights: none, class or source-class (dataset.balance_weights)
    target_sensitivity: float = 0.95  # of the operating point, chosen on validation
    photometric: float = 0.0  # strength of contrast/gamma/noise augmentation (0: off)
    border: float = 0.0  # chance of blanking an outer band of the film in training (0: off)
    degrade: float = 0.0  # chance of a blur, and of a JPEG-like re-compression, in training (0: off)
    preprocessing: Preprocessing = DEFAULT
    plots: bool = True
    verbose: int = 1
    # "mixed_bfloat16" computes in bfloat16 with float32 variables; the saved model is float32
    # either way. float32 stays the default until bfloat16 is shown to converge as well on a GPU.
    precision: str = "float32"
    devices: int | str = 1  # or "all": data-parallel over that many devices (JAX backend)
    visible_gpus: tuple[Gpu, ...] = ()  # what nvidia-smi lists (the CLI fills it): warn if unused


class SplitData(NamedTuple):
    images: Decoded  # the split's decoded image store
    labels: np.ndarray  # class index per readable image
    split: Split  # the readable images' paths and labels


@dataclass
class TrainResult:
    model_path: Path
    metrics: dict
    history: dict
    record: TrainingRecord


def positive_index(classes: list[str], requested: str | None) -> int:
    try:
        return metrics.positive_index(classes, requested)
    except ValueError:
        raise XrayEdgeError(f"--positive-class {requested!r} is not one of {classes}") from None


def train(cfg: TrainConfig, log: Log = _stderr, progress: Progress | None = None) -> TrainResult:
    """Run the whole recipe; see the module docstring. Raises TrainingCollapsed, DatasetError.

    Args:
        log: receives one line per message (warnings, the device).
        progress: receives (label, done, total) while images decode.
    """
    t_start = time.perf_counter()
    ds = discover(cfg.data, list(cfg.classes) if cfg.classes else None)
    externals = external_sets(cfg.external)  # a bad folder fails here, before training
    if externals and len(ds.classes) != 2:
        raise XrayEdgeError("--external covers two-class (sigmoid) models")
    check_out(cfg.out)  # a file in the way or a read-only folder: now, not after training
    _announce_dataset(ds, log)
    pos = positive_index(ds.classes, cfg.positive_class)
    with TrainOutputs(cfg.out) as staged, _store_folder(cfg.cache_dir, log) as folder, backend_settings(cfg):
        decoded = _decode_splits(ds, cfg, folder, log, progress)
        t_decoded = time.perf_counter()
        devices = _choose_devices(cfg, log)
        weights = balance_weights(decoded["train"].labels, decoded["train"].split.sources, cfg.balance)
        # all-equal weights (balanced classes) train on the unweighted path, as before
        model, history, best, clock = _train_model(decoded, len(ds.classes), cfg, len(devices.names),
                                                   None if np.all(weights == 1) else weights)
        t_trained = time.perf_counter()
        val = _check_validation(model, decoded["validation"], pos, cfg.batch_size, len(devices.names))
        point = _operating_point(val, decoded["validation"], ds.classes, pos, cfg.target_sensitivity, log)
        te = decoded["test"]
        test_probs = predict(model, te.images.store, te.images.ok, cfg.batch_size, len(devices.names))
        record = _record(ds, cfg, decoded, pos, history, best, val)
        record.operating_point = point
        record.balance = _balance_record(cfg.balance, decoded["train"], weights, ds)
        record.devices = list(devices.names)
        record.precision = cfg.precision
        record.seconds = {"decode": t_decoded - t_start, "train": t_trained - t_decoded, **clock.seconds()}
        # measured last, with the model and its threshold fixed: an external set chooses nothing
        external = {name: _measure_external(model, found, root, cfg, folder, ds.classes, pos,
                                            point["threshold"], len(devices.names), log, progress)
                    for name, root, found in externals}
        metrics_doc, history = _write_evidence(cfg, ds, decoded, record, history, test_probs, pos, external,
                                               staged.dir)
        if val.collapsed:
            _save_collapsed(model, record, staged, val)
        _save_model(model, staged.path(MODEL), record)
        record.model_sha256 = sha256_file(staged.path(MODEL))
        record.seconds["total"] = time.perf_counter() - t_start
        record.seconds["after_training"] = record.seconds["total"] - (t_trained - t_start)
        staged.publish(record)
    return TrainResult(cfg.out / MODEL, metrics_doc, history, record)


class ValidationCheck(NamedTuple):
    roc_auc: float
    spread: float  # max - min of the positive-class probabilities
    collapsed: bool
    probs: np.ndarray  # the validation outputs


def _train_model(decoded: dict[str, SplitData], n_classes: int, cfg: TrainConfig, n_devices: int,
                 weights: np.ndarray | None = None):
    """Build, fit and return (float32 model with the best epoch's weights, history, best, clock)."""
    from xray_edge.train.model import build_model

    keras.utils.set_random_seed(cfg.seed)
    model = build_model(n_classes, cfg.preprocessing)
    history, best, clock = fit_model(model, decoded, cfg, n_devices, weights)
    best.restore()
    return _as_float32(model, n_classes, cfg), history, best, clock


def _check_validation(model, val: SplitData, pos: int, batch_size: int, n_devices: int) -> ValidationCheck:
    """Is the model collapsed? Its validation outputs barely move or rank no better than chance."""
    probs = predict(model, val.images.store, val.images.ok, batch_size, n_devices)
    score = metrics.positive_score(probs, pos)
    spread = float(score.max() - score.min()) if len(score) else 0.0
    auc = metrics.roc_auc(val.labels == pos, score)
    collapsed = spread < COLLAPSE_MIN_SPREAD or (np.isfinite(auc) and abs(auc - 0.5) < COLLAPSE_AUC_BAND)
    return ValidationCheck(auc, spread, bool(collapsed), probs)


def _operating_point(val: ValidationCheck, split: SplitData, classes: list[str], pos: int,
                     target: float, log: Log) -> dict:
    """The threshold every later figure uses: chosen here, once, on the validation split."""
    y_pos = split.labels == pos
    if len(classes) != 2:
        return {"threshold": None, "chosen_on": "softmax: highest probability"}
    if not y_pos.any() or y_pos.all():
        log("warning: the validation split lacks a class; operating point 0.5")
        return {"threshold": 0.5, "chosen_on": "default 0.5 (validation split lacks a class)"}
    point = metrics.operating_point(y_pos, val.probs, pos, target,
                                    f"validation split at training, {len(y_pos)} images")
    point["positive_class"] = classes[pos]
    if "warning" in point:
        log(f"warning: operating point {point['warning']}")
    return point


def _balance_record(mode: str, tr: SplitData, weights: np.ndarray, ds: Dataset) -> dict:
    """The weight each (source, class) got in the loss, as training.json records it."""
    cells = {}
    for s, src in enumerate(ds.sources):
        for i, c in enumerate(ds.classes):
            rows = (tr.split.sources == s) & (tr.labels == i)
            if rows.any():
                cells.setdefault(src.name, {})[c] = {"images": int(rows.sum()), "weight": float(weights[rows][0])}
    return {"mode": mode, "sample_weights": cells}


def _measure_external(model, found: ClassImages, root: Path, cfg: TrainConfig, folder: Path,
                      classes: list[str], pos: int, threshold: float, n_devices: int, log: Log,
                      progress: Progress | None) -> dict:
    d = decode_to_store(found.paths, cfg.preprocessing, folder, cfg.workers,
                        label=f"decoding external {root.name}", progress=progress, log=log)
    for e in d.errors:
        log(f"warning: skipped {e}")
    probs = predict(model, d.store, d.ok, cfg.batch_size, n_devices)
    figures = metrics.set_figures(found.labels[d.ok], found.names, probs, classes, pos, threshold)
    return {"root": str(root.resolve()), "skipped": len(d.errors), **figures}


def _record(ds: Dataset, cfg: TrainConfig, decoded: dict[str, SplitData], pos: int, history: dict,
            best: "BestWeights", val: ValidationCheck) -> TrainingRecord:
    n_classes = len(ds.classes)
    sources = []
    for s, src in enumerate(ds.sources):
        counts = {k: {c: int(((v.split.sources == s) & (v.labels == i)).sum()) for i, c in enumerate(ds.classes)}
                  for k, v in decoded.items()}
        sources.append({**src.describe(ds.classes), "counts": counts})
    return TrainingRecord(
        sources=sources,
        file_sources={k: v.split.sources.tolist() for k, v in decoded.items()},
        data=str(ds.root.resolve()),
        synthetic=ds.synthetic,
        classes=ds.classes,
        positive_class=ds.classes[pos],
        test_source=_test_source(ds, cfg),
        counts={k: dict(zip(ds.classes, np.bincount(v.labels, minlength=n_classes).tolist()))
                for k, v in decoded.items()},
        files={k: [str(p.resolve()) for p in v.split.paths] for k, v in decoded.items()},
        labels={k: v.labels.tolist() for k, v in decoded.items()},  # class index per file above
        config={k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                if k not in ("preprocessing", "data", "out", "cache_dir", "external")},
        preprocessing=cfg.preprocessing,
        backend=keras.backend.backend(),
        keras=keras.__version__,
        machine=platform.machine(),
        best_epoch=best.best_epoch,
        epochs_run=len(history.get("loss", [])),
        validation={"roc_auc": val.roc_auc, "probability_spread": val.spread, "collapsed": val.collapsed},
    )


def _test_source(ds: Dataset, cfg: TrainConfig) -> str:
    parts = ["test/" if s.test is not None else
             f"held out {cfg.test_fraction:.0%} of {'train/' if s.layout == 'train/' else 'the images'} "
             f"(the dataset has no test/)" for s in ds.sources]
    if len(ds.sources) == 1:
        return parts[0]
    return "; ".join(f"{s.name}: {p}" for s, p in zip(ds.sources, parts))


def _write_evidence(cfg: TrainConfig, ds: Dataset, decoded: dict[str, SplitData], record: TrainingRecord,
                    history: dict, test_probs: np.ndarray, pos: int, external: dict,
                    out: Path) -> tuple[dict, dict]:
    """history.json, metrics.json (test split) and the plots into `out` (the staging folder);
    returns (metrics, history) as written.

    Every figure is at the operating point chosen on validation (record.operating_point).
    """
    te = decoded["test"]
    y_te = te.labels
    thr = record.operating_point.get("threshold")
    thr = 0.5 if thr is None else thr
    by_source = {}
    for s, src in enumerate(ds.sources):
        rows = te.split.sources == s
        if rows.any():
            by_source[src.name] = evaluate(test_probs[rows], y_te[rows], ds.classes, pos, thr)
    metrics_doc = {"split": "test", "source": record.test_source, "synthetic": ds.synthetic,
                   "classes": ds.classes, "positive_class": ds.classes[pos],
                   "operating_point": record.operating_point,
                   **evaluate(test_probs, y_te, ds.classes, pos, thr),
                   "sources": by_source, "external": external}
    history = {k: [float(v) for v in vals] for k, vals in history.items()}
    atomic_write_json(out / "history.json", history)
    atomic_write_json(out / "metrics.json", metrics_doc)
    if cfg.plots:
        _plots(history, decoded["train"], ds, y_te, test_probs, pos, out)
    return metrics_doc, history


def _save_collapsed(model, record: TrainingRecord, staged: TrainOutputs, val: ValidationCheck) -> None:
    _save_model(model, staged.path(COLLAPSED_MODEL), record)
    staged.publish_collapsed(record)
    kept = ("the previous model.keras and its files were kept" if (staged.out / MODEL).exists()
            else "no model.keras was written")
    raise TrainingCollapsed(
        f"training collapsed: validation probabilities span {val.spread:.4f}, ROC AUC "
        f"{val.roc_auc:.3f}; the model predicts nearly the same for every image. Saved as "
        f"{staged.out / COLLAPSED_MODEL} ({kept}). Try a lower --learning-rate or another --seed.")


def _announce_dataset(ds: Dataset, log: Log) -> None:
    if len(ds.sources) > 1:
        for s in ds.sources:
            n = Split.concat([s.pool, s.test]).counts(ds.classes)
            log(f"source {s.name}: " + ", ".join(f"{c} {k}" for c, k in n.items())
                + (" (grouped by patient)" if s.patients else ""))
    for f in ds.skipped:
        log(f"warning: skipping {f}: not an image file")
    if ds.synthetic:
        log("*** SYNTHETIC DATA: training on generated phantoms, not X-rays. The model "
            "is for trying the pipeline only. ***")


@contextlib.contextmanager
def _store_folder(cache_dir: Path | None, log: Log):
    """The cache folder for decoded images, or a temporary one (no cache, or not writable)."""
    if cache_dir is not None:
        # only the check is guarded: an error of the run itself must not reach a second yield
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            usable = os.access(cache_dir, os.W_OK)
        except OSError:
            usable = False
        if usable:
            yield cache_dir
            return
        log(f"warning: cannot write the decode cache in {cache_dir}; decoding into a temporary folder")
    with tempfile.TemporaryDirectory(prefix="xray-edge-train-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def backend_settings(cfg: TrainConfig):
    """Precision and JAX's compilation cache for this run; the global policy is restored after."""
    if cfg.precision not in PRECISIONS:
        raise XrayEdgeError(f"--precision {cfg.precision!r}: choose from {', '.join(PRECISIONS)}")
    if keras.backend.backend() == "jax" and cfg.cache_dir is not None:
        import jax

        # XLA compiles the training step anew in every process (~9 s on an H100); on disk, the
        # second run loads it instead
        jax.config.update("jax_compilation_cache_dir", str(cfg.cache_dir / "jax"))
    try:
        with _dtype_policy(cfg.precision):
            yield
    finally:
        if keras.backend.backend() == "jax":  # --devices N set a global distribution
            keras.distribution.set_distribution(None)


def _decode_splits(ds: Dataset, cfg: TrainConfig, folder: Path, log: Log,
                   progress: Progress | None) -> dict[str, SplitData]:
    decoded = {}
    for name, split in _make_splits(ds, cfg).items():
        d = decode_to_store(split.paths, cfg.preprocessing, folder, cfg.workers,
                            label=f"decoding {name}", progress=progress, log=log)
        for e in d.errors:
            log(f"warning: skipped {e}")
        decoded[name] = SplitData(d, split.labels[d.ok], split.subset(d.ok))
    _check_decoded(decoded, ds.classes)
    return decoded


def _choose_devices(cfg: TrainConfig, log: Log) -> Devices:
    devices = training_devices(cfg.devices)
    if cfg.batch_size % len(devices.names):
        raise XrayEdgeError(f"--batch-size {cfg.batch_size} is not a multiple of the "
                            f"{len(devices.names)} devices")
    log(f"device: {devices.describe()}")
    warning = unused_gpu_warning(list(cfg.visible_gpus), devices)
    if warning:
        log(warning)
    return devices


def fit_model(model: keras.Model, decoded: dict[str, SplitData], cfg: TrainConfig, n_devices: int = 1,
              weights: np.ndarray | None = None):
    """Train `model` in place on the "train" split, validating on "validation" every epoch.

    Batches stream from the decoded stores, shuffled per epoch from `cfg.seed`; with
    `n_devices` > 1 (set up by `device.training_devices`) they are split across the devices.
    With `weights` (per training image), validation is weighted by the same rule (`cfg.balance`).

    Returns:
        (history dict, BestWeights (call `.restore()`), EpochClock).
    """
    trainer = training_model(model, cfg)
    tr, val = decoded["train"], decoded["validation"]
    # validation weighted as training is, so the best epoch is chosen on the balanced accuracy
    val_w = balance_weights(val.labels, val.split.sources, cfg.balance) if weights is not None else None
    best, clock = BestWeights(model), EpochClock()
    history = trainer.fit(
        Batches(tr.images.store, tr.images.ok, tr.labels, cfg.batch_size, seed=cfg.seed, devices=n_devices,
                weights=weights),
        validation_data=Batches(val.images.store, val.images.ok, val.labels, cfg.batch_size,
                                devices=n_devices, weights=val_w),
        epochs=cfg.epochs, shuffle=False, verbose=cfg.verbose,
        callbacks=[clock, best, keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max",
                                                              patience=cfg.patience)],
    ).history
    return history, best, clock


def _as_float32(model: keras.Model, n_classes: int, cfg: TrainConfig) -> keras.Model:
    """The same weights in a float32 model: what is saved and exported, whatever the precision."""
    if cfg.precision == "float32":
        return model
    from xray_edge.train.model import build_model

    with _dtype_policy("float32"):
        plain = build_model(n_classes, cfg.preprocessing)
    plain.set_weights(model.get_weights())
    return plain


@contextlib.contextmanager
def _dtype_policy(name: str):
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def _plots(history: dict, train_split: SplitData, ds: Dataset, y_te, test_probs, pos: int, out: Path) -> None:
    from xray_edge.train import plots

    plots.training_curves(history, out / "training.png", synthetic=ds.synthetic)
    d = train_split.images
    plots.sample_grid(d.store.rows(d.ok), train_split.labels, train_split.split.paths, ds.classes,
                      out / "samples.png")
    if len(ds.classes) == 2 and len(np.unique(y_te == pos)) == 2:
        roc(y_te == pos, metrics.positive_score(test_probs, pos), out / "roc.png",
                  title=f"ROC on the test split ({ds.classes[pos]} positive)")


def training_model(model: keras.Model, cfg: TrainConfig) -> keras.Model:
    """`model` behind the augmentation layer, compiled with the recipe's optimizer and loss.

    The augmentation is active only when Keras calls it with training=True (fit's training
    steps), so validation and prediction see the images as they are. Loss and accuracy are
    weighted by sample (all 1, except the zero-weight padding of data-parallel batches).
    """
    binary = int(model.outputs[0].shape[-1]) == 1
    layers = [keras.Input(cfg.preprocessing.shape, name="image"),
              ZoomFlip(cfg.zoom, cfg.flip, seed=cfg.seed, name="augment")]
    if cfg.photometric > 0 or cfg.border > 0:
        layers.append(Photometric(cfg.photometric, cfg.border, seed=cfg.seed + 7, name="photometric"))
    if cfg.degrade > 0:
        layers.append(Degrade(cfg.degrade, seed=cfg.seed + 11, name="degrade"))
    trainer = keras.Sequential([*layers, model], name="xray_cnn_training")
    loss = (keras.losses.BinaryCrossentropy if binary else keras.losses.SparseCategoricalCrossentropy)
    trainer.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate),
                    loss=loss(reduction="mean_with_sample_weight"), weighted_metrics=["accuracy"])
    return trainer


class BestWeights(keras.callbacks.Callback):
    """Keep the weights of the best epoch: highest val_accuracy, ties broken by lower val_loss.

    The tutorial's ModelCheckpoint(save_best_only) on val_accuracy alone keeps the first epoch to
    reach the maximum; on a small validation set many epochs tie, and the lower loss is better.
    The copy stays on the device that trains (no transfer to the host per improvement).
    """

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.best = (-np.inf, -np.inf)
        self.best_epoch = 0
        self.snapshot = self._copy()

    def _copy(self) -> list:
        return [keras.ops.copy(v.value) for v in self.inner.weights]

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        score = (logs.get("val_accuracy", -np.inf), -logs.get("val_loss", np.inf))
        if score > self.best:
            self.best, self.best_epoch = score, epoch + 1
            self.snapshot = self._copy()

    def restore(self) -> None:
        for v, value in zip(self.inner.weights, self.snapshot):
            v.assign(value)


class EpochClock(keras.callbacks.Callback):
    """Seconds per epoch: the first one includes compiling the training step."""

    def __init__(self):
        super().__init__()
        self.durations: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.durations.append(time.perf_counter() - self._t)

    def seconds(self) -> dict:
        d = self.durations
        return {"first_epoch_with_compile": d[0] if d else 0.0, "later_epochs": float(sum(d[1:])),
                "per_later_epoch_median": float(np.median(d[1:])) if len(d) > 1 else None}


def _make_splits(ds: Dataset, cfg: TrainConfig) -> dict[str, Split]:
    """Test: each source's test/, else `test_fraction` of it; validation: `val_fraction` of the rest.

    Both stratified by class within each source, and by whole patients where labels.csv says.
    """
    tests, pools = [], []
    for src in ds.sources:
        if src.test is not None:
            tests.append(src.test)
            pools.append(src.pool)
        else:
            keep, held = stratified_split(src.pool.labels, cfg.test_fraction, cfg.seed + 1, src.pool.groups)
            tests.append(src.pool.subset(held))
            pools.append(src.pool.subset(keep))
    train = Split.concat(pools)
    keep, val = stratified_split(strata(train, len(ds.classes)), cfg.val_fraction, cfg.seed, train.groups)
    return {"train": train.subset(keep), "validation": train.subset(val), "test": Split.concat(tests)}


def _check_decoded(decoded: dict, classes: list[str]) -> None:
    labels = decoded["train"][1]
    for i, c in enumerate(classes):
        if not (labels == i).any():
            raise XrayEdgeError(f"class {c!r} has no readable training images left after skipping bad files")
    if len(decoded["validation"][1]) == 0:
        raise XrayEdgeError("no readable validation images")


def evaluate(probs: np.ndarray, y: np.ndarray, classes: list[str], pos: int,
             threshold: float = 0.5) -> dict:
    """Loss, accuracy, confusion matrix; for two classes ROC AUC, sensitivity, specificity."""
    n = len(classes)
    pred = predicted_classes(probs, threshold)
    if probs.shape[-1] == 1:
        eps = 1e-7
        p1 = np.clip(probs[:, 0], eps, 1 - eps)
        loss = float(-np.mean(np.where(y == 1, np.log(p1), np.log(1 - p1)))) if len(y) else float("nan")
    else:
        loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1)))) if len(y) else float("nan")
    out = {
        "n": int(len(y)),
        "counts": dict(zip(classes, np.bincount(y, minlength=n).tolist())),
        "loss": loss,
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "confusion_matrix": {"rows_true_cols_pred": classes,
                             "matrix": metrics.confusion_matrix(y, pred, n).tolist()},
    }
    if n == 2:
        rep = metrics.decision_report(y == pos, pred == pos)
        out.update({"threshold": threshold, "sensitivity": rep["sensitivity"],
                    "specificity": rep["specificity"], "confusion": rep["confusion"],
                    "roc_auc": metrics.roc_auc(y == pos, metrics.positive_score(probs, pos))})
        if not np.isfinite(out["roc_auc"]):  # written as null (files.json_safe), with the reason
            out["roc_auc_note"] = "undefined: the test split holds images of one class only"
    return out


def _save_model(model, path: Path, record: TrainingRecord) -> None:
    """Save the .keras file atomically, with our metadata as an extra zip member."""
    tmp = path.with_name(f".{path.name}.tmp.keras")
    model.save(tmp)
    d = record.to_dict()
    meta = {k: d[k] for k in ("synthetic", "classes", "positive_class", "preprocessing", "data")}
    if record.synthetic:
        meta["WARNING"] = "trained on SYNTHETIC phantom images, not X-rays"
    with zipfile.ZipFile(tmp, "a") as z:
        z.writestr(KERAS_MEMBER, json.dumps(meta, indent=1))
    os.replace(tmp, path)
