"""Inference runtimes behind one small interface: a uint8 image in, class probabilities out.

LiteRT (`ai-edge-litert`) and `tflite-runtime` run `.tflite` files; onnxruntime runs `.onnx`.
Each backend is batch-of-one and keeps its interpreter alive across images. Quantized tensors are
fed and read through the scale and zero point the interpreter reports, never by assuming /255.
Pixel scaling is inside the model, so no backend restates any normalization.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import time
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import numpy as np

from xray_edge.errors import ModelError, RuntimeMissing, first_line
from xray_edge.files import MAX_MODEL_BYTES, open_regular, read_regular

EXTRA = {"litert": "litert", "tflite": "tflite", "onnxruntime": "onnx"}
DIST = {"litert": "ai-edge-litert", "tflite": "tflite-runtime", "onnxruntime": "onnxruntime"}
FILE_KINDS = {".tflite": ("litert", "tflite"), ".onnx": ("onnxruntime",)}


def runtime_version(backend: str) -> str | None:
    import importlib.metadata  # slow to import (docs/edge.md): only when a version is asked for

    try:
        return importlib.metadata.version(DIST[backend])
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed(backend: str) -> bool:
    module = {"litert": "ai_edge_litert", "tflite": "tflite_runtime", "onnxruntime": "onnxruntime"}
    return importlib.util.find_spec(module[backend]) is not None


def _hint(backend: str) -> str:
    return f"pip install 'xray-edge[{EXTRA[backend]}]'"


def choose_backend(model_path: Path, requested: str = "auto") -> str:
    """Pick the runtime for a model file: the one asked for, or the first installed that fits."""
    suffix = model_path.suffix.lower()
    fits = FILE_KINDS.get(suffix)
    if fits is None:
        raise ModelError(f"{model_path}: unknown model type {suffix!r} (expected .tflite or .onnx)")
    if requested != "auto":
        if requested not in fits:
            raise ModelError(f"{model_path}: backend {requested!r} cannot run {suffix} files "
                             f"(use {' or '.join(fits)})")
        if not _installed(requested):
            raise RuntimeMissing(f"backend {requested!r} is not installed: {_hint(requested)}")
        return requested
    for name in fits:
        if _installed(name):
            return name
    raise RuntimeMissing(f"no runtime for {suffix} files is installed: "
                         + " or ".join(_hint(n) for n in fits))


def open_backend(model_path: Path, backend: str = "auto", threads: int | None = None,
                 content: "bytes | MappedModel | None" = None):
    """Load a model in a runtime and return an object with `.predict(image) -> probs`.

    `content` is the model file's bytes, already read (and checked against the manifest's
    sha256) by the caller: the runtime loads those bytes, so the file cannot change in between.
    A `MappedModel` (.tflite only) is loaded from the caller's open file instead.
    """
    name = choose_backend(model_path, backend)
    data = content if content is not None else read_model_bytes(model_path)
    if name == "onnxruntime":
        return OnnxBackend(model_path, threads, data)
    return TFLiteBackend(model_path, name, _interpreter_class(name), threads, data)


def read_model_bytes(path: Path) -> bytes:
    """A model file's bytes; ModelError (one line) when it cannot be read. A FIFO, a device (a
    symlink to /dev/zero) or a huge file is refused."""
    try:
        return read_regular(path, MAX_MODEL_BYTES)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or first_line(exc)})") from None


# A file changed this recently may change again within one tick of the file system's clock and keep
# its ctime: it is read into memory, not mapped (as git treats "racily clean" index entries).
RACY_CTIME_NS = 2_000_000_000


class MappedModel:
    """A .tflite file open read-only, loaded by the runtime from this same open file
    (/proc/self/fd/N, so a rename cannot swap it; the runtime maps it, no private copy is made)
    and hashed through a mapping of it.

    What was hashed is what the runtime read unless the file was written in between; every
    write, truncation or chmod sets the file's ctime to the current time, and user space
    cannot set it back, so `unchanged()` (size, mtime and ctime as at opening) after the load
    is the proof. For short-lived processes: a long-running one keeps a copy (open_model).
    """

    def __init__(self, path: Path, file, st: os.stat_result):
        self.path, self.file, self._st = path, file, st

    @property
    def runtime_path(self) -> str:
        return f"/proc/self/fd/{self.file.fileno()}"

    def sha256(self) -> str:
        """The file's sha256, hashed through a mapping in one call that releases the GIL
        throughout: the runtime holds the GIL while it packs the weights, and a loop of reads
        would wait for it at every chunk instead of hashing beside it."""
        import mmap

        with mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return hashlib.sha256(m).hexdigest()

    def unchanged(self) -> bool:
        st = os.fstat(self.file.fileno())
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns) == (self._st.st_size, self._st.st_mtime_ns,
                                                                self._st.st_ctime_ns)

    def close(self) -> None:
        self.file.close()


def map_model(path: Path) -> MappedModel | None:
    """The file open for the runtime to map (see MappedModel), or None where that proves less
    than a copy: no /proc/self/fd, an empty file, or one changed in the last RACY_CTIME_NS.
    ModelError when it cannot be opened (a FIFO, a device, over the size limit)."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    try:
        f = open_regular(path, MAX_MODEL_BYTES)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read ({exc.strerror or first_line(exc)})") from None
    st = os.fstat(f.fileno())
    if st.st_size == 0 or time.time_ns() - st.st_ctime_ns < RACY_CTIME_NS:
        f.close()
        return None
    return MappedModel(path, f, st)


@contextmanager
def quiet_stderr():
    """Send C-level writes to fd 2 to a scratch file while a runtime loads.

    LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate" from C++ and has no Python
    switch for it. A failed load still raises, with its message; only the print is dropped.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no fd 2 (embedded interpreters): nothing to silence
        yield
        return
    try:
        sink = os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no /dev/null in a bare chroot: the line is printed
        os.close(saved)
        yield
        return
    os.dup2(sink, 2)
    os.close(sink)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _interpreter_class(name: str):
    if name == "tflite":
        version = runtime_version("tflite") or "0"
        if int(np.__version__.split(".")[0]) >= 2 and _major_minor(version) < (2, 15):
            # Importing it anyway prints an ABI traceback from C; say what fixes it instead.
            raise RuntimeMissing(f"tflite-runtime {version} needs numpy<2 (this is numpy "
                                 f"{np.__version__}): {_hint('tflite')} in a fresh environment, "
                                 f"or use {_hint('litert')}")
    try:
        if name == "litert":
            from ai_edge_litert.interpreter import Interpreter
        else:
            from tflite_runtime.interpreter import Interpreter
    except Exception as exc:  # noqa: BLE001 - ImportError, numpy ABI errors (SystemError), ...
        raise RuntimeMissing(f"{DIST[name]} cannot load here ({type(exc).__name__}: "
                             f"{first_line(exc)}): {_hint(name)}") from None
    return Interpreter


def _major_minor(version: str) -> tuple[int, int]:
    parts = (version.split(".") + ["0", "0"])[:2]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)  # type: ignore


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    """Real values -> integer tensor values: round(x / scale) + zero_point, clipped to dtype."""
    info = np.iinfo(dtype)
    q = np.round(x.astype(np.float32) / np.float32(scale)) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return (q.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)


def _single_io(path: Path, inputs, outputs):
    """The one input and one output of an image classifier; ModelError for any other count."""
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"{path}: has {len(inputs)} inputs and {len(outputs)} outputs "
                         "(an image classifier has one of each)")
    return inputs[0], outputs[0]


class TFLiteBackend:
    """LiteRT or tflite-runtime interpreter, allocated once, invoked per image."""

    def __init__(self, path: Path, name: str, interpreter_cls, threads: int | None = None,
                 content: bytes | MappedModel | None = None):
        self.name = name
        if isinstance(content, MappedModel):  # the runtime maps the caller's open file itself
            self._content, source = None, {"model_path": content.runtime_path}
        else:
            self._content = content if content is not None else read_model_bytes(path)  # the runtime reads it in place
            source = {"model_content": self._content}
        try:
            with quiet_stderr():
                self._it = interpreter_cls(**source, num_threads=threads)
                self._it.allocate_tensors()
            inputs, outputs = self._it.get_input_details(), self._it.get_output_details()
        except Exception as exc:  # noqa: BLE001 - ValueError / RuntimeError from the C++ loader
            raise ModelError(f"{path}: not a loadable TFLite model "
                             f"({first_line(exc)})") from None
        inp, out = _single_io(path, inputs, outputs)
        self.input_shape = tuple(int(d) for d in inp["shape"])
        self.output_shape = tuple(int(d) for d in out["shape"])
        self.input_dtype = np.dtype(inp["dtype"])
        self.output_dtype = np.dtype(out["dtype"])
        self.input_quant = tuple(inp["quantization"])  # (scale, zero_point); (0.0, 0) = float
        self.output_quant = tuple(out["quantization"])
        self.input_name, self.output_name = inp["name"], out["name"]
        self._in, self._out = inp["index"], out["index"]
        # 0-255 pixels with scale 1 quantize to themselves (uint8, zero point 0) or to pixel - 128
        # (int8, zero point -128: the same bits with the top one flipped): skip the float trip.
        self._pixels = {("uint8", (1.0, 0)): lambda x: x,
                        ("int8", (1.0, -128)): lambda x: (x ^ np.uint8(0x80)).view(np.int8),
                        }.get((self.input_dtype.name, self.input_quant))

    def predict(self, image: np.ndarray) -> np.ndarray:
        x = image[None]
        if self._pixels is not None and x.dtype == np.uint8:
            x = self._pixels(x)
        elif self.input_dtype.kind in "iu":
            x = quantize(x, self.input_quant[0], self.input_quant[1], self.input_dtype)
        else:
            x = x.astype(self.input_dtype)
        self._it.set_tensor(self._in, x)
        self._it.invoke()
        y = self._it.get_tensor(self._out)[0]
        if self.output_dtype.kind in "iu":
            return dequantize(y, self.output_quant[0], self.output_quant[1])
        return y.astype(np.float32)

    @cached_property
    def version(self) -> str | None:
        return runtime_version(self.name)

    def raw_output(self, image: np.ndarray) -> np.ndarray:
        """The output tensor as the runtime produced it (int8/uint8 for quantized models)."""
        self.predict(image)
        return self._it.get_tensor(self._out)[0].copy()


# onnxruntime runs a model only on inputs of exactly its declared element type
_ONNX_INPUT_TYPES = {"tensor(uint8)": np.uint8, "tensor(float)": np.float32,
                     "tensor(double)": np.float64, "tensor(float16)": np.float16}


class OnnxBackend:
    """onnxruntime session on the CPU provider, batch of one."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None, content: bytes | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self._sess = ort.InferenceSession(content if content is not None else read_model_bytes(path), opts,
                                              providers=["CPUExecutionProvider"])
            inputs, outputs = self._sess.get_inputs(), self._sess.get_outputs()
            self.metadata = dict(self._sess.get_modelmeta().custom_metadata_map)
        except Exception as exc:  # noqa: BLE001 - InvalidProtobuf, Fail, ...
            raise ModelError(f"{path}: not a loadable ONNX model "
                             f"({first_line(exc)})") from None
        inp, out = _single_io(path, inputs, outputs)
        self.input_name, self.output_name = inp.name, out.name
        self.input_shape = tuple(inp.shape)  # symbolic dimensions are strings or None
        self.output_shape = tuple(out.shape)
        if inp.type not in _ONNX_INPUT_TYPES:
            raise ModelError(f"{path}: input type {inp.type} is not supported "
                             f"(expected {' or '.join(sorted(_ONNX_INPUT_TYPES))})")
        self.input_dtype = np.dtype(_ONNX_INPUT_TYPES[inp.type])

    @cached_property
    def version(self) -> str | None:
        return runtime_version(self.name)

    def predict(self, image: np.ndarray) -> np.ndarray:
        y = self._sess.run([self.output_name], {self.input_name: image[None].astype(self.input_dtype)})
        return np.asarray(y[0][0], dtype=np.float32)

    raw_output = predict
