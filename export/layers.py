"""A Keras model as the chain of layers the converters translate, and the error that names what
they do not translate. Imported by the ONNX emitter and by `model_check`; imports neither."""

from __future__ import annotations

from xray_edge.errors import XrayEdgeError


class UnsupportedLayer(XrayEdgeError):
    """A model shape, layer or option a converter does not translate; the message names it."""


def layer_chain(model) -> list[tuple[object, tuple]]:
    """The model's layers from input to output, each with the shape of the tensor it receives.

    Walks back from the output through each layer's single input, so it sees exactly what the
    output depends on, in order, and how often each layer is called.

    Raises:
        UnsupportedLayer: a layer with several inputs (a merge) or one called more than once.
    """
    chain: list[tuple[object, tuple]] = []
    seen: set[int] = set()
    tensor = model.outputs[0]
    while True:
        history = tensor._keras_history  # Keras 3: (operation, node_index, tensor_index)
        layer = history.operation
        if type(layer).__name__ == "InputLayer":
            break
        where = f"layer {layer.name!r} ({type(layer).__name__})"
        if id(layer) in seen:
            raise UnsupportedLayer(f"{where} is called more than once: export translates a "
                                   "chain in which each layer is used once")
        seen.add(id(layer))
        inputs = layer._inbound_nodes[history.node_index].input_tensors
        if len(inputs) != 1:
            raise UnsupportedLayer(f"{where} takes {len(inputs)} inputs: export translates a "
                                   "single chain of layers (no merges or branches)")
        chain.append((layer, tuple(inputs[0].shape)))
        tensor = inputs[0]
    return chain[::-1]
