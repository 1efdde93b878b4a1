"""Mutated image files, manifests, model folders and embedded metadata: only the tool's own
error types may come out, and whatever loads answers right-shaped."""

from __future__ import annotations

import io
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from xray_edge.errors import ImageError, XrayEdgeError
from xray_edge.metadata import tflite_with_metadata
from xray_edge.preprocess import load_image


def _seed_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (48, 64), dtype=np.uint8)
    out = {}
    for fmt, suffix, mode in (("JPEG", ".jpg", "L"), ("PNG", ".png", "RGBA"), ("PNG", ".png", "P"),
                              ("BMP", ".bmp", "RGB"), ("TIFF", ".tif", "L"), ("GIF", ".gif", "P")):
        buf = io.BytesIO()
        Image.fromarray(arr).convert(mode).save(buf, format=fmt)
        out[f"seed{len(out)}{suffix}"] = buf.getvalue()
    return out


SEEDS = _seed_files()
NAMES = sorted(SEEDS)


@st.composite
def mutated(draw):
    name = draw(st.sampled_from(NAMES))
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "zero"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "zero":
            data[pos:pos + draw(st.integers(1, 64))] = b"\0" * min(64, len(data) - pos)
    return name, bytes(data)


@settings(max_examples=3000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mutated())
def test_mutated_files_give_an_array_or_image_error(tmp_path, case):
    name, data = case
    p = tmp_path / name
    p.write_bytes(data)
    try:
        x = load_image(p)
    except ImageError as err:
        assert str(p) in str(err) and "\n" not in str(err)
        return
    assert x.shape == (200, 200, 3) and x.dtype == np.uint8


# ---------------------------------------------------------------- manifests and model folders
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["COVID19", "NORMAL", "bilinear", "uint8", "1", "xray.onnx"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)

FIELDS = ["schema", "labels", "threshold", "default", "files", "input", "input.preprocessing",
          "input.preprocessing.size", "input.preprocessing.channels", "input.preprocessing.resample",
          "input.preprocessing.dtype", "input.preprocessing.version", "files.xray_int8.tflite",
          "files.xray_int8.tflite.sha256", "files.xray_int8.tflite.size", "output", "training",
          "labels.0", "labels.1"]


def _set(d, dotted: str, value, delete: bool) -> None:
    parts = dotted.replace("xray_int8.tflite", "xray_int8\0tflite").split(".")
    parts = [p.replace("\0", ".") for p in parts]
    for p in parts[:-1]:
        d = d[int(p)] if isinstance(d, list) and p.isdigit() else d.get(p) if isinstance(d, dict) else None
        if d is None or not isinstance(d, (dict, list)):
            return
    last = parts[-1]
    if isinstance(d, list):
        if last.isdigit() and int(last) < len(d):
            d[int(last)] = value
    elif delete:
        d.pop(last, None)
    else:
        d[last] = value


class _Files(dict):
    def __repr__(self) -> str:  # hypothesis prints fixtures of a failing example: keep it short
        return f"<model folder: {', '.join(self)}>"


@pytest.fixture(scope="module")
def model_folder(tiny_artifacts):
    return _Files({f: (tiny_artifacts / f).read_bytes() for f in ("manifest.json", "xray_int8.tflite", "xray.onnx")})


def _only_our_errors(fn) -> None:
    try:
        fn()
    except XrayEdgeError as err:
        assert "\n" not in str(err) and str(err).strip(), repr(err)


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(FIELDS), json_values, st.booleans()), min_size=1, max_size=4),
       folder_op=st.sampled_from(["none", "none", "truncate", "dir", "missing", "onnx"]))
def test_mutated_manifest_and_folder_give_a_model_or_model_error(model_folder, edits, folder_op):
    from xray_edge.model import open_model

    manifest = json.loads(model_folder["manifest.json"])
    for field, value, delete in edits:
        _set(manifest, field, value, delete)
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp)
        for name, data in model_folder.items():
            (art / name).write_bytes(data)
        (art / "manifest.json").write_text(json.dumps(manifest))  # NaN/Infinity as their literals
        if folder_op == "truncate":
            (art / "xray_int8.tflite").write_bytes(model_folder["xray_int8.tflite"][:1000])
        elif folder_op == "dir":
            (art / "xray_int8.tflite").unlink()
            (art / "xray_int8.tflite").mkdir()
        elif folder_op == "missing":
            (art / "xray_int8.tflite").unlink()
        name = "xray.onnx" if folder_op == "onnx" else None
        _only_our_errors(lambda: _check_loaded(open_model(art, name)))


_IMAGE = io.BytesIO()
Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 48), dtype=np.uint8)).save(_IMAGE, format="PNG")


def _check_loaded(loaded) -> None:
    """A model that loads must give a right-shaped answer on a real image."""
    from xray_edge.classify import Classifier

    info = loaded.info
    assert len(info.labels) >= 2 and len(set(info.labels)) == len(info.labels)
    assert info.threshold is None or (math.isfinite(info.threshold) and 0 <= info.threshold <= 1)
    with tempfile.TemporaryDirectory() as tmp:
        img = Path(tmp) / "x.png"
        img.write_bytes(_IMAGE.getvalue())
        label, scores = Classifier(loaded.backend, info).classify_array(load_image(img, info.preprocessing))
    assert label in info.labels and list(scores) == list(info.labels)
    assert abs(sum(scores.values()) - 1) < 1e-3


@settings(max_examples=100, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(meta=st.dictionaries(st.sampled_from(["labels", "threshold", "preprocessing", "format",
                                             "synthetic_data"]), json_values, max_size=5))
def test_lone_model_with_random_embedded_metadata(model_folder, meta):
    """A .tflite file copied alone: its appended metadata is all there is to go on."""
    from xray_edge.model import open_model

    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "lone.tflite"
        p.write_bytes(tflite_with_metadata(model_folder["xray_int8.tflite"], meta))

        def check():
            loaded = open_model(p)
            _check_loaded(loaded)
            assert list(loaded.info.labels) == meta["labels"]  # used as written, never reinterpreted

        _only_our_errors(check)
