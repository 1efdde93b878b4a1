"""GPU detection (with a fake `nvidia-smi` on PATH), the backend choice, the unused-GPU warning,
and data-parallel training on two emulated JAX devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from xray_edge.train.device import (Devices, Gpu, choose_backend, pip_extra, unused_gpu_warning,
                                    visible_gpus)

H100 = "NVIDIA H100 80GB HBM3"


def fake_smi(folder: Path, lines: list[str], rc: int = 0) -> Path:
    """A `nvidia-smi` that answers the query as the real one does (CSV, no header)."""
    folder.mkdir(parents=True, exist_ok=True)
    exe = folder / "nvidia-smi"
    body = "".join(f"echo '{line}'\n" for line in lines)
    exe.write_text(f"#!/bin/sh\ncase \"$*\" in *--query-gpu=name,driver_version*) ;; *) exit 2;; esac\n"
                   f"{body}exit {rc}\n")
    exe.chmod(0o755)
    return folder


@pytest.fixture
def path_with(monkeypatch, tmp_path):
    def set_path(folder: Path | None) -> None:
        empty = tmp_path / "empty"
        empty.mkdir(exist_ok=True)
        monkeypatch.setenv("PATH", str(folder or empty))
    return set_path


def test_no_nvidia_smi_means_no_gpu(path_with):
    path_with(None)
    assert visible_gpus() == [] and pip_extra([]) is None


def test_fake_nvidia_smi_is_parsed_and_the_extra_follows_the_driver(path_with, tmp_path):
    path_with(fake_smi(tmp_path / "bin", [f"{H100}, 580.65.06", f"{H100}, 580.65.06"]))
    gpus = visible_gpus()
    assert gpus == [Gpu(H100, "580.65.06")] * 2
    assert pip_extra(gpus) == "gpu-cuda13"
    assert pip_extra([Gpu("A100", "535.104.05")]) == "gpu-cuda12"
    assert pip_extra([Gpu("K80", "470.82.01")]) is None  # too old for JAX's CUDA wheels


def test_failing_nvidia_smi_means_no_gpu(path_with, tmp_path):
    # what it does when the driver is not loaded: a message and a non-zero exit
    path_with(fake_smi(tmp_path / "bin", ["NVIDIA-SMI has failed"], rc=9))
    assert visible_gpus() == []


def test_backend_choice_given_beats_environment_beats_gpu():
    gpus = [Gpu(H100, "580.65.06")]
    assert choose_backend("torch", "tensorflow", gpus, True) == "torch"
    assert choose_backend(None, "tensorflow", gpus, True) == "tensorflow"
    assert choose_backend(None, None, gpus, True) == "jax"
    assert choose_backend(None, None, gpus, False) is None  # no CUDA JAX: Keras' default
    assert choose_backend(None, None, [], True) is None  # CPU machine: nothing changes


def test_warning_when_a_visible_gpu_is_not_used():
    gpus = [Gpu(H100, "580.65.06")]
    cpu_tf = Devices("tensorflow", ("cpu:0",), accelerator=False)
    line = unused_gpu_warning(gpus, cpu_tf)
    assert line.startswith("warning:") and "\n" not in line
    assert H100 in line and "tensorflow-cpu" in line and "xray-edge[gpu-cuda13]" in line
    assert "gpu-cuda13" in unused_gpu_warning(gpus, Devices("jax", ("cpu:0",), False))
    assert "driver" in unused_gpu_warning([Gpu(H100, "470.1")], cpu_tf)
    assert unused_gpu_warning(gpus, Devices("jax", ("cuda:0 H100",), True)) is None
    assert unused_gpu_warning([], cpu_tf) is None


def test_device_module_prints_the_extra_for_make(tmp_path):
    def extra(path: Path) -> str:
        r = subprocess.run([sys.executable, "-m", "xray_edge.train.device", "--pip-extra"],
                           capture_output=True, text=True, env={**os.environ, "PATH": str(path)}, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    (tmp_path / "none").mkdir()
    assert extra(tmp_path / "none") == ""  # make train on a CPU machine installs nothing
    assert extra(fake_smi(tmp_path / "bin", [f"{H100}, 535.54.03"])) == "gpu-cuda12"


def test_cli_names_the_device_and_warns_once_about_an_unused_gpu(tmp_path):
    """A GPU is visible but the backend is tensorflow-cpu: one warning line, then CPU training."""
    smi = fake_smi(tmp_path / "bin", [f"{H100}, 580.65.06"])
    env = {"PATH": f"{smi}{os.pathsep}{os.environ['PATH']}", "KERAS_BACKEND": "tensorflow"}
    r = subprocess.run([sys.executable, "-m", "xray_edge.cli", "train", "--phantom-size", "4", "--epochs", "1",
                        "--out", "out", "--cache-dir", "cache"], cwd=tmp_path, capture_output=True,
                       text=True, env={**os.environ, **env}, timeout=600)
    assert r.returncode in (0, 2), r.stderr  # 2: a 1-epoch model may be flagged as collapsed
    err = r.stderr.splitlines()
    warnings = [s for s in err if H100 in s]
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and "gpu-cuda13" in warnings[0]
    device = [s for s in err if s.startswith("device: ")]
    assert device == ["device: cpu (tensorflow; cpu:0)"]
    assert json.loads((tmp_path / "out" / "training.json").read_text())["devices"] == ["cpu:0"]


# ------------------------------------------------------------------ two devices (JAX)
TWO_DEVICES = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import keras
    import numpy as np
    from xray_edge.preprocess import Preprocessing
    from xray_edge.train.batches import predict
    from xray_edge.train.cache import Decoded, decode_to_store
    from xray_edge.train.dataset import discover
    from xray_edge.train.device import training_devices
    from xray_edge.train.trainer import SplitData, TrainConfig, fit_model

    data, cache = Path(sys.argv[1]), Path(sys.argv[2])
    spec = Preprocessing(size=48)  # small images: the test is about devices, not pixels
    split = discover(data).train
    d = decode_to_store(split.paths, spec, cache)
    order = np.random.default_rng(0).permutation(len(d.ok))

    def part(rows):
        return SplitData(Decoded(d.store, d.ok[rows], []), split.labels[d.ok[rows]], split.subset(d.ok[rows]))

    out = {}
    for n_train in (16, 13):  # a multiple of the batch, and a last batch of 5 (padded for 2)
        decoded = {"train": part(order[:n_train]), "validation": part(order[16:23])}
        for n in (1, 2):
            devices = training_devices(n)
            cfg = TrainConfig(data=data, epochs=2, batch_size=8, learning_rate=1e-3, seed=3, verbose=0,
                              preprocessing=spec)
            keras.utils.set_random_seed(cfg.seed)
            model = keras.Sequential([keras.Input(spec.shape), keras.layers.Rescaling(1 / 255),
                                      keras.layers.Conv2D(4, 5, activation="relu"), keras.layers.MaxPooling2D(4),
                                      keras.layers.Dropout(0.2), keras.layers.Flatten(),
                                      keras.layers.Dense(1, activation="sigmoid")])
            t = time.perf_counter()
            history, best, _ = fit_model(model, decoded, cfg, len(devices.names))
            val = decoded["validation"].images
            probs = predict(model, val.store, val.ok, cfg.batch_size, len(devices.names))
            out[f"{n_train}/{n}"] = {"devices": list(devices.names), "probs": probs[:, 0].tolist(),
                                     "s": time.perf_counter() - t, **history}
    print(json.dumps(out))
""")


def test_two_jax_devices_give_the_loss_curve_of_one(tmp_path, phantom_data):
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "PYTHONPATH": str(Path(__file__).parent)}
    r = subprocess.run([sys.executable, "-c", TWO_DEVICES, str(phantom_data), str(tmp_path / "cache")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads(r.stdout.strip().splitlines()[-1])
    assert runs["16/1"]["devices"] == ["cpu:0"] and runs["16/2"]["devices"] == ["cpu:0", "cpu:1"]
    for n_train in ("16", "13"):
        one, two = runs[f"{n_train}/1"], runs[f"{n_train}/2"]
        assert len(one["loss"]) == 2 and one["loss"][0] != one["loss"][1]
        # the same model comes out: validation (7 images: padded to 8 on two devices) and the
        # final predictions agree to float32 rounding
        assert one["val_loss"] == pytest.approx(two["val_loss"], rel=1e-5)
        assert one["val_accuracy"] == pytest.approx(two["val_accuracy"], abs=1e-6)
        assert one["probs"] == pytest.approx(two["probs"], abs=1e-5)
        assert one["accuracy"] == pytest.approx(two["accuracy"], abs=1e-6)
    assert runs["16/1"]["loss"] == pytest.approx(runs["16/2"]["loss"], rel=1e-5)
    # 13 images: the last batch of 5 is padded to 6 at weight 0. Gradients are unchanged (the
    # predictions above match), but Keras logs a batch's loss weighted by its padded size.
    assert runs["13/1"]["loss"] == pytest.approx(runs["13/2"]["loss"], rel=5e-2)


def test_more_devices_than_there_are_is_one_clear_error():
    from xray_edge.errors import XrayEdgeError
    from xray_edge.train.device import training_devices

    assert len(training_devices(1).names) == 1
    with pytest.raises(XrayEdgeError, match="--devices 64"):
        training_devices(64)


def test_cli_refuses_a_device_count_that_is_not_one(tmp_path):
    from conftest import run_cli

    r = run_cli("train", "--data", tmp_path, "--devices", "two")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "'all'" in r.stderr
