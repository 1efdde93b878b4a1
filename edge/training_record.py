"""`training.json`: what a training run used and produced, read back by export and the report.

The one place that knows its file name, schema version and fields. The split file lists are what
let export calibrate on training images and prove parity on held-out ones, and the report test
on the test split, without the user naming folders again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from xray_edge.errors import XrayEdgeError
from xray_edge.files import atomic_write_json, check_schema, read_json_record, sha256_file
from xray_edge.metrics import positive_index
from xray_edge.preprocess import DEFAULT, Preprocessing

TRAINING_RECORD_NAME = "training.json"
MODEL_NAME = "model.keras"  # the model the record's model_sha256 is of
SCHEMA_VERSION = 1
SPLITS = ("train", "validation", "test")


@dataclass
class TrainingRecord:
    classes: list[str]
    positive_class: str | None = None  # the disease class of the binary figures
    preprocessing: Preprocessing = DEFAULT
    files: dict[str, list[str]] = field(default_factory=dict)  # split -> absolute paths
    labels: dict[str, list[int]] = field(default_factory=dict)  # split -> class index per file
    data: str = ""  # the dataset root
    synthetic: bool = False
    test_source: str = ""
    counts: dict = field(default_factory=dict)  # split -> class -> images
    config: dict = field(default_factory=dict)  # the TrainConfig, as plain values
    backend: str = ""
    keras: str = ""
    machine: str = ""
    best_epoch: int = 0
    epochs_run: int = 0
    validation: dict = field(default_factory=dict)  # roc_auc, probability_spread, collapsed
    seconds: dict = field(default_factory=dict)
    devices: list[str] = field(default_factory=list)  # what trained, e.g. ["cuda:0 NVIDIA H100"]
    precision: str = "float32"  # or mixed_bfloat16 (the saved model is float32 either way)
    model_sha256: str | None = None
    # each data source: name, root, layout, patients (grouped by labels.csv), counts split -> class -> n
    sources: list = field(default_factory=list)
    file_sources: dict[str, list[int]] = field(default_factory=dict)  # split -> source index per file
    operating_point: dict = field(default_factory=dict)  # chosen on validation at training
    balance: dict = field(default_factory=dict)  # how class/source imbalance was weighted
    schema: int = SCHEMA_VERSION

    @property
    def positive_index(self) -> int:
        return positive_index(self.classes, self.positive_class, strict=False)

    def split_sources(self, name: str) -> tuple[list[Path], list[int], list[int]]:
        """(paths, class indices, source indices) of a split's files that exist; source -1 if unknown."""
        paths, labels = self.files.get(name, []), self.labels.get(name, [])
        srcs = self.file_sources.get(name, [])
        if len(labels) != len(paths):
            labels = [-1] * len(paths)
        if len(srcs) != len(paths):
            srcs = [-1] * len(paths)
        rows = [(Path(p), y, s) for p, y, s in zip(paths, labels, srcs) if Path(p).exists()]
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    def split(self, name: str, existing_only: bool = True) -> tuple[list[Path], list[int]]:
        """(paths, class indices) of a split; files that no longer exist are left out."""
        paths, labels = self.files.get(name, []), self.labels.get(name, [])
        if len(labels) != len(paths):
            labels = [-1] * len(paths)  # a record without labels: paths only
        pairs = [(Path(p), y) for p, y in zip(paths, labels)]
        if existing_only:
            pairs = [(p, y) for p, y in pairs if p.exists()]
        return [p for p, _ in pairs], [y for _, y in pairs]

    def to_dict(self) -> dict:
        return {
            "schema": self.schema, "data": self.data, "synthetic": self.synthetic,
            "classes": list(self.classes), "positive_class": self.positive_class,
            "test_source": self.test_source, "counts": self.counts,
            "files": self.files, "labels": self.labels, "config": self.config,
            "preprocessing": self.preprocessing.to_dict(), "backend": self.backend,
            "keras": self.keras, "machine": self.machine, "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run, "validation": self.validation, "seconds": self.seconds,
            "devices": self.devices, "precision": self.precision, "model_sha256": self.model_sha256,
            "sources": self.sources, "file_sources": self.file_sources,
            "operating_point": self.operating_point, "balance": self.balance,
        }

    @classmethod
    def from_dict(cls, d) -> "TrainingRecord":
        check_schema(d, SCHEMA_VERSION, required=False)
        classes = d.get("classes")
        if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
            raise ValueError("'classes' is not a list of two or more names")
        files, labels = d.get("files", {}), d.get("labels", {})
        if not isinstance(files, dict) or not all(isinstance(v, list) for v in files.values()):
            raise ValueError("'files' is not an object of lists")
        if not isinstance(labels, dict) or not all(isinstance(v, list) for v in labels.values()):
            raise ValueError("'labels' is not an object of lists")
        known = set(cls.__dataclass_fields__) - {"preprocessing", "classes", "files", "labels"}
        return cls(classes=classes, files=files, labels=labels,
                   preprocessing=Preprocessing.from_dict(d.get("preprocessing") or {}),
                   **{k: d[k] for k in known if k in d})

    def write(self, folder: Path) -> Path:
        return atomic_write_json(folder / TRAINING_RECORD_NAME, self.to_dict())

    @classmethod
    def read(cls, folder: Path) -> "TrainingRecord | None":
        """The record in `folder`, or None when there is none; XrayEdgeError when it is unusable,
        or when the folder's model.keras is not the one it records (a training interrupted while
        it published its files: see `xray_edge.staging`)."""
        rec = read_json_record(folder / TRAINING_RECORD_NAME, cls.from_dict, XrayEdgeError)
        model = Path(folder) / MODEL_NAME
        if rec is not None and isinstance(rec.model_sha256, str) and model.is_file():
            if sha256_file(model) != rec.model_sha256:
                raise XrayEdgeError(f"{model} is not the model {folder / TRAINING_RECORD_NAME} records "
                                    "(sha256 differs: an interrupted training?); train again")
        return rec
