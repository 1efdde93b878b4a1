"""Find the images of one or more data sources and split them by source, class and patient.

A source is one `--data` root, laid out as ROOT/train/<class>/* [+ ROOT/test/<class>/*] or as
bare ROOT/<class>/* folders. A `labels.csv` at the root with `file` and `patient` columns groups
one patient's films, so that a split never puts them on both sides.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xray_edge.errors import DatasetError
from xray_edge.folders import ClassImages, class_folders, walk_classes
from xray_edge.decode import IMAGE_SUFFIXES

SYNTHETIC_MARKER = "SYNTHETIC"  # a file at the dataset root: the images are generated phantoms
PATIENTS_FILE = "labels.csv"  # optional, at a source's root: columns `file` and `patient`
BALANCE_MODES = ("none", "class", "source-class")


@dataclass
class Split:
    paths: list[Path]
    labels: np.ndarray  # class index per path
    sources: np.ndarray | None = None  # source index per path
    groups: np.ndarray | None = None  # patient key per path (the path itself without labels.csv)

    def __post_init__(self):
        n = len(self.paths)
        if self.sources is None:
            self.sources = np.zeros(n, np.int64)
        if self.groups is None:
            self.groups = np.asarray([str(p) for p in self.paths], dtype=object)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: np.ndarray) -> "Split":
        idx = np.asarray(idx, np.int64)
        return Split([self.paths[i] for i in idx], self.labels[idx], self.sources[idx], self.groups[idx])

    def counts(self, classes: list[str]) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(classes)}

    @staticmethod
    def concat(parts: list["Split"]) -> "Split":
        parts = [p for p in parts if p is not None]
        if not parts:
            return Split([], np.zeros(0, np.int64))
        return Split([x for p in parts for x in p.paths], np.concatenate([p.labels for p in parts]),
                     np.concatenate([p.sources for p in parts]), np.concatenate([p.groups for p in parts]))


@dataclass
class Source:
    name: str
    root: Path
    layout: str  # "train/ + test/", "train/" or "<class>/"
    pool: Split  # images for train and validation (and test, when the source has no test/)
    test: Split | None
    patients: bool  # grouped by labels.csv
    synthetic: bool

    def describe(self, classes: list[str]) -> dict:
        return {"name": self.name, "root": str(self.root.resolve()), "layout": self.layout,
                "grouped_by_patient": self.patients, "synthetic": self.synthetic}


@dataclass
class Dataset:
    sources: list[Source]
    classes: list[str]
    skipped: list[str] = field(default_factory=list)  # files that are not images

    @property
    def root(self) -> Path:
        return self.sources[0].root

    @property
    def synthetic(self) -> bool:
        return any(s.synthetic for s in self.sources)

    @property
    def train(self) -> Split:  # every source's pool
        return Split.concat([s.pool for s in self.sources])

    @property
    def test(self) -> Split | None:  # every source's own test/ folder
        tests = [s.test for s in self.sources if s.test is not None]
        return Split.concat(tests) if tests else None


def discover(roots, classes: list[str] | None = None) -> Dataset:
    """Index one or more source folders; raise DatasetError (one line) before any training starts.

    Without `classes`, the class names are the sorted folder names (of train/ when there is one),
    so COVID19=0 and NORMAL=1 as in the tutorial; with several roots, every folder name found.
    With `classes`, other folders are left out and a root may hold only some of them.
    Files without an image suffix are listed in `skipped`.
    """
    roots = [Path(r) for r in ([roots] if isinstance(roots, (str, os.PathLike)) else roots)]
    if not roots:
        raise DatasetError("no data folder given")
    layouts = [_layout(r) for r in roots]
    if classes is None:
        found = sorted({c for _, pool_dir, _ in layouts for c in class_folders(pool_dir)})
        where = layouts[0][1] if len(roots) == 1 else "the --data folders"
        if len(found) < 2:
            got = f"only {found[0]!r}" if found else "none"
            raise DatasetError(f"{where}: needs at least two class folders, found {got}")
        classes, strict = found, True
    else:
        classes, strict = list(classes), False
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise DatasetError(f"--classes {','.join(classes)}: name two or more different classes")
    skipped: list[str] = []
    names = _source_names(roots)
    sources = [_source(i, names[i], root, layout, pool_dir, test_dir, classes, strict, skipped)
               for i, (root, (layout, pool_dir, test_dir)) in enumerate(zip(roots, layouts))]
    pool = Split.concat([s.pool for s in sources])
    for i, c in enumerate(classes):
        if not (pool.labels == i).any():
            where = f"{layouts[0][1] / c}" if len(roots) == 1 else f"the --data folders ({c}/)"
            raise DatasetError(f"{where}: class {c!r} has no images")
    return Dataset(sources, classes, skipped)


def _layout(root: Path) -> tuple[str, Path, Path | None]:
    if not root.is_dir():
        raise DatasetError(f"{root}: not found; expected DATA/train/<class>/<images> "
                           "(and optionally DATA/test/<class>/<images>) or DATA/<class>/<images>")
    if (root / "train").is_dir():
        test = root / "test" if (root / "test").is_dir() else None
        return ("train/ + test/" if test else "train/"), root / "train", test
    if not class_folders(root):
        raise DatasetError(f"{root}: no train/ and no class folders; expected DATA/train/<class>/<images> "
                           "(and optionally DATA/test/<class>/<images>) or DATA/<class>/<images>")
    return "<class>/", root, None


def _source_names(roots: list[Path]) -> list[str]:
    names: list[str] = []
    for r in roots:
        base = r.resolve().name or "data"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _source(index: int, name: str, root: Path, layout: str, pool_dir: Path, test_dir: Path | None,
            classes: list[str], strict: bool, skipped: list[str]) -> Source:
    present = class_folders(pool_dir)
    if not set(present) & set(classes):
        raise DatasetError(f"{pool_dir}: none of the classes {classes} (found {present or 'no folders'})")
    patients = _patients(root)
    pool = _index(pool_dir, classes, index, patients, skipped)
    test = None
    if test_dir is not None:
        extra = [c for c in class_folders(test_dir) if c not in classes]
        if extra and strict:
            raise DatasetError(f"{test_dir}: class folders {extra} are not in train/ {classes}")
        test = _index(test_dir, classes, index, patients, skipped)
        if len(test) == 0:
            test = None
    return Source(name, root, layout, pool, test, bool(patients), (root / SYNTHETIC_MARKER).exists())


def _patients(root: Path) -> dict[Path, str]:
    """file -> patient from ROOT/labels.csv (columns `file`, `patient`); {} without one."""
    path = root / PATIENTS_FILE
    if not path.is_file():
        return {}
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    if rows and not {"file", "patient"} <= set(rows[0]):
        return {}  # a labels.csv of another kind: no patient grouping
    return {(root / r["file"]).resolve(): r["patient"] for r in rows if r.get("file") and r.get("patient")}


def _index(split_dir: Path, classes: list[str], source: int, patients: dict[Path, str],
           skipped: list[str]) -> Split:
    found = walk_classes(split_dir, classes)
    for cls in classes:
        cdir = split_dir / cls
        for f in sorted(cdir.rglob("*")) if cdir.is_dir() else []:
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() not in IMAGE_SUFFIXES:
                skipped.append(str(f))
    groups = [f"{source}:{patients[p.resolve()]}" if p.resolve() in patients else str(p) for p in found.paths]
    return Split(found.paths, found.labels, np.full(len(found.paths), source, np.int64),
                 np.asarray(groups, dtype=object))


def stratified_split(labels: np.ndarray, fraction: float, seed: int,
                     groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): `fraction` of each stratum held out, whole groups at a time.

    `labels` is the stratum per item (class, or source and class); `groups` the patient per item
    (default: each item its own). A group goes with the stratum of its first item. At least one
    group of each stratum is held out and one kept, when the stratum has two or more.
    """
    labels = np.asarray(labels)
    if groups is None:
        groups = np.arange(len(labels))
    rng = np.random.default_rng(seed)
    held_mask = np.zeros(len(labels), bool)
    _, first, group_of = np.unique(groups, return_index=True, return_inverse=True)
    group_stratum = labels[first]
    group_size = np.bincount(group_of, minlength=len(first))
    order_of_appearance = np.argsort(first, kind="stable")
    for c in np.unique(labels):
        gs = order_of_appearance[group_stratum[order_of_appearance] == c]
        gs = rng.permutation(gs)
        n_items = int(group_size[gs].sum())
        if len(gs) < 2:
            continue
        want = max(1, round(fraction * n_items))
        taken, n_held = 0, 0
        while n_held < len(gs) - 1 and taken < want:
            taken += int(group_size[gs[n_held]])
            n_held += 1
        held_mask |= np.isin(group_of, gs[:n_held])
    return np.flatnonzero(~held_mask), np.flatnonzero(held_mask)


def strata(split: Split, n_classes: int) -> np.ndarray:
    """One stratum per (source, class)."""
    return split.sources * n_classes + split.labels


def balance_weights(labels: np.ndarray, sources: np.ndarray, mode: str) -> np.ndarray:
    """Sample weights (mean 1) that handle class or source imbalance on purpose.

    none: all 1. class: every class weighs the same in the loss. source-class: every class the
    same, and within a class every source that holds it the same.
    """
    if mode not in BALANCE_MODES:
        raise DatasetError(f"--balance {mode!r}: choose from {', '.join(BALANCE_MODES)}")
    n = len(labels)
    w = np.ones(n, np.float64)
    if mode == "none" or n == 0:
        return w.astype(np.float32)
    present = np.unique(labels)
    for c in present:
        in_c = labels == c
        if mode == "class":
            w[in_c] = n / (len(present) * in_c.sum())
        else:
            srcs = np.unique(sources[in_c])
            for s in srcs:
                cell = in_c & (sources == s)
                w[cell] = n / (len(present) * len(srcs) * cell.sum())
    return (w / w.mean()).astype(np.float32)


def external_sets(pairs) -> list[tuple[str, Path, ClassImages]]:
    """(name, folder, its images) for each --external NAME=DIR; DIR/<folder>/* with any folder names.

    Folders named like a model class are labelled; others (e.g. PNEUMONIA) are measured by the
    share called and the mean score. Raises DatasetError for a missing or empty folder.
    """
    out, names = [], set()
    for name, root in pairs:
        root = Path(root)
        if name in names:
            raise DatasetError(f"--external {name}: the name is given twice")
        names.add(name)
        if not root.is_dir():
            raise DatasetError(f"--external {name}={root}: not a folder (expected {root}/<class>/<images>)")
        found = walk_classes(root)
        if not found.paths:
            raise DatasetError(f"--external {name}={root}: no images in {root}/<class>/ folders")
        out.append((name, root, found))
    return out
