"""Can every requested format be made from this model? Answered before any conversion starts.

A converter that meets something it does not handle fails late (after minutes and after files
were written), with an unrelated TypeError, a file the runtime refuses, or, worst, a graph that
runs and computes something else. So the whole model is checked once, up front, and the first
problem is named in one line: the layer and the option.
"""

from __future__ import annotations

from typing import Iterable

from xray_edge.export.layers import UnsupportedLayer, layer_chain
from xray_edge.export.onnx import refusal
from xray_edge.preprocess import Preprocessing

ONNX_FORMATS = {"onnx", "onnx-int8"}  # the formats made by the layer-by-layer ONNX emitter


def check_model(model, spec: Preprocessing, formats: Iterable[str], classes: list[str] | None = None) -> None:
    """Refuse, before converting, a model some requested format cannot be made from.

    Every format needs one image input of the preprocessing's fixed shape and one [batch, K]
    output; the ONNX emitter also needs a single chain of layers it translates, each used once.

    Raises:
        UnsupportedLayer: one line naming the layer and the option (an `XrayEdgeError`).
    """
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise UnsupportedLayer(f"model {model.name!r} has {len(model.inputs)} inputs and "
                               f"{len(model.outputs)} outputs: export needs one image in, one output")
    in_shape = tuple(model.inputs[0].shape[1:])
    if in_shape != spec.shape:
        raise UnsupportedLayer(f"model {model.name!r}: input shape {_shape(in_shape)} is not the "
                               f"preprocessing's fixed {_shape(spec.shape)} (height, width, channels)")
    out_shape = tuple(model.outputs[0].shape[1:])
    if len(out_shape) != 1 or out_shape[0] is None:
        raise UnsupportedLayer(f"model {model.name!r}: output shape {_shape(out_shape)} is not "
                               "[classes] (one probability per label, or one sigmoid unit)")
    units = out_shape[0]
    if isinstance(classes, list) and classes and not (units == len(classes) or (units == 1 and len(classes) == 2)):
        raise UnsupportedLayer(f"model {model.name!r} has {units} outputs but its training record "
                               f"names {len(classes)} classes ({', '.join(map(str, classes))}): one "
                               "output per class, or one sigmoid unit for two")
    if ONNX_FORMATS & set(formats):
        try:
            chain = layer_chain(model)
        except UnsupportedLayer as exc:
            raise UnsupportedLayer(f"ONNX: {exc}") from None
        for layer, layer_in in chain:
            reason = refusal(layer, layer_in)
            if reason:
                raise UnsupportedLayer(f"ONNX: {reason}")


def _shape(shape: tuple) -> str:
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"
