"""Shared fixtures: real images, tiny and full Keras models, exported artifacts.

Nothing here mocks a converter or a runtime: the models are real Keras models, exported with the
real converters and run in the real edge runtimes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from xray_edge.train.testing import save_with_record, tiny_model  # noqa: E402,F401 - fixtures' builders

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
