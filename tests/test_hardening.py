"""Second hardening pass (issue #22): special files, deep JSON, writes that fail, JSON without NaN,
interrupted and concurrent training, the GPU machine's path.

Commands run in a subprocess with a timeout, so a regression that blocks on a FIFO fails the test
instead of hanging the suite. Models are tiny hand-built ONNX files (no TensorFlow), except where
a TFLite file's appended metadata is the subject.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edge_helpers import onnx_model, run_as_nobody, shared_tmp  # noqa: F401 - shared_tmp is a fixture
from xray_edge.errors import XrayEdgeError
from xray_edge.files import MAX_JSON_DEPTH, parse_json, read_regular
from xray_edge.training_record import TrainingRecord

TIMEOUT = 90  # seconds: far above a normal run, far below a hang


def cli(*args, input: str | None = None, env=None, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-m", "xray_edge.cli", *map(str, args)], capture_output=True,
                              text=True, input=input, env={**os.environ, **(env or {})}, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"xray-edge {' '.join(map(str, args))} hung (killed after {timeout} s)")


def one_line_exit_2(r) -> str:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def errors(r) -> list[str]:
    return [l for l in r.stderr.splitlines() if l.startswith("error:")]


def deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.fixture
def scan(tmp_path) -> Path:
    p = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (240, 300), np.uint8)).save(p)
    return p


@pytest.fixture
def model(tmp_path) -> Path:
    """A lone ONNX file with its metadata embedded, in its own folder."""
    folder = tmp_path / "model"
    folder.mkdir()
    return onnx_model(folder / "tiny.onnx")


# ---------------------------------------------------------------- special files
def test_fifo_named_as_a_model_file_is_refused_in_one_line(tmp_path, scan):
    for name in ("model.onnx", "model.tflite"):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        msg = one_line_exit_2(cli("classify", "-m", fifo, scan))
        # a .tflite may be refused earlier for want of its runtime; never by blocking
        assert "FIFO" in msg or "runtime" in msg.lower() or "install" in msg, msg
        assert "FIFO" in one_line_exit_2(cli("info", fifo)) or name.endswith(".tflite")


def test_fifo_named_manifest_or_site_json_is_refused_in_one_line(tmp_path, model, scan):
    os.mkfifo(model.parent / "site.json")
    msg = one_line_exit_2(cli("classify", "-m", model, scan))
    assert "site.json" in msg and "not a regular file (a FIFO)" in msg
    (model.parent / "site.json").unlink()
    os.mkfifo(model.parent / "manifest.json")
    for args in (["classify", "-m", model, scan], ["info", model], ["classify", "-m", model.parent, scan]):
        msg = one_line_exit_2(cli(*args))
        assert "manifest.json" in msg and "FIFO" in msg, msg


def test_special_files_among_inputs_are_error_lines_and_the_rest_go_on(tmp_path, model, scan):
    folder = tmp_path / "inputs"
    folder.mkdir()
    shutil.copy(scan, folder / "a.png")
    os.mkfifo(folder / "b")  # no suffix: would be sniffed for a DICOM preamble
    os.mkfifo(folder / "c.png")
    (folder / "d").symlink_to("/dev/zero")  # endless
    (folder / "e.png").symlink_to("/dev/zero")
    shutil.copy(scan, folder / "f.png")
    os.mkfifo(tmp_path / "named")
    r = cli("classify", "-m", model, folder, tmp_path / "named", tmp_path / "g*")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert [Path(l.split("\t")[0]).name for l in r.stdout.splitlines()] == ["a.png", "f.png"]
    errs = errors(r)
    assert len(errs) == 6, errs  # b, c.png, d, e.png, named, and the empty pattern
    assert sum("FIFO" in e for e in errs) == 3 and sum("character device" in e for e in errs) == 2


def test_symlink_to_an_endless_device_as_model_is_refused(tmp_path, scan):
    link = tmp_path / "model.onnx"
    link.symlink_to("/dev/zero")
    assert "character device" in one_line_exit_2(cli("classify", "-m", link, scan))


def test_read_regular_bounds_the_size(tmp_path):
    p = tmp_path / "big.json"
    p.write_bytes(b" " * 101)
    with pytest.raises(OSError, match="over the 100-byte limit"):
        read_regular(p, 100)
    assert read_regular(p, 101) == b" " * 101


# ---------------------------------------------------------------- JSON too deep
def test_parse_json_bounds_depth_and_ignores_brackets_in_strings():
    assert parse_json(deep(MAX_JSON_DEPTH)) == json.loads(deep(MAX_JSON_DEPTH))
    with pytest.raises(ValueError, match="nested 100000 levels"):
        parse_json(deep(100_000))
    assert parse_json('{"a": "[[[[\\"[[[[" }', max_depth=1) == {"a": '[[[["[[[['}


def test_deep_site_json_is_one_line_exit_2(model, scan):
    (model.parent / "site.json").write_text('{"schema": 1, "x": ' + deep(50_000) + "}")
    assert "site.json" in one_line_exit_2(cli("classify", "-m", model, scan))


def test_deep_manifest_is_one_line_exit_2(model, scan):
    (model.parent / "manifest.json").write_text(deep(50_000))
    for args in (["classify", "-m", model.parent, scan], ["info", model.parent]):
        assert "nested" in one_line_exit_2(cli(*args))


def test_deep_metadata_in_an_onnx_file_is_one_line_exit_2(tmp_path, scan):
    onnx = pytest.importorskip("onnx")
    path = onnx_model(tmp_path / "deep.onnx")
    m = onnx.load(str(path))
    m.metadata_props[0].value = '{"labels": ["A", "B"], "x": ' + deep(50_000) + "}"
    onnx.save(m, str(path))
    for args in (["classify", "-m", path, scan], ["info", path]):
        msg = one_line_exit_2(cli(*args))
        assert "embedded metadata" in msg and "nested" in msg, msg


def test_deep_metadata_appended_to_a_tflite_file_is_one_line_exit_2(tiny_artifacts, tmp_path, scan):
    data = (tiny_artifacts / "xray_float32.tflite").read_bytes()
    end = data.rfind(b"PK\x05\x06")  # the appended zip's end record: cut the zip off
    start = data.rfind(b"PK\x03\x04", 0, end)
    path = tmp_path / "deep.tflite"
    path.write_bytes(_with_raw_metadata(data[:start], deep(50_000)))
    r = cli("info", path)
    if "install" in r.stderr and "runtime" in r.stderr.lower():
        pytest.skip("no TFLite runtime here")
    assert "nested" in one_line_exit_2(r)
    assert "nested" in one_line_exit_2(cli("classify", "-m", path, scan))


def _with_raw_metadata(flatbuffer: bytes, text: str) -> bytes:
    import io
    import zipfile

    from xray_edge.metadata import TFLITE_MEMBER

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(TFLITE_MEMBER, text)
    return flatbuffer + buf.getvalue()


def test_deep_training_json_is_one_line(tmp_path):
    (tmp_path / "training.json").write_text('{"classes": ["A", "B"], "x": ' + deep(50_000) + "}")
    with pytest.raises(XrayEdgeError, match="nested"):
        TrainingRecord.read(tmp_path)
    (tmp_path / "training.json").unlink()
    os.mkfifo(tmp_path / "training.json")
    with pytest.raises(XrayEdgeError, match="FIFO"):
        TrainingRecord.read(tmp_path)
