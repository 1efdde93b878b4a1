"""Keras model -> ONNX, written layer by layer from the Keras weights.

Why not tf2onnx: for the tutorial's 41M-parameter model it costs tens of seconds and several GB
(its graph optimizers copy the large Dense weight on every pass; figures in docs/export.md), and
`from_keras` fails on Keras 3. The tutorial's model uses six layer types, each one or two ONNX
operators, so emitting them directly takes about a second. Anything else is refused by name
(`refusal`, run for the whole model by `xray_edge.export.model_check` before any conversion)
rather than guessed; the parity check then proves the file against Keras in onnxruntime.
"""

from __future__ import annotations

import json
import logging

import numpy as np

from xray_edge.export.layers import UnsupportedLayer, layer_chain

ONNX_OPSET = 17  # ONNX 1.12+ / onnxruntime 1.12+, the oldest a Raspberry Pi pip install gets
ONNX_IR_VERSION = 8
INPUT_NAME = "image"
OUTPUT_NAME = "probability"


def quantize_qdq(float_model: bytes, calibration: np.ndarray, metadata: dict) -> bytes:
    """Static int8 ONNX in QDQ form: uint8 activations, int8 per-channel weights.

    Static rather than onnxruntime's default dynamic quantization, which ran slower than float32
    on this model (docs/export.md). Input and output stay float32, so the file is fed like
    `xray.onnx`.

    Args:
        float_model: bytes from `keras_to_onnx`.
        calibration: uint8 [N, H, W, C] real images from the one preprocessing.
        metadata: replaces the `xray_edge` metadata property of the result.
    """
    import tempfile
    from pathlib import Path

    import onnx
    from onnx import helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class _Images(CalibrationDataReader):
        def __init__(self):
            self._it = iter(calibration)

        def get_next(self):
            img = next(self._it, None)
            return None if img is None else {INPUT_NAME: img[None].astype(np.float32)}

    if len(calibration) == 0:
        raise ValueError("int8 ONNX export needs calibration images")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(float_model)
        # its root-logger advice to run shape pre-processing does not apply: shapes are static
        logging.disable(logging.WARNING)
        try:
            quantize_static(str(src), str(dst), _Images(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
        finally:
            logging.disable(logging.NOTSET)
        proto = onnx.load(str(dst))
    del proto.metadata_props[:]
    helper.set_model_props(proto, {"xray_edge": json.dumps(metadata, sort_keys=True)})
    return proto.SerializeToString()


def with_metadata(model: bytes, metadata: dict) -> bytes:
    """The same ONNX model with `metadata` as its only ``xray_edge`` property."""
    import onnx
    from onnx import helper

    proto = onnx.load_from_string(model)
    del proto.metadata_props[:]
    helper.set_model_props(proto, {"xray_edge": json.dumps(metadata, sort_keys=True)})
    return proto.SerializeToString()


def keras_to_onnx(model, metadata: dict) -> bytes:
    """Serialise a single-chain Keras CNN to ONNX bytes.

    Args:
        model: a built Keras model whose layers form one chain of Rescaling, Conv2D,
            MaxPooling2D, Dropout, Flatten and Dense layers, fixed NHWC input.
        metadata: stored as the ``xray_edge`` metadata property (JSON), so the file alone
            carries its labels, threshold and preprocessing.

    Returns:
        The serialised ``onnx.ModelProto``: input ``image`` [batch, H, W, C] float32 (0-255
        pixels, NHWC as in Keras), output ``probability`` [batch, K].

    Raises:
        UnsupportedLayer: for a model shape, layer or option this emitter does not translate
            (the same check `xray_edge.export.model_check` runs before any conversion).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    chain = layer_chain(model)
    for layer, in_shape in chain:
        reason = refusal(layer, in_shape)
        if reason:
            raise UnsupportedLayer(reason)
    g = _Graph(numpy_helper)
    model_in = tuple(int(d) for d in model.inputs[0].shape[1:])
    x = INPUT_NAME
    layout = "NHWC"  # the layout of x: NHWC, NCHW, or flat
    flat_from_nchw: tuple[int, int, int] | None = None  # (H, W, C) when NCHW was flattened
    for layer, in_shape in chain:
        kind = type(layer).__name__
        if kind in SKIPPED:
            continue
        if kind == "Rescaling":
            x = g.node("Mul", [x, g.const(_channel_const(layer.scale, layout), "scale")])
            offset = _channel_const(layer.offset, layout)
            if np.any(offset != 0):
                x = g.node("Add", [x, g.const(offset, "offset")])
            continue
        if kind in ("Conv2D", "MaxPooling2D") and layout == "NHWC":
            x = g.node("Transpose", [x], perm=[0, 3, 1, 2])
            layout = "NCHW"
        if kind == "Conv2D":
            kernel = _numpy(layer.kernel)
            bias = _numpy(layer.bias) if layer.use_bias else np.zeros(kernel.shape[-1], np.float32)
            x = g.node("Conv", [x, g.const(kernel.transpose(3, 2, 0, 1), "W"), g.const(bias, "B")],
                       kernel_shape=list(layer.kernel_size), strides=list(layer.strides),
                       dilations=list(layer.dilation_rate),
                       pads=_pads(layer, in_shape, layer.kernel_size, layer.dilation_rate))
            x = _activation(g, x, layer)
        elif kind == "MaxPooling2D":
            x = g.node("MaxPool", [x], kernel_shape=list(layer.pool_size), strides=list(layer.strides),
                       pads=_pads(layer, in_shape, layer.pool_size, (1, 1)))
        elif kind == "Flatten":
            if layout == "NCHW":
                flat_from_nchw = tuple(int(d) for d in in_shape[1:])
            x = g.node("Flatten", [x], axis=1)
            layout = "flat"
        elif kind == "Dense":
            kernel = _numpy(layer.kernel)
            if flat_from_nchw is not None:
                # Keras flattens NHWC; our tensor was NCHW. Permute the weight rows instead of
                # transposing the activations back: same result, no runtime cost.
                h, w, c = flat_from_nchw
                kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
                flat_from_nchw = None
            bias = _numpy(layer.bias) if layer.use_bias else np.zeros(kernel.shape[-1], np.float32)
            weight = g.const(kernel, "W")
            del kernel  # its bytes are in the graph now: one copy fewer at the peak
            x = g.node("Gemm", [x, weight, g.const(bias, "B")])
            x = _activation(g, x, layer)
    if x == INPUT_NAME:
        x = g.node("Identity", [x])
    g.nodes[-1].output[0] = OUTPUT_NAME

    n_out = int(model.outputs[0].shape[-1])
    graph = helper.make_graph(
        g.nodes, "xray_edge",
        inputs=[helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", *model_in])],
        outputs=[helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", n_out])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="xray-edge")
    del graph
    # Protobuf copies on every assignment: the weights go in last, straight into the model, and
    # each copy is dropped as soon as the next exists (the peak: two copies of the weights, not four).
    proto.graph.initializer.extend(g.initializers)
    del g
    proto.ir_version = ONNX_IR_VERSION
    helper.set_model_props(proto, {"xray_edge": json.dumps(metadata, sort_keys=True)})
    data = proto.SerializeToString()
    del proto  # the checker parses the bytes again
    onnx.checker.check_model(data)
    return data


# What the emitter translates: layer type -> activations it accepts on that layer. Softmax only
# on a 2-D Dense output: on a Conv2D it would run over the NCHW channel axis the emitter uses.
SKIPPED = {"InputLayer", "Dropout"}  # identity at inference
ACTIVATIONS = {"Conv2D": {"linear", "relu", "sigmoid"}, "Dense": {"linear", "relu", "sigmoid", "softmax"}}
TRANSLATED = {"Rescaling", "Conv2D", "MaxPooling2D", "Flatten", "Dense"} | SKIPPED


def refusal(layer, in_shape: tuple) -> str | None:
    """Why the emitter cannot translate `layer` applied to a tensor of `in_shape`, or None.

    One line naming the layer and the option, e.g. "layer 'conv2d' (Conv2D): activation
    'softmax' is not translated (translated: linear, relu, sigmoid)".
    """
    kind = type(layer).__name__
    where = f"layer {layer.name!r} ({kind})"
    if kind not in TRANSLATED:
        return f"{where} is not translated to ONNX (translated: {', '.join(sorted(TRANSLATED))})"
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return f"{where}: data_format={layer.data_format!r} is not translated (only 'channels_last')"
    if kind in ("Conv2D", "MaxPooling2D") and layer.padding not in ("same", "valid"):
        return f"{where}: padding={layer.padding!r} is not translated (only 'same', 'valid')"
    if kind == "Conv2D" and layer.groups != 1:
        return f"{where}: groups={layer.groups} is not translated (only 1)"
    if kind == "Dense" and len(in_shape) != 2:
        return (f"{where}: applied to a {len(in_shape)}-D tensor {tuple(in_shape)} is not translated "
                "(only after Flatten, on [batch, features])")
    if kind == "Rescaling":
        for option in ("scale", "offset"):
            value = np.asarray(getattr(layer, option), dtype=np.float32)
            if value.ndim > 1 or (value.ndim == 1 and value.shape[0] not in (1, int(in_shape[-1]))):
                return (f"{where}: {option} of shape {value.shape} is not translated "
                        f"(a scalar or one value per channel)")
    if kind in ACTIVATIONS:
        name = _activation_name(layer)
        if name not in ACTIVATIONS[kind]:
            return (f"{where}: activation {name!r} is not translated "
                    f"(translated: {', '.join(sorted(ACTIVATIONS[kind]))})")
    return None


def _numpy(variable) -> np.ndarray:
    return np.asarray(variable.numpy() if hasattr(variable, "numpy") else variable, dtype=np.float32)


def _channel_const(value, layout: str) -> np.ndarray:
    """A Rescaling scale or offset (scalar or per channel) that broadcasts in `layout`."""
    v = np.asarray(value, dtype=np.float32)
    return v.reshape(-1, 1, 1) if v.ndim == 1 and layout == "NCHW" else v


def _pads(layer, in_shape: tuple, kernel: tuple, dilation: tuple) -> list[int]:
    """Explicit ONNX pads [top, left, bottom, right] for TF's padding (the extra pixel at the
    end); explicit rather than auto_pad, which onnxruntime rejects with dilations."""
    if layer.padding == "valid":
        return [0, 0, 0, 0]
    begin, end = [], []
    for size, k, s, d in zip(in_shape[1:3], kernel, layer.strides, dilation):
        size = int(size)
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        begin.append(total // 2)
        end.append(total - total // 2)
    return begin + end


def _activation_name(layer) -> str:
    return getattr(layer.activation, "__name__", str(layer.activation))


def _activation(g: "_Graph", x: str, layer) -> str:
    name = _activation_name(layer)
    if name == "linear":
        return x
    op = {"relu": "Relu", "sigmoid": "Sigmoid", "softmax": "Softmax"}[name]  # refusal() checked
    return g.node(op, [x], axis=-1) if op == "Softmax" else g.node(op, [x])


class _Graph:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, numpy_helper):
        from onnx import helper

        self._helper = helper
        self._np = numpy_helper
        self.nodes: list = []
        self.initializers: list = []
        self._n = 0

    def _name(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def const(self, value, base: str) -> str:
        name = self._name(base)
        self.initializers.append(self._np.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self._name(op.lower())
        self.nodes.append(self._helper.make_node(op, inputs, [out], name=out, **attrs))
        return out
