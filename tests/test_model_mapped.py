"""`classify` loads a .tflite file through the runtime's own mapping (no copy in memory), and keeps
refusing a file whose bytes do not match the manifest (xray_edge.backends.MappedModel)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from xray_edge import backends, model
from xray_edge.backends import RACY_CTIME_NS, map_model
from xray_edge.errors import ModelError
from xray_edge.inputs import walk_images
from xray_edge.model import open_model
from xray_edge.preprocess import load_image

INT8 = "xray_int8.tflite"


def _settled(path: Path) -> None:
    """Wait until the file's last change is older than the racy window, so it may be mapped."""
    age_ns = time.time_ns() - os.stat(path).st_ctime_ns
    if age_ns < RACY_CTIME_NS:
        time.sleep((RACY_CTIME_NS - age_ns) / 1e9 + 0.05)


def _copy(artifacts: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in ("manifest.json", INT8):
        shutil.copy(artifacts / f, dst / f)
    return dst


def test_mapped_load_gives_the_copied_load_s_outputs(tiny_artifacts, phantom_data):
    _settled(tiny_artifacts / INT8)
    img = load_image(next(walk_images(phantom_data / "test")))
    mapped, copied = open_model(tiny_artifacts, INT8, mapped=True), open_model(tiny_artifacts, INT8)
    assert mapped.backend._content is None and isinstance(copied.backend._content, bytes)  # no copy kept
    assert mapped.sha256 == copied.sha256
    assert np.array_equal(mapped.backend.raw_output(img), copied.backend.raw_output(img))
    assert mapped.info == copied.info


def test_a_changed_file_is_refused_when_mapped(tiny_artifacts, phantom_data, tmp_path):
    art = _copy(tiny_artifacts, tmp_path / "a")
    with open(art / INT8, "r+b") as f:  # in place, same size: only the bytes differ
        f.seek(5000)
        f.write(b"\x00\x01\x02")
    _settled(art / INT8)
    source = map_model(art / INT8)
    assert source is not None  # this run takes the mapped path
    source.close()
    r = run_cli("classify", "-m", art, next(walk_images(phantom_data / "test")))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "sha256" in r.stderr and "does not match the manifest" in r.stderr


def test_a_file_written_while_it_loads_is_refused(tiny_artifacts, tmp_path, monkeypatch):
    art = _copy(tiny_artifacts, tmp_path / "a")
    _settled(art / INT8)
    real_map = backends.map_model

    def map_then_rewrite(path):  # a writer between the open and the end of the load
        source = real_map(path)
        data = path.read_bytes()
        with open(path, "r+b") as f:  # the same bytes again: the digest still matches
            f.write(data)
        return source

    monkeypatch.setattr(model, "map_model", map_then_rewrite)
    with pytest.raises(ModelError, match="changed while it was being loaded"):
        open_model(art, mapped=True)
    monkeypatch.undo()
    _settled(art / INT8)
    assert open_model(art, mapped=True).sha256  # left alone, the same file loads


def test_a_file_changed_just_now_is_read_not_mapped(tiny_artifacts, tmp_path):
    art = _copy(tiny_artifacts, tmp_path / "a")
    assert map_model(art / INT8) is None  # its ctime is within the racy window
    loaded = open_model(art, mapped=True)
    assert isinstance(loaded.backend._content, bytes)
    (tmp_path / "empty.tflite").write_bytes(b"")
    with pytest.raises(ModelError):
        open_model(tmp_path / "empty.tflite", mapped=True)
