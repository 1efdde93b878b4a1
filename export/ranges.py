"""Activation ranges for int8: the min and max of every tensor over the calibration images,
written into the float32 flatbuffer where the MLIR quantizer reads them.

This is what TensorFlow's calibrator records (tensorflow/lite/tools/optimize/calibration: the
min and max of every non-constant float32 tensor an operator reads or writes, over all images),
measured in a LiteRT interpreter that keeps every tensor and reduced with numpy. The calibrator
logs value by value in scalar C++ (`MinMax::Update`, about 40% of its time); this takes about
half its time on the tutorial's model, writing included (figures: docs/export.md). The price is
memory: every activation of one batch is kept (107 MB for the tutorial's model at 10 images).

XNNPACK computes the float32 graph in another order than TensorFlow's kernels, so a range can
differ in the 6th-7th significant digit; tests/test_export_int8.py bounds that against the
calibrator, and the parity gate proves the int8 file either way. `covered` says which models
this handles; the rest keep the calibrator.
"""

from __future__ import annotations

import warnings
from typing import Iterable

import numpy as np

from xray_edge.errors import XrayEdgeError

Ranges = dict[int, tuple[float, float]]  # tensor index in subgraph 0 -> (min, max)
FLT_MIN = float(np.finfo(np.float32).tiny)


def covered(float32: bytes) -> bool:
    """Whether `measure` records every range the calibrator would for this model: one subgraph
    with one input, no LSTM-type operator (those log intermediate tensors only the calibrator
    adds) and no variable tensor (state an operator updates in place: the calibrator logs the
    value each operator read, `measure` only sees the last)."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAs(float32, 0)
    if model.SubgraphsLength() != 1 or has_lstm(float32):
        return False
    graph = model.Subgraphs(0)
    return graph.InputsLength() == 1 and not any(graph.Tensors(i).IsVariable()
                                                 for i in range(graph.TensorsLength()))


def has_lstm(float32: bytes) -> bool:
    """Whether any operator of the model is an LSTM (read from the operator table, not unpacked)."""
    from tensorflow.lite.python import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAs(float32, 0)
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        if "LSTM" in names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), ""):
            return True
    return False


def loggable(float32: bytes) -> list[int]:
    """The tensors the calibrator records: float32, without constant data, read or written by an
    operator of the main subgraph."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAs(float32, 0)
    graph = model.Subgraphs(0)
    found = set()
    for o in range(graph.OperatorsLength()):
        op = graph.Operators(o)
        for i in (*op.InputsAsNumpy().tolist(), *op.OutputsAsNumpy().tolist()):
            tensor = graph.Tensors(i) if i >= 0 else None  # -1: an optional input left out
            if (tensor is not None and tensor.Type() == schema.TensorType.FLOAT32
                    and model.Buffers(tensor.Buffer()).DataLength() == 0):
                found.add(i)
    return sorted(found)


def measure(float32: bytes, batches: Iterable[np.ndarray], threads: int = 1) -> Ranges:
    """Run every batch (float32 [n, H, W, C], all of one size) and keep each tensor's min and max.

    Raises:
        XrayEdgeError: a tensor took a NaN or infinite value. The calibrator skips NaN values
            with a warning; here either is an error that names the tensor, since a range built
            around one quantizes nothing faithfully.
    """
    from ai_edge_litert.interpreter import Interpreter

    from xray_edge.backends import quiet_stderr

    indices = loggable(float32)
    with warnings.catch_warnings():  # "intended for debugging purposes only": keeping them is the point
        warnings.filterwarnings("ignore", message=".*preserve_all_tensors", category=UserWarning)
        it = Interpreter(model_content=float32, num_threads=threads, experimental_preserve_all_tensors=True)
    names = {t["index"]: t["name"] for t in it.get_tensor_details()}
    inp = it.get_input_details()[0]["index"]
    lo: dict[int, float] = {}
    hi: dict[int, float] = {}
    shape = None
    for batch in batches:
        if batch.shape != shape:
            shape = batch.shape
            it.resize_tensor_input(inp, list(shape))
            with quiet_stderr():  # LiteRT's "Created XNNPACK delegate" line, from C++
                it.allocate_tensors()
        it.set_tensor(inp, batch)
        it.invoke()
        for i in indices:
            found = _min_max(it.tensor(i))
            if found is None:  # an empty tensor: the calibrator records nothing for it either
                continue
            low, high = found
            if not (np.isfinite(low) and np.isfinite(high)):
                raise XrayEdgeError(f"calibration: tensor {names.get(i, i)!r} took a non-finite value "
                                    "on the calibration images")
            lo[i] = min(lo.get(i, low), low)
            hi[i] = max(hi.get(i, high), high)
    if shape is None:
        raise ValueError("int8 export needs calibration images")
    # The calibrator starts every max at FLT_MIN, the smallest positive float, so it stores an
    # all-negative tensor with max 1.2e-38 rather than its own max. Done the same here so that
    # both routes store the same ranges; the quantizer widens every range to include 0 anyway.
    return {i: (lo[i], max(hi[i], FLT_MIN)) for i in lo}


def _min_max(view) -> tuple[float, float] | None:
    # the interpreter's own memory, read in place; no reference to it outlives this call,
    # which the interpreter requires before its next invoke
    values = view()
    return (float(values.min()), float(values.max())) if values.size else None


def write(float32: bytes, ranges: Ranges) -> bytes:
    """The flatbuffer with each range stored as its tensor's quantization min/max, as the
    calibrator stores them (the quantizer reads nothing else from calibration)."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(float32, 0)  # weights stay numpy views of `float32`
    tensors = model.subgraphs[0].tensors
    for i, (low, high) in ranges.items():
        q = schema.QuantizationParametersT()  # a fresh one, as the calibrator stores it
        q.min, q.max = [low], [high]
        tensors[i].quantization = q
    # sized once: the default 1 KiB builder grows by doubling, copying the weights each time
    builder = flatbuffers.Builder(len(float32) + (1 << 20))
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
