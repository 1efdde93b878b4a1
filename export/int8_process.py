"""int8 quantization in a second process, beside the rest of the export.

Measuring the activation ranges and quantizing take most of the export's time on the
tutorial's model, and the quantizer holds Python's GIL throughout, so a thread cannot overlap
it with anything. A second process can:
it starts TensorFlow while the export loads the model, decodes the calibration images while the
export converts float32, then quantizes that flatbuffer while the export converts ONNX and
proves the other files. Figures: docs/export.md.

The cost is a second TensorFlow start (2-3 s of CPU, 250 MB of its own), so the export uses it
only where it pays: a model file of `MIN_MODEL_BYTES` or more, on a machine with two cores or more.

The protocol is three messages on one pipe: parent -> (model path, calibration image paths,
preprocessing); parent -> float32 flatbuffer; child -> ("int8", bytes, figures) or ("error", one
line, figures). An export that fails elsewhere terminates the child; if the export is killed, the
child exits at its next read or write of the closed pipe (at most one quantization later).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from pathlib import Path

from xray_edge.errors import XrayEdgeError, first_line
from xray_edge.preprocess import Preprocessing

# Below this (a few million weights) quantizing in-process takes less than a second process's start.
MIN_MODEL_BYTES = 20_000_000

# 2 MB pages for the memory malloc maps (glibc >= 2.35 reads this at process start; other C
# libraries ignore it). An export copies its weights between formats many times over, each time
# into fresh memory; with 4 KB pages, system time (largely page faults) was about a fifth of the
# export's CPU time (docs/export.md). The Makefile sets it for the export; this process gets it here.
HUGE_PAGES = "glibc.malloc.hugetlb=1"


def with_huge_pages(tunables: str | None) -> str:
    """A GLIBC_TUNABLES value with malloc's huge pages on, keeping any other tunable (and the
    user's own choice of huge pages, if made)."""
    if tunables and "glibc.malloc.hugetlb" in tunables:
        return tunables
    return f"{tunables}:{HUGE_PAGES}" if tunables else HUGE_PAGES


def worth_it(model_path: Path) -> bool:
    """Whether quantizing `model_path` in a second process shortens the export here."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores >= 2 and model_path.stat().st_size >= MIN_MODEL_BYTES


class Int8Process:
    """`tflite.quantize_int8` run by a child process; a context manager that always reaps it.

    Use: `calibrate_on(...)` as soon as the image paths are known, `quantize(float32)` as soon as
    the float32 flatbuffer is made, `result()` when the int8 file is needed.
    """

    def __init__(self):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: TensorFlow is not fork-safe
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), name="xray-edge-int8", daemon=True)
        with _environment("GLIBC_TUNABLES", with_huge_pages(os.environ.get("GLIBC_TUNABLES"))):
            self._proc.start()  # the child inherits this process's environment
        child.close()
        self.figures: dict[str, float] = {}  # measured in the child: seconds "images", "quantize"; "peak_gib"
        self.images = 0

    def __enter__(self) -> "Int8Process":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def calibrate_on(self, model: Path, paths: list[Path], spec: Preprocessing) -> None:
        """The calibration images (decoded in the child) and the model (for the fallback route)."""
        self._send(lambda: self._conn.send((str(model), [str(p) for p in paths], spec.to_dict())))

    def quantize(self, float32: bytes) -> None:
        self._send(lambda: self._conn.send_bytes(float32))

    def result(self) -> bytes:
        """The int8 flatbuffer (no metadata). Raises XrayEdgeError with the child's one-line error."""
        while not self._conn.poll(1):  # a child that died without a word is noticed within a second
            if not self._proc.is_alive():
                break
        try:
            kind, payload, figures, images = self._conn.recv()
        except (EOFError, OSError):
            raise self._ended() from None
        self.figures, self.images = figures, images
        if kind == "error":
            raise XrayEdgeError(payload)
        return payload

    def close(self) -> None:
        self._conn.close()
        if self._proc.is_alive():
            self._proc.terminate()  # an export that failed elsewhere does not wait for the quantizer
            self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()

    def _send(self, send) -> None:
        try:
            send()
        except OSError:  # the child is gone: say why, from its own last words if it left any
            raise self._ended() from None

    def _ended(self) -> XrayEdgeError:
        try:
            if self._conn.poll():
                kind, payload, *_ = self._conn.recv()
                if kind == "error":
                    return XrayEdgeError(payload)
        except (EOFError, OSError):
            pass
        self._proc.join(timeout=5)
        return XrayEdgeError(f"the int8 process ended without a result (exit code {self._proc.exitcode})")


@contextlib.contextmanager
def _environment(name: str, value: str):
    """`name` set to `value` for what starts inside, then as it was: the export's own process
    (and a program that calls it) keeps the user's environment. Used before TensorFlow starts
    any thread of its own."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved


def _serve(conn) -> None:
    """The child: start TensorFlow, decode the calibration images, quantize, answer once."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends this
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    figures: dict[str, float] = {}
    images = None
    try:
        from xray_edge.export import tflite

        tflite.start_tensorflow(onednn=False)  # the costly start, overlapping the parent's model load
        from xray_edge.preprocess import load_images

        model, paths, spec = conn.recv()
        start = time.perf_counter()
        images = load_images([Path(p) for p in paths], Preprocessing.from_dict(spec))[0]
        figures["images"] = round(time.perf_counter() - start, 2)
        received: dict[str, float] = {}
        try:
            # no name holds the float32 bytes here: quantize_int8 frees them before its peak
            data = tflite.quantize_int8(_receive(conn, received), images, threads=1)  # a core each
        except ImportError:  # this TensorFlow moved the private quantizer: the converter's route
            import keras

            data = tflite.convert_int8_with_converter(keras.saving.load_model(model, compile=False), images)
        figures["quantize"] = round(time.perf_counter() - received["at"], 2)
        figures["peak_gib"] = peak_gib()
        conn.send(("int8", data, figures, len(images)))
    except (EOFError, BrokenPipeError):
        return  # the export ended (or was killed) before it needed the result
    except Exception as exc:  # noqa: BLE001 - every failure goes back as one line
        try:
            conn.send(("error", first_line(exc), figures, 0 if images is None else len(images)))
        except (BrokenPipeError, OSError):
            pass


def _receive(conn, when: dict) -> bytes:
    """The float32 bytes, noting when they arrived (the quantization is timed from then)."""
    data = conn.recv_bytes()
    when["at"] = time.perf_counter()
    return data


def peak_gib() -> float:
    """This process's peak resident memory so far, in GiB (NaN where there is no `resource`)."""
    import sys

    try:
        import resource  # POSIX only
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, else KiB

