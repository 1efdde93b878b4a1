"""`manifest.json`: what binds labels, threshold, preprocessing and sha256 to the model files.

The one place that knows the manifest's file name, schema version and fields. Export builds a
`Manifest` and writes it (see `xray_edge.export.pipeline`); the edge runner reads and verifies it
here. Reading checks every field's type, so a hand-edited manifest fails in one line, before any
image is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from xray_edge.errors import ModelError, first_line
from xray_edge.files import MAX_JSON_BYTES, atomic_write_json, check_schema, parse_json, read_regular
from xray_edge.preprocess import Preprocessing

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class FileEntry:
    """One proven model file: what it is, its sha256, and the parity it showed at export."""

    format: str
    sha256: str
    size: int
    runtime: str = ""
    description: str = ""
    input: dict | None = None  # name, dtype, shape, quantization as the runtime reports them
    output: dict | None = None
    parity: dict | None = None  # see xray_edge.export.parity.ParityResult.to_dict
    seconds: dict | None = None  # convert, prove

    def to_dict(self) -> dict:
        d = {"format": self.format, "description": self.description, "size": self.size,
             "sha256": self.sha256, "runtime": self.runtime}
        for key in ("input", "output", "parity", "seconds"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d

    @classmethod
    def from_dict(cls, d) -> "FileEntry":
        if not isinstance(d, dict):
            raise ValueError("a file entry is not an object")
        sha, size = d.get("sha256"), d.get("size", 0)
        check_sha256(sha, "a file entry's sha256")
        if not isinstance(size, int) or isinstance(size, bool):
            raise ValueError("a file entry's size is not an integer")
        return cls(format=_str(d.get("format", "")), sha256=sha, size=size,
                   runtime=_str(d.get("runtime", "")), description=_str(d.get("description", "")),
                   input=_opt_dict(d.get("input")), output=_opt_dict(d.get("output")),
                   parity=_opt_dict(d.get("parity")), seconds=_opt_dict(d.get("seconds")))


@dataclass(frozen=True)
class Manifest:
    labels: tuple[str, ...]
    threshold: float | None  # sigmoid models: labels[1] when P(labels[1]) >= threshold
    preprocessing: Preprocessing
    files: dict[str, FileEntry]
    default: str | None = None  # the file classify uses when none is named
    positive_class: str | None = None
    output: dict = field(default_factory=dict)  # kind, units, meaning
    operating_point: dict = field(default_factory=dict)  # how the threshold was chosen
    rejected: dict = field(default_factory=dict)  # format -> failed parity result
    source_model: dict = field(default_factory=dict)  # file, sha256 of the .keras file
    training: dict = field(default_factory=dict)  # synthetic, data, classes, counts
    calibration: dict = field(default_factory=dict)
    parity_set: dict = field(default_factory=dict)
    gates: dict = field(default_factory=dict)
    input_gate: dict = field(default_factory=dict)  # xray_edge.gate.GateRules; {}: the defaults
    versions: dict = field(default_factory=dict)
    created: str = ""
    xray_edge_version: str = ""
    schema: int = SCHEMA_VERSION

    @property
    def validation_scores(self) -> dict:
        """The validation split's score quantiles (export), for the service's drift check; {} if none."""
        v = self.operating_point.get("validation_scores")
        return v if isinstance(v, dict) else {}

    @property
    def synthetic(self) -> bool:
        return bool(self.training.get("synthetic", False))

    def entry(self, model_path: Path) -> FileEntry:
        """The entry for a model file; ModelError when the file is not listed."""
        entry = self.files.get(model_path.name)
        if entry is None:
            raise ModelError(f"{model_path}: not listed in its folder's {MANIFEST_NAME}")
        return entry

    def to_dict(self) -> dict:
        spec = self.preprocessing
        return {
            "schema": self.schema,
            "created": self.created,
            "xray_edge_version": self.xray_edge_version,
            "labels": list(self.labels),
            "output": self.output,
            "threshold": self.threshold,
            "operating_point": self.operating_point,
            "positive_class": self.positive_class,
            "input": {"shape": [1, *spec.shape], "dtype": spec.dtype, "preprocessing": spec.to_dict()},
            "default": self.default,
            "files": {name: e.to_dict() for name, e in self.files.items()},
            "rejected": self.rejected,
            "source_model": self.source_model,
            "training": self.training,
            "calibration": self.calibration,
            "parity_set": self.parity_set,
            "gates": self.gates,
            "versions": self.versions,
            **({"input_gate": self.input_gate} if self.input_gate else {}),
        }

    @classmethod
    def from_dict(cls, d) -> "Manifest":
        """Build from parsed JSON; ValueError names the first field of the wrong type or value."""
        check_schema(d, SCHEMA_VERSION)
        labels = check_labels(d.get("labels"))
        files = d.get("files")
        if not isinstance(files, dict):
            raise ValueError("'files' is not an object")
        entries = {}
        for name, e in files.items():
            try:
                entries[name] = FileEntry.from_dict(e)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        default = d.get("default")
        if default is not None and not _plain_name(default):
            raise ValueError("'default' is not a file name")
        if not all(_plain_name(name) for name in files):
            raise ValueError("'files' has a key that is not a file name")
        inp = d.get("input", {})
        pre = inp.get("preprocessing", {}) if isinstance(inp, dict) else None
        if not isinstance(pre, dict):
            raise ValueError("'input.preprocessing' is not an object")
        return cls(
            labels=labels, threshold=check_threshold(d.get("threshold")),
            preprocessing=Preprocessing.from_dict(pre), files=entries, default=default,
            positive_class=_opt_str(d.get("positive_class")),
            output=_dict(d, "output"), operating_point=_dict(d, "operating_point"),
            rejected=_dict(d, "rejected"), source_model=_dict(d, "source_model"),
            training=_dict(d, "training"), calibration=_dict(d, "calibration"),
            parity_set=_dict(d, "parity_set"), gates=_dict(d, "gates"), versions=_dict(d, "versions"),
            input_gate=_input_gate(d),
            created=_str(d.get("created", "")), xray_edge_version=_str(d.get("xray_edge_version", "")),
        )


def read_manifest(path: Path) -> Manifest:
    """Load and check a manifest; every problem is a one-line ModelError."""
    try:
        raw = read_regular(path, MAX_JSON_BYTES)
    except FileNotFoundError:
        raise ModelError(f"{path}: manifest not found") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read manifest ({exc.strerror or exc})") from None
    try:
        d = parse_json(raw)
    except ValueError as exc:  # not UTF-8, not JSON, too deep or too large
        raise ModelError(f"{path}: manifest is not valid JSON ({first_line(exc)})") from None
    try:
        return Manifest.from_dict(d)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{path}: manifest is malformed: {first_line(exc)}") from None


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    return atomic_write_json(folder / MANIFEST_NAME, manifest.to_dict())


def check_digest(entry: FileEntry, model_path: Path, actual: str) -> None:
    """Raise ModelError when the file's sha256 is not the one the manifest recorded."""
    if actual != entry.sha256:
        raise ModelError(f"{model_path}: sha256 {actual[:12]}... does not match the manifest's "
                         f"{entry.sha256[:12]}... (corrupt or replaced file)")


def check_labels(labels) -> tuple[str, ...]:
    """Labels as a tuple; ValueError unless a list of two or more distinct, non-empty names."""
    if (not isinstance(labels, list) or len(labels) < 2
            or not all(isinstance(x, str) and x for x in labels)):
        raise ValueError("'labels' is not a list of two or more names")
    if len(set(labels)) != len(labels):
        raise ValueError("'labels' repeats a name")
    return tuple(labels)


def check_sha256(v, what: str = "'sha256'") -> str:
    """A sha256 as written by export and calibrate; ValueError otherwise."""
    if not isinstance(v, str) or len(v) != 64:
        raise ValueError(f"{what} is not a 64-character string")
    return v


def check_threshold(v) -> float | None:
    """A decision threshold: None, or a finite probability in [0, 1]; ValueError otherwise."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
        raise ValueError(f"'threshold' {v!r} is not a probability between 0 and 1")
    return float(v)


def _plain_name(v) -> bool:
    """A file name inside the model folder: no folders, no NUL."""
    return isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\0" not in v


def _dict(d: dict, key: str) -> dict:
    v = d.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"{key!r} is not an object")
    return v


def _opt_dict(v) -> dict | None:
    if v is not None and not isinstance(v, dict):
        raise ValueError(f"{v!r} is not an object")
    return v


def _str(v) -> str:
    if not isinstance(v, str):
        raise ValueError(f"{v!r} is not a string")
    return v


def _opt_str(v) -> str | None:
    return None if v is None else _str(v)


def _input_gate(d: dict) -> dict:
    """The input gate's rules, checked now so a malformed one fails before any image is read."""
    from xray_edge.gate import GateRules

    raw = _dict(d, "input_gate")
    GateRules.from_dict(raw)
    return raw
