"""Which device training runs on: NVIDIA GPUs seen by `nvidia-smi`, the Keras backend's devices,
the JAX extra that matches the driver, and data-parallel training over several devices.

Nothing here imports Keras at module level: the command line picks the backend (KERAS_BACKEND)
with `choose_backend` before Keras is imported. `python -m xray_edge.train.device --pip-extra`
prints the extra for this machine's GPU (nothing without one); `make train` installs it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from dataclasses import dataclass

from xray_edge.errors import XrayEdgeError

# Lowest NVIDIA driver (major version) for JAX's CUDA wheels (the drivers of CUDA 13.0 and 12.0
# GA, as JAX's installation guide asks). The newest CUDA the driver runs is picked.
CUDA_EXTRAS = (("gpu-cuda13", 580), ("gpu-cuda12", 525))
JAX_CUDA_PLUGINS = ("jax-cuda13-plugin", "jax-cuda12-plugin")
BACKENDS = ("tensorflow", "jax", "torch")


@dataclass(frozen=True)
class Gpu:
    name: str
    driver: str  # e.g. "580.65.06"


@dataclass(frozen=True)
class Devices:
    """What the Keras backend trains on."""

    backend: str
    names: tuple[str, ...]  # the devices used, e.g. ("cuda:0 NVIDIA H100 80GB HBM3",)
    accelerator: bool  # a GPU (or TPU), not the CPU

    def describe(self) -> str:
        kind = "gpu" if self.accelerator else "cpu"
        many = f"{len(self.names)} devices: " if len(self.names) > 1 else ""
        return f"{kind} ({self.backend}; {many}{', '.join(self.names)})"


def visible_gpus(smi: str = "nvidia-smi", timeout: float = 20) -> list[Gpu]:
    """The GPUs `nvidia-smi` lists; [] when it is absent or fails (no driver loaded)."""
    exe = shutil.which(smi)
    if exe is None:
        return []
    try:
        r = subprocess.run([exe, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    if r.returncode != 0:
        return []
    gpus = []
    for line in r.stdout.splitlines():
        name, _, driver = line.rpartition(",")
        if name.strip() and driver.strip():
            gpus.append(Gpu(name.strip(), driver.strip()))
    return gpus


def pip_extra(gpus: list[Gpu]) -> str | None:
    """The extra that gives JAX on these GPUs, or None (no GPU, or a driver too old for JAX)."""
    if not gpus:
        return None
    major = min(_driver_major(g.driver) for g in gpus)
    return next((extra for extra, floor in CUDA_EXTRAS if major >= floor), None)


def jax_cuda_installed() -> bool:
    """Whether a JAX CUDA plugin is installed (looked up without importing JAX)."""
    for dist in JAX_CUDA_PLUGINS:
        try:
            importlib.metadata.version(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


def choose_backend(requested: str | None, environment: str | None, gpus: list[Gpu],
                   jax_cuda: bool) -> str | None:
    """The Keras backend to train with: --backend, else KERAS_BACKEND, else JAX where it can use
    a visible GPU; None leaves Keras' own default (TensorFlow)."""
    if requested:
        return requested
    if environment:
        return environment
    return "jax" if gpus and jax_cuda else None


def training_devices(count: int | str = 1) -> Devices:
    """The backend's devices to train on: the first one, `count` of them, or "all".

    More than one sets Keras' data-parallel distribution (JAX only); call it before building the
    model. Raises XrayEdgeError when the request cannot be met.
    """
    import keras

    backend = keras.backend.backend()
    found = _backend_devices(backend)
    accel = [d for d in found if not d.lower().startswith("cpu")]
    pool = accel or found
    n = len(pool) if count == "all" else int(count)
    if n < 1 or n > len(pool):
        raise XrayEdgeError(f"--devices {count}: this machine has {len(pool)} "
                            f"{'GPU' if accel else 'CPU'} device(s) for the {backend} backend")
    if n > 1 and backend != "jax":
        raise XrayEdgeError(f"--devices {count}: data-parallel training needs the jax backend "
                            f"(--backend jax), not {backend}")
    if n > 1:
        devices = keras.distribution.list_devices()[:n]
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    elif backend == "jax":
        keras.distribution.set_distribution(None)
    return Devices(backend, tuple(pool[:n]), bool(accel))


def unused_gpu_warning(gpus: list[Gpu], devices: Devices) -> str | None:
    """One line when `nvidia-smi` shows a GPU that the backend does not train on, with the fix."""
    if not gpus or devices.accelerator:
        return None
    extra = pip_extra(gpus)
    if extra is None:
        fix = (f"update the NVIDIA driver ({gpus[0].driver}) to {CUDA_EXTRAS[-1][1]} or newer, "
               "then run make train")
    elif devices.backend == "jax":
        fix = f"pip install 'xray-edge[{extra}]' (JAX's CUDA plugin), or run make train"
    else:
        fix = f"run make train, or pip install 'xray-edge[{extra}]' and train with --backend jax"
    why = ("tensorflow-cpu has no GPU support" if devices.backend == "tensorflow"
           else f"the {devices.backend} backend sees no GPU")
    return f"warning: {gpus[0].name} is visible but training runs on the CPU ({why}); fix: {fix}"


def _backend_devices(backend: str) -> list[str]:
    if backend == "jax":
        import jax

        return [f"{d.platform}:{d.id} {d.device_kind}" if d.platform != "cpu" else f"cpu:{d.id}"
                for d in jax.devices()]
    if backend == "torch":
        import torch

        gpus = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
        return gpus or ["cpu:0"]
    import tensorflow as tf

    gpus = [f"{d.name} {d.device_type}" for d in tf.config.list_logical_devices("GPU")]
    return gpus or ["cpu:0"]


def _driver_major(driver: str) -> int:
    try:
        return int(driver.split(".")[0])
    except ValueError:
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xray_edge.train.device", description=__doc__)
    ap.add_argument("--pip-extra", action="store_true",
                    help="print the extra that installs JAX for this machine's GPU (nothing without one)")
    args = ap.parse_args(argv)
    gpus = visible_gpus()
    if args.pip_extra:
        extra = pip_extra(gpus)
        if extra:
            print(extra)
        elif gpus:
            print(f"note: {gpus[0].name} found, but driver {gpus[0].driver} is older than JAX's CUDA "
                  f"wheels need ({CUDA_EXTRAS[-1][1]}); training stays on the CPU", file=sys.stderr)
        return 0
    for g in gpus:
        print(f"{g.name} (driver {g.driver}) -> {pip_extra([g]) or 'no JAX CUDA wheel for this driver'}")
    if not gpus:
        print("no NVIDIA GPU (nvidia-smi absent or lists none)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
