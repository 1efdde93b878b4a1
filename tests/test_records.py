"""training.json and manifest.json as typed records: they read back whole, and refuse bad fields."""

from __future__ import annotations

import json

import pytest

from xray_edge.errors import ModelError, XrayEdgeError
from xray_edge.manifest import MANIFEST_NAME, FileEntry, Manifest, read_manifest, write_manifest
from xray_edge.preprocess import Preprocessing
from xray_edge.training_record import TRAINING_RECORD_NAME, TrainingRecord

SHA = "ab" * 32


def _manifest(**kw) -> Manifest:
    base = dict(labels=("COVID19", "NORMAL"), threshold=0.42, preprocessing=Preprocessing(size=64),
                files={"xray_int8.tflite": FileEntry("int8", SHA, 123, "litert 2.3.0", parity={"passed": True})},
                default="xray_int8.tflite", positive_class="COVID19", training={"synthetic": True})
    return Manifest(**{**base, **kw})


def test_manifest_round_trip(tmp_path):
    m = _manifest()
    write_manifest(tmp_path, m)
    back = read_manifest(tmp_path / MANIFEST_NAME)
    assert back == m and back.synthetic and back.preprocessing.size == 64
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["input"]["shape"] == [1, 64, 64, 3]


@pytest.mark.parametrize("field, value, words", [
    ("threshold", "high", "threshold"), ("threshold", 7, "threshold"), ("threshold", True, "threshold"),
    ("labels", "AB", "labels"), ("labels", ["A"], "labels"), ("labels", ["A", "A"], "repeats"),
    ("files", [], "files"), ("schema", 2, "schema"), ("default", 3, "default"),
])
def test_manifest_field_of_wrong_type_is_one_line(tmp_path, field, value, words):
    d = _manifest().to_dict()
    d[field] = value
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(ModelError, match=words) as err:
        read_manifest(tmp_path / MANIFEST_NAME)
    assert "\n" not in str(err.value)


def test_manifest_nan_threshold_refused(tmp_path):
    d = _manifest().to_dict()
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(d).replace('"threshold": 0.42', '"threshold": NaN'))
    with pytest.raises(ModelError, match="threshold"):
        read_manifest(tmp_path / MANIFEST_NAME)


def test_training_record_round_trip_and_split(tmp_path):
    img = tmp_path / "a.png"
    img.write_bytes(b"x")
    rec = TrainingRecord(classes=["COVID19", "NORMAL"], positive_class="NORMAL",
                         files={"test": [str(img), str(tmp_path / "gone.png")]}, labels={"test": [1, 0]},
                         seconds={"train": 1.5})
    rec.write(tmp_path)
    back = TrainingRecord.read(tmp_path)
    assert back == rec and back.positive_index == 1
    assert back.split("test") == ([img], [1])  # files that no longer exist are left out
    assert TrainingRecord.read(tmp_path / "elsewhere") is None


def test_training_record_malformed_is_one_line(tmp_path):
    (tmp_path / TRAINING_RECORD_NAME).write_text(json.dumps({"classes": "AB"}))
    with pytest.raises(XrayEdgeError, match="classes"):
        TrainingRecord.read(tmp_path)
