"""Export refuses, before converting anything, what it cannot make; runtime failures are refusals.

Each model below is a change a user makes to the tutorial's layers. Before the whole-model check
these escaped as unrelated TypeErrors, files onnxruntime refused, or graphs that ran and computed
something else (caught only by parity).
"""

from __future__ import annotations

import re

import pytest

from conftest import run_cli, save_with_record, tiny_model
from test_export import _snapshot

CLASSES = ["COVID19", "NORMAL"]


def _seq(*layers, shape=(200, 200, 3)):
    import keras

    keras.utils.set_random_seed(1)
    return keras.Sequential([keras.Input(shape), *layers])


def _conv_used_twice():
    import keras
    from keras import layers as L

    keras.utils.set_random_seed(1)
    inp = keras.Input((200, 200, 3))
    conv = L.Conv2D(3, 3, padding="same")
    x = L.Flatten()(L.MaxPooling2D(8)(conv(conv(L.Rescaling(1 / 255)(inp)))))
    return keras.Model(inp, L.Dense(1, activation="sigmoid")(x))


def _merge():
    import keras
    from keras import layers as L

    inp = keras.Input((200, 200, 3))
    x = L.Rescaling(1 / 255)(inp)
    x = L.Add()([L.Conv2D(3, 3, padding="same")(x), x])
    return keras.Model(inp, L.Dense(1, activation="sigmoid")(L.Flatten()(L.MaxPooling2D(8)(x))))


def _refused_models():
    from keras import layers as L

    def head():  # new layers for each model: a layer object belongs to one model
        return (L.MaxPooling2D(8), L.Flatten(), L.Dense(1, activation="sigmoid"))

    return {
        "batch norm": (_seq(L.Rescaling(1 / 255), L.Conv2D(4, 3), L.BatchNormalization(), *head()),
                       r"'batch_normalization\w*' \(BatchNormalization\) is not translated"),
        "global pooling": (_seq(L.Rescaling(1 / 255), L.Conv2D(4, 3), L.GlobalAveragePooling2D(),
                                L.Dense(1, activation="sigmoid")), r"GlobalAveragePooling2D"),
        "softmax on a conv": (_seq(L.Rescaling(1 / 255), L.Conv2D(4, 3, activation="softmax"), *head()),
                              r"\(Conv2D\): activation 'softmax' is not translated"),
        "conv used twice": (_conv_used_twice(), r"\(Conv2D\) is called more than once"),
        "merge": (_merge(), r"\(Add\) takes 2 inputs"),
        "dense on a 4-D tensor": (_seq(L.Rescaling(1 / 255), L.Conv2D(4, 3), L.Dense(2), *head()),
                                  r"\(Dense\): applied to a 4-D tensor"),
        "other activation": (_seq(L.Rescaling(1 / 255), L.Conv2D(4, 3, activation="tanh"), *head()),
                             r"activation 'tanh'"),
        "dynamic input": (_seq(L.Rescaling(1 / 255), L.Conv2D(4, 3), L.GlobalMaxPooling2D(),
                               L.Dense(1, activation="sigmoid"), shape=(None, None, 3)),
                          r"input shape \(None, None, 3\) is not the preprocessing's fixed \(200, 200, 3\)"),
    }


REFUSED = ["batch norm", "global pooling", "softmax on a conv", "conv used twice", "merge",
           "dense on a 4-D tensor", "other activation", "dynamic input"]


@pytest.mark.parametrize("case", REFUSED)
def test_check_names_the_layer_and_option_in_one_line(case):
    from xray_edge.errors import XrayEdgeError
    from xray_edge.export.model_check import check_model
    from xray_edge.preprocess import DEFAULT

    model, pattern = _refused_models()[case]
    with pytest.raises(XrayEdgeError, match=pattern) as info:
        check_model(model, DEFAULT, ["float32", "onnx"])
    assert "\n" not in str(info.value)


def test_tflite_only_exports_do_not_need_the_onnx_emitter():
    from xray_edge.export.model_check import check_model
    from xray_edge.preprocess import DEFAULT

    model, _ = _refused_models()["batch norm"]
    check_model(model, DEFAULT, ["float32", "int8"])  # the TFLite converter translates BatchNorm


def test_refusal_comes_before_any_file_is_written(tmp_path, phantom_data):
    """The issue's case: a BatchNormalization model exported over a good set changes nothing."""
    from xray_edge.export.pipeline import ExportConfig, ExportFailed, run_export

    good = save_with_record(tiny_model(seed=5), tmp_path / "good", CLASSES, phantom_data)
    out = good.parent
    assert run_export(ExportConfig(model=good, out=out, formats=("float32", "onnx")), log=lambda s: None).passed
    before = _snapshot(out)
    model, _ = _refused_models()["batch norm"]
    bn = save_with_record(model, tmp_path / "bn", CLASSES, phantom_data)
    steps: list[str] = []
    with pytest.raises(ExportFailed, match=r"^check model: ONNX: layer 'batch_normalization"):
        run_export(ExportConfig(model=bn, out=out, on_step=steps.append), log=lambda s: None)
    assert not any(s.startswith("convert") for s in steps), steps
    assert _snapshot(out) == before


def test_cli_refusal_is_one_line_and_exit_1(tmp_path, phantom_data):
    model, _ = _refused_models()["softmax on a conv"]
    path = save_with_record(model, tmp_path, CLASSES, phantom_data)
    r = run_cli("export", "--model", path)
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "check model" in errors[0] and "activation 'softmax'" in errors[0]
    assert set(_snapshot(tmp_path)) == {"model.keras", "training.json"}


def test_emitter_handles_the_cheap_options(tmp_path, phantom_data):
    """Per-channel offset, missing biases (zeros), dilation with 'same': exact in onnxruntime."""
    from keras import layers as L

    from conftest import export_folder

    model = _seq(L.Rescaling(1 / 255, offset=[-0.5, -0.4, -0.3]),
                 L.Conv2D(4, 3, dilation_rate=2, padding="same", use_bias=False, activation="relu"),
                 L.MaxPooling2D(8, padding="same"), L.Conv2D(4, 3, strides=2, padding="same"),
                 L.Flatten(), L.Dense(8, use_bias=False, activation="relu"),
                 L.Dense(1, activation="sigmoid", kernel_initializer="random_normal"))
    path = save_with_record(model, tmp_path, CLASSES, phantom_data)
    res = export_folder(path, formats=("onnx",), threshold=0.5)
    assert res.passed, [r.line() for r in res.results]
    assert res.results[0].max_abs_diff <= 1e-5


# ------------------------------------------------ a file the runtime refuses is a `rejected` entry
def _wrong_input_onnx(name, data):
    """An ONNX file that loads but fails at run time: built for 100x100 images."""
    from keras import layers as L

    from xray_edge.export.onnx import keras_to_onnx

    small = _seq(L.Rescaling(1 / 255), L.Flatten(), L.Dense(1, activation="sigmoid"), shape=(100, 100, 3))
    return keras_to_onnx(small, {"labels": CLASSES})


@pytest.mark.parametrize("fmt,tamper,message", [
    ("float32", lambda n, d: b"not a flatbuffer" * 8, r".+"),
    ("onnx", lambda n, d: b"not an onnx model", r".+"),
    ("onnx", _wrong_input_onnx, r"dimension|shape|Got invalid"),
])
def test_runtime_failure_becomes_a_rejected_entry(tmp_path, phantom_data, fmt, tamper, message):
    from conftest import export_folder

    path = save_with_record(tiny_model(seed=5), tmp_path, CLASSES, phantom_data)
    res = export_folder(path, formats=(fmt,), tamper=tamper, threshold=0.5)
    assert not res.passed
    rejected = res.manifest.rejected[fmt]
    assert rejected["passed"] is False and rejected["gates"][0]["gate"].startswith("loads and runs in")
    assert rejected["error"] and "\n" not in rejected["error"]
    assert re.search(message, rejected["error"]), rejected["error"]
    assert set(_snapshot(tmp_path)) == {"model.keras", "training.json"}
