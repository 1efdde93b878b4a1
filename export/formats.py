"""The export formats: one table, each with its file name, the runtime that proves it, the gates
that apply, and its converter, all with one signature."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from xray_edge.metadata import tflite_with_metadata


class ModelSource:
    """The Keras model and the float conversions other formats start from, each made once:
    int8 TFLite quantizes the float32 flatbuffer, int8 ONNX the float ONNX graph."""

    def __init__(self, model, formats: list[str]):
        self.model = model
        self.formats = formats  # all the export makes
        self._float_tflite: bytes | None = None
        self._float_onnx: bytes | None = None

    def float_tflite(self) -> bytes:
        from xray_edge.export import tflite

        if self._float_tflite is None:
            self._float_tflite = tflite.convert_float32(self.model)
        return self._float_tflite

    def float_onnx(self) -> bytes:
        """Float ONNX with empty metadata; each format sets its own."""
        from xray_edge.export.onnx import keras_to_onnx

        if self._float_onnx is None:
            self._float_onnx = keras_to_onnx(self.model, {})
        return self._float_onnx

    def release(self, keep_float_tflite: bool = False) -> None:
        """Drop the Keras model and the cached conversions (each as large as the weights), all
        but the float32 flatbuffer if `keep_float_tflite` (int8 still to quantize)."""
        import gc

        if keep_float_tflite:
            self.float_tflite()
        else:
            self._float_tflite = None
        self.model = self._float_onnx = None
        gc.collect()  # a Keras model is held in reference cycles


Converter = Callable[[ModelSource, np.ndarray, dict], bytes]


@dataclass(frozen=True)
class Format:
    name: str
    file: str
    runtime: str  # the edge backend that proves it
    gates: str  # which parity gates apply: "float", "float16" or "int8" (see parity.GATE_KINDS)
    description: str
    convert: Converter  # (source, uint8 calibration images, embedded metadata) -> file bytes

    @property
    def needs_calibration(self) -> bool:
        return self.gates == "int8"


def _float32(source: ModelSource, calibration: np.ndarray, metadata: dict) -> bytes:
    return tflite_with_metadata(source.float_tflite(), metadata)


def _float16(source: ModelSource, calibration: np.ndarray, metadata: dict) -> bytes:
    from xray_edge.export import tflite

    return tflite_with_metadata(tflite.convert_float16(source.model), metadata)


def _int8(source: ModelSource, calibration: np.ndarray, metadata: dict) -> bytes:
    from xray_edge.export import tflite

    return tflite_with_metadata(tflite.quantize_int8(source.float_tflite(), calibration), metadata)


def _onnx(source: ModelSource, calibration: np.ndarray, metadata: dict) -> bytes:
    from xray_edge.export.onnx import keras_to_onnx, with_metadata

    if "onnx-int8" in source.formats:  # starts from the same graph
        return with_metadata(source.float_onnx(), metadata)
    return keras_to_onnx(source.model, metadata)  # with its metadata at once: no second parse


def _onnx_int8(source: ModelSource, calibration: np.ndarray, metadata: dict) -> bytes:
    from xray_edge.export.onnx import quantize_qdq

    return quantize_qdq(source.float_onnx(), calibration, metadata)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("float32", "xray_float32.tflite", "litert", "float", "TFLite float32, builtin ops", _float32),
    Format("int8", "xray_int8.tflite", "litert", "int8", "TFLite full-integer int8, int8 input", _int8),
    Format("onnx", "xray.onnx", "onnxruntime", "float", "ONNX float32, dynamic batch", _onnx),
    Format("float16", "xray_float16.tflite", "litert", "float16", "TFLite float16 weights", _float16),
    Format("onnx-int8", "xray_int8.onnx", "onnxruntime", "int8",
           "ONNX static int8 (QDQ): uint8 activations, int8 per-channel weights", _onnx_int8),
)}
DEFAULT_FORMATS = ("float32", "int8", "onnx")
# Which file the edge runner uses when none is named: the first of these that was exported.
DEFAULT_FILE_ORDER = ("int8", "float32", "onnx", "onnx-int8", "float16")
