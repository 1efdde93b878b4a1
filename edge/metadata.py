"""Metadata that travels inside each model file, so a file copied alone still classifies right.

A `.tflite` file carries it as a small zip appended after the flatbuffer (the interpreter reads
only the flatbuffer; `zipfile` finds the archive from the end), as Ultralytics does. An `.onnx`
file carries it as the `xray_edge` metadata property. Both hold the same JSON dict, parsed as
data, never evaluated.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from xray_edge.errors import ModelError, first_line
from xray_edge.files import MAX_JSON_BYTES, parse_json
from xray_edge.preprocess import DEFAULT, Preprocessing

TFLITE_MEMBER = "xray_edge.json"
KERAS_MEMBER = "xray_edge.json"  # the trainer's extra member in the .keras zip
ONNX_KEY = "xray_edge"


@dataclass(frozen=True)
class ModelInfo:
    """What the runner needs to turn the model's output into a decision."""

    labels: tuple[str, ...]
    threshold: float | None = 0.5  # sigmoid models: labels[1] when p >= threshold
    preprocessing: Preprocessing = DEFAULT
    format: str = ""
    synthetic_data: bool = False
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def binary(self) -> bool:
        return len(self.labels) == 2

    def to_dict(self) -> dict:
        return {
            "labels": list(self.labels),
            "threshold": self.threshold,
            "preprocessing": self.preprocessing.to_dict(),
            "format": self.format,
            "synthetic_data": self.synthetic_data,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ModelInfo":
        """Embedded metadata, checked by the manifest's rules; ModelError names the first problem."""
        from xray_edge.manifest import check_labels, check_threshold

        try:
            labels = check_labels(d.get("labels"))
            threshold = check_threshold(d.get("threshold", 0.5))
            pre = Preprocessing.from_dict(d.get("preprocessing", {}))
        except (TypeError, ValueError) as exc:
            raise ModelError(f"model metadata is malformed: {first_line(exc)}") from None
        known = {"labels", "threshold", "preprocessing", "format", "synthetic_data"}
        return cls(labels=labels, threshold=threshold, preprocessing=pre,
                   format=str(d.get("format", "")),
                   synthetic_data=bool(d.get("synthetic_data", False)),
                   extra={k: v for k, v in d.items() if k not in known})


def tflite_with_metadata(flatbuffer: bytes, meta: dict) -> bytes:
    """Return the .tflite bytes with the metadata zip appended."""
    buf = io.BytesIO()
    # a fixed date: the same model and metadata give the same bytes (and sha256) on every export
    member = zipfile.ZipInfo(TFLITE_MEMBER, date_time=(1980, 1, 1, 0, 0, 0))
    member.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(member, json.dumps(meta, sort_keys=True, indent=1))
    return flatbuffer + buf.getvalue()


def read_tflite_metadata(path: Path, data=None) -> dict | None:
    """The dict appended by `tflite_with_metadata`, or None if the file has none.

    `data`: the file's bytes, or a binary file open on it, when already read or opened (then
    `path` only names it in errors). zipfile reads only the archive's end of a file.
    """
    source = path if data is None else io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        with zipfile.ZipFile(source) as z:
            raw = _read_member(z, TFLITE_MEMBER, path)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, EOFError, RuntimeError,
            NotImplementedError, zlib.error):
        return None  # no readable archive appended: the file has no metadata
    return _parse(raw, path)


def parse_onnx_metadata(props: dict, path: Path) -> dict | None:
    raw = props.get(ONNX_KEY)
    return None if raw is None else _parse(raw, path)


def _read_member(z: zipfile.ZipFile, name: str, path: Path) -> bytes:
    """A member's bytes, refused (not inflated) when it declares more than the JSON limit."""
    size = z.getinfo(name).file_size
    if size > MAX_JSON_BYTES:
        raise ModelError(f"{path}: embedded metadata of {size:,} bytes is over the "
                         f"{MAX_JSON_BYTES:,}-byte limit")
    with z.open(name) as f:  # zipfile stops at the declared size and checks the CRC
        return f.read(MAX_JSON_BYTES + 1)


def _parse(raw: bytes | str, path: Path) -> dict:
    try:
        d = parse_json(raw)
    except ValueError as exc:  # UnicodeDecodeError and too deep or too large included
        raise ModelError(f"{path}: embedded metadata is not usable JSON ({first_line(exc)})") from None
    if not isinstance(d, dict):
        raise ModelError(f"{path}: embedded metadata is not a JSON object")
    return d


def read_keras_metadata(path: Path) -> dict:
    """The metadata the trainer stored in a .keras file ({} for a plain Keras file)."""
    try:
        with zipfile.ZipFile(path) as z:
            raw = _read_member(z, KERAS_MEMBER, path)
    except (KeyError, zipfile.BadZipFile, ValueError, OSError, EOFError, RuntimeError, zlib.error):
        return {}
    return _parse(raw, path)
