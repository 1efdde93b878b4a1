"""Which device training runs on: NVIDIA GPUs seen by `nvidia-smi`, the Keras backend's devices,
the JAX extra that matches the driver, and data-parallel training over several devices.

Nothing here imports Keras at module level: the command line picks the backend (KERAS_BACKEND)
with `choose_backend` before Keras is imported. `python -m xray_edge.train.device --pip-extra`
prints the extra for this machine's GPU (nothing without one); `make train` installs it.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from xray_edge.errors import XrayEdgeError

# Lowest NVIDIA driver (major version) for JAX's CUDA wheels (the drivers of CUDA 13.0 and 12.0
# GA, as JAX's installation guide asks). The newest CUDA the driver runs is picked.
CUDA_EXTRAS = (("gpu-cuda13", 580), ("gpu-cuda12", 525))
JAX_CUDA_PLUGINS = ("jax-cuda13-plugin", "jax-cuda12-plugin")
# What each extra downloads (JAX's CUDA libraries as wheels), said before make installs it;
# measured on a clean environment by the pass that filed issue #22.
EXTRA_DOWNLOAD = {"gpu-cuda13": "2.5 GB", "gpu-cuda12": "3.2 GB"}
# nvidia-smi answers in well under a second; a hung driver makes it wait for ever (it was 20 s).
SMI_TIMEOUT = 5.0
BACKENDS = ("tensorflow", "jax", "torch")


@dataclass(frozen=True)
class Gpu:
    name: str
    driver: str  # e.g. "580.65.06"


@dataclass(frozen=True)
class SmiAnswer:
    """What `nvidia-smi` said: the GPUs it lists, or in one line why there are none known."""

    gpus: tuple[Gpu, ...] = ()
    problem: str | None = None  # "nvidia-smi did not answer within 5 s", "... failed (exit 9): ..."

    def to_json(self) -> str:
        return json.dumps({"gpus": [[g.name, g.driver] for g in self.gpus], "problem": self.problem})

    @classmethod
    def from_json(cls, text: str) -> "SmiAnswer":
        d = json.loads(text)
        return cls(tuple(Gpu(str(n), str(v)) for n, v in d.get("gpus", [])), d.get("problem"))


@dataclass(frozen=True)
class Devices:
    """What the Keras backend trains on."""

    backend: str
    names: tuple[str, ...]  # the devices used, e.g. ("cuda:0 NVIDIA H100 80GB HBM3",)
    accelerator: bool  # a GPU (or TPU), not the CPU
    gpu_error: str | None = field(default=None, compare=False)  # why the backend's GPU did not start

    def describe(self) -> str:
        kind = "gpu" if self.accelerator else "cpu"
        many = f"{len(self.names)} devices: " if len(self.names) > 1 else ""
        return f"{kind} ({self.backend}; {many}{', '.join(self.names)})"


def visible_gpus(smi: str = "nvidia-smi", timeout: float = SMI_TIMEOUT) -> list[Gpu]:
    """The GPUs `nvidia-smi` lists; [] when it is absent, fails or hangs (see `query_gpus`)."""
    return list(query_gpus(smi, timeout).gpus)


def query_gpus(smi: str = "nvidia-smi", timeout: float = SMI_TIMEOUT) -> SmiAnswer:
    """Ask `nvidia-smi` once per process (per executable found), for at most `timeout` seconds.

    Absent: no GPUs and no problem (a CPU machine). Failing or hanging: no GPUs, and the problem
    in one line, for the caller to say.
    """
    exe = shutil.which(smi)
    return SmiAnswer() if exe is None else _ask(exe, timeout)


@functools.lru_cache(maxsize=8)
def _ask(exe: str, timeout: float) -> SmiAnswer:
    try:
        r = subprocess.run([exe, "--query-gpu=name,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=timeout, check=False,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return SmiAnswer(problem=f"{exe} did not answer within {timeout:g} s (a hung driver?)")
    except (OSError, subprocess.SubprocessError) as exc:
        return SmiAnswer(problem=f"{exe} could not run ({exc})")
    if r.returncode != 0:
        said = next((l.strip() for l in (r.stdout + r.stderr).splitlines() if l.strip()), "")
        return SmiAnswer(problem=f"{exe} failed (exit {r.returncode}){': ' + said[:160] if said else ''}")
    gpus = []
    for line in r.stdout.splitlines():
        name, _, driver = line.rpartition(",")
        if name.strip() and driver.strip():
            gpus.append(Gpu(name.strip(), driver.strip()))
    return SmiAnswer(tuple(gpus))


def read_answer(path: Path) -> SmiAnswer | None:
    """The answer `--state` wrote (make asks once per run and hands it on); None if unusable."""
    try:
        return SmiAnswer.from_json(Path(path).read_text())
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def pip_extra(gpus: list[Gpu]) -> str | None:
    """The extra that gives JAX on these GPUs, or None (no GPU, or a driver too old for JAX)."""
    if not gpus:
        return None
    major = min(_driver_major(g.driver) for g in gpus)
    return next((extra for extra, floor in CUDA_EXTRAS if major >= floor), None)


def jax_cuda_installed() -> bool:
    """Whether a JAX CUDA plugin is installed (looked up without importing JAX)."""
    return installed_cuda_plugin() is not None


def installed_cuda_plugin() -> str | None:
    """The name of the JAX CUDA plugin distribution installed, if any."""
    for dist in JAX_CUDA_PLUGINS:
        try:
            importlib.metadata.version(dist)
            return dist
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


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
    found, gpu_error = _backend_devices(backend)
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
    return Devices(backend, tuple(pool[:n]), bool(accel), gpu_error)


def unused_gpu_warning(gpus: list[Gpu], devices: Devices) -> str | None:
    """One line when `nvidia-smi` shows a GPU that the backend does not train on, with the fix."""
    if not gpus or devices.accelerator:
        return None
    extra = pip_extra(gpus)
    if devices.gpu_error:  # the plugin is there and failed: installing it again is no fix
        return (f"warning: {gpus[0].name} is visible but training runs on the CPU: JAX's CUDA "
                f"plugin did not start ({devices.gpu_error}); fix: {plugin_fix(gpus, extra)}")
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


def plugin_fix(gpus: list[Gpu], extra: str | None) -> str:
    """What can make an installed but failing JAX CUDA plugin start."""
    plugin = installed_cuda_plugin() or "the CUDA plugin"
    cpu = "meanwhile train on the CPU with --backend tensorflow"
    if extra is None:
        return (f"update the NVIDIA driver ({gpus[0].driver}) to {CUDA_EXTRAS[-1][1]} or newer "
                f"(or pip uninstall {plugin}); {cpu}")
    wanted = JAX_CUDA_PLUGINS[[e for e, _ in CUDA_EXTRAS].index(extra)]
    if plugin != wanted:  # e.g. the CUDA 13 plugin on a driver that runs CUDA 12 only
        return (f"driver {gpus[0].driver} runs {extra}, not {plugin}: pip uninstall -y {plugin} "
                f"{plugin.replace('-plugin', '-pjrt')} && pip install 'xray-edge[{extra}]'; {cpu}")
    return ("check that nvidia-smi works for this user and that LD_LIBRARY_PATH puts no other CUDA "
            f"libraries first, then pip install --force-reinstall 'xray-edge[{extra}]'; {cpu}")


def _backend_devices(backend: str) -> tuple[list[str], str | None]:
    """The backend's device names, and why its GPU did not start (JAX: in one line, not the
    plugin's traceback, which JAX logs)."""
    if backend == "jax":
        return _jax_devices()
    if backend == "torch":
        import torch

        gpus = [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
        return gpus or ["cpu:0"], None
    import tensorflow as tf

    gpus = [f"{d.name} {d.device_type}" for d in tf.config.list_logical_devices("GPU")]
    return gpus or ["cpu:0"], None


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _jax_devices() -> tuple[list[str], str | None]:
    import jax

    # JAX logs a failing plugin's traceback (20 lines) and goes on with the CPU: keep the
    # message, drop the traceback, and say it once in the unused-GPU warning
    log = logging.getLogger("jax._src.xla_bridge")
    collect, propagate = _Collect(), log.propagate
    log.addHandler(collect)
    log.propagate = False
    try:
        devices = jax.devices()
    finally:
        log.removeHandler(collect)
        log.propagate = propagate
    names = [f"{d.platform}:{d.id} {d.device_kind}" if d.platform != "cpu" else f"cpu:{d.id}" for d in devices]
    error = _plugin_error(collect.records)
    plugin = installed_cuda_plugin()
    if error is None and plugin and all(d.platform == "cpu" for d in devices):
        error = f"{plugin} is installed but JAX lists no CUDA device"
    return names, error


def _plugin_error(records: list[logging.LogRecord]) -> str | None:
    for r in records:
        text = r.getMessage()
        if r.exc_info and r.exc_info[1] is not None:
            exc = r.exc_info[1]
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return f"{type(exc).__name__}: {line}"[:300]
        if "CUDA backend failed" in text or "plugin" in text.lower():
            return text.splitlines()[0][:300]
    return None


def _driver_major(driver: str) -> int:
    try:
        return int(driver.split(".")[0])
    except ValueError:
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xray_edge.train.device", description=__doc__)
    ap.add_argument("--pip-extra", action="store_true",
                    help="print the extra that installs JAX for this machine's GPU (nothing without one)")
    ap.add_argument("--state", action="store_true",
                    help="print nvidia-smi's answer as one JSON line (make keeps it: a change redoes "
                         "the GPU step)")
    ap.add_argument("--answer", type=Path, default=None,
                    help="read nvidia-smi's answer from this --state file instead of asking again")
    args = ap.parse_args(argv)
    answer = (read_answer(args.answer) if args.answer else None) or query_gpus()
    if args.state:
        print(answer.to_json())
        return 0
    gpus = list(answer.gpus)
    if answer.problem:
        print(f"warning: {answer.problem}; no GPU is used", file=sys.stderr)
    if args.pip_extra:
        extra = pip_extra(gpus)
        if extra:
            print(extra)
            print(f"note: xray-edge[{extra}] downloads about {EXTRA_DOWNLOAD[extra]} of wheels "
                  "(JAX's CUDA libraries), once", file=sys.stderr)
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
