"""Find the images of a dataset laid out as DATA/train/<class>/* [+ DATA/test/<class>/*]."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xray_edge.errors import DatasetError
from xray_edge.inputs import walk_images
from xray_edge.preprocess import IMAGE_SUFFIXES

SYNTHETIC_MARKER = "SYNTHETIC"  # a file at the dataset root: the images are generated phantoms


@dataclass
class Split:
    paths: list[Path]
    labels: np.ndarray  # class index per path

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: np.ndarray) -> "Split":
        return Split([self.paths[i] for i in idx], self.labels[idx])

    def counts(self, classes: list[str]) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(classes)}


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    train: Split
    test: Split | None
    synthetic: bool
    skipped: list[str] = field(default_factory=list)  # files that are not images


def discover(root: str | os.PathLike) -> Dataset:
    """Index a dataset folder; raise DatasetError (one line) before any training starts.

    Class names are the sorted folder names under train/, so COVID19=0 and NORMAL=1 as in the
    tutorial. Files without an image suffix are listed in `skipped`.
    """
    root = Path(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetError(f"{train_dir}: not found; expected DATA/train/<class>/<images> "
                           "(and optionally DATA/test/<class>/<images>)")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise DatasetError(f"{train_dir}: needs at least two class folders, found {found}")
    skipped: list[str] = []
    train = _index(train_dir, classes, skipped, require_all=True)
    test = None
    test_dir = root / "test"
    if test_dir.is_dir():
        extra = sorted(d.name for d in test_dir.iterdir()
                       if d.is_dir() and not d.name.startswith(".") and d.name not in classes)
        if extra:
            raise DatasetError(f"{test_dir}: class folders {extra} are not in train/ {classes}")
        test = _index(test_dir, classes, skipped, require_all=False)
        if len(test) == 0:
            test = None
    return Dataset(root, classes, train, test, (root / SYNTHETIC_MARKER).exists(), skipped)


def _index(split_dir: Path, classes: list[str], skipped: list[str], require_all: bool) -> Split:
    paths: list[Path] = []
    labels: list[int] = []
    for i, cls in enumerate(classes):
        cdir = split_dir / cls
        files = list(walk_images(cdir)) if cdir.is_dir() else []
        for f in sorted(cdir.rglob("*")) if cdir.is_dir() else []:
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append(str(f))
        if require_all and not files:
            raise DatasetError(f"{cdir}: class {cls!r} has no images")
        paths += files
        labels += [i] * len(files)
    return Split(paths, np.asarray(labels, dtype=np.int64))


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): `fraction` of each class held out, at least one per class."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))
