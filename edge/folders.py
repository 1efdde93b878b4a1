"""The one walk of a `<root>/<class>/*` folder: which class folders it holds, which images each.

Used by training (each data source), the report (a test or external folder) and calibrate (a
site's folder), so "a class folder" means the same everywhere: a visible subfolder, walked
recursively for image files, sorted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_edge.inputs import walk_images


def class_folders(root: Path) -> list[str]:
    """The names of the visible subfolders of `root`, sorted ([] when `root` is not a folder)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


@dataclass
class ClassImages:
    paths: list[Path]
    labels: np.ndarray  # index into `names` per path
    names: list[str]  # the folder names walked, in label order
    ignored: list[str]  # subfolders of the root that were not asked for


def walk_classes(root: Path, names: list[str] | None = None) -> ClassImages:
    """The images under `root`/<name>/ for each of `names` (default: every class folder).

    A name without a folder yields no image; folders not in `names` are listed in `ignored`.
    """
    root = Path(root)
    present = class_folders(root)
    names = list(present if names is None else names)
    paths: list[Path] = []
    labels: list[int] = []
    for i, name in enumerate(names):
        found = list(walk_images(root / name)) if (root / name).is_dir() else []
        paths += found
        labels += [i] * len(found)
    ignored = [n for n in present if n not in names]
    return ClassImages(paths, np.asarray(labels, dtype=np.int64), names, ignored)
