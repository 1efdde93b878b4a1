"""Shared fixtures: real images, tiny and full Keras models, exported artifacts.

Nothing here mocks a converter or a runtime: the models are real Keras models, exported with the
real converters and run in the real edge runtimes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest-xray-small"


def shared_or_skip() -> Path:
    if not (SHARED / "train").is_dir():
        pytest.skip("../shared/data/chest-xray-small is not here")
    return SHARED


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return shared_or_skip()


@pytest.fixture(scope="session")
def phantom_data(tmp_path_factory) -> Path:
    from xray_edge.train.phantom import generate_phantoms

    return generate_phantoms(tmp_path_factory.mktemp("phantom"), n_train=12, n_test=6)


def tiny_model(num_classes: int = 2, seed: int = 9):
    """The tutorial's layer types at a fraction of the width: converts in seconds.

    Seed 9 spreads its outputs over 0.12-0.92 on the test images, none within 0.01 of the
    threshold, so int8 rounding cannot flip a decision by accident.
    """
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((200, 200, 3), name="image"),
        layers.Rescaling(1 / 255),
        layers.Conv2D(4, 5, padding="same", activation="relu"),
        layers.MaxPooling2D(4),
        layers.Dropout(0.2),
        layers.Conv2D(4, 5, padding="same", activation="relu"),
        layers.MaxPooling2D(5),
        layers.Flatten(),
        layers.Dense(8, activation="relu"),
        # wide initial weights: outputs spread over (0, 1) instead of sitting at 0.5, so a test
        # that compares decisions is not decided by rounding at the threshold
        layers.Dense(1 if num_classes == 2 else num_classes,
                     activation="sigmoid" if num_classes == 2 else "softmax",
                     kernel_initializer=keras.initializers.RandomNormal(stddev=3.0, seed=seed)),
    ])


def save_with_record(model, folder: Path, classes, data: Path) -> Path:
    """Save like the trainer does: model.keras + training.json with split file lists."""
    from xray_edge.inputs import walk_images
    from xray_edge.preprocess import DEFAULT

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.keras"
    model.save(path)
    train = [str(p) for p in walk_images(data / "train")]
    test = [str(p) for p in walk_images(data / "test")] if (data / "test").is_dir() else train[1::2]
    if not (data / "test").is_dir():
        train = train[0::2]
    def label(p: str) -> int:
        return next(i for i, c in enumerate(classes) if f"/{c}/" in p)

    (folder / "training.json").write_text(json.dumps({
        "classes": list(classes), "synthetic": (data / "SYNTHETIC").exists(), "data": str(data),
        "preprocessing": DEFAULT.to_dict(), "positive_class": classes[0],
        "files": {"train": train, "validation": [], "test": test},
        "labels": {"train": [label(p) for p in train], "validation": [], "test": [label(p) for p in test]}}))
    return path


def export_folder(model_path: Path, formats=("float32", "int8", "onnx"), **kw):
    from xray_edge.export.pipeline import ExportConfig, run_export

    cfg = ExportConfig(model=model_path, out=model_path.parent, formats=tuple(formats), **kw)
    return run_export(cfg, log=lambda s: None)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, phantom_data) -> Path:
    """A tiny binary model exported to every registered format."""
    from xray_edge.export.pipeline import FORMATS

    folder = tmp_path_factory.mktemp("tiny")
    path = save_with_record(tiny_model(), folder, ["COVID19", "NORMAL"], phantom_data)
    result = export_folder(path, formats=tuple(FORMATS))
    assert result.passed, [r.line() for r in result.results]
    return folder


@pytest.fixture(scope="session")
def shared_artifacts(tmp_path_factory, shared_data) -> Path:
    """The tutorial's full model trained briefly on the shared real set, then exported."""
    from xray_edge.train.trainer import TrainConfig, train

    folder = tmp_path_factory.mktemp("shared")
    train(TrainConfig(data=shared_data, out=folder, epochs=3, cache_dir=folder / "cache",
                      verbose=0, plots=True))
    result = export_folder(folder / "model.keras", formats=("float32", "int8", "onnx", "onnx-int8"))
    assert result.passed, [r.line() for r in result.results]
    return folder


def run_cli(*args, input: str | None = None, python: str = sys.executable, env=None):
    """Run `xray-edge` in a new process, as a user would."""
    return subprocess.run([python, "-m", "xray_edge.cli", *map(str, args)], capture_output=True,
                          text=True, input=input, env={**os.environ, **(env or {})}, timeout=300)


def keras_probs(model_path: Path, images: np.ndarray) -> np.ndarray:
    import keras

    model = keras.saving.load_model(model_path, compile=False)
    return np.asarray(model.predict(images, verbose=0))
