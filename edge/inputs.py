"""Expand command-line inputs (files, folders, globs, '-' for stdin) into image paths."""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable, Iterator

from xray_edge.errors import ImageError
from xray_edge.preprocess import IMAGE_SUFFIXES

_GLOB_CHARS = set("*?[")


def expand_inputs(args: Iterable[str], stdin_lines: Iterable[str] = ()) -> Iterator[Path | ImageError]:
    """Yield paths to classify, in order; an input that names nothing yields an ImageError.

    Folders are walked recursively (sorted, hidden entries skipped) for known image suffixes.
    A file named explicitly is always tried, whatever its suffix: the decoder decides.
    """
    for arg in args:
        if arg == "-":
            for line in stdin_lines:
                if line.strip():
                    yield from expand_inputs([line.strip()])
            continue
        p = Path(arg)
        if p.is_dir():
            found = list(walk_images(p))
            if not found:
                yield ImageError(p, "folder holds no image files")
            yield from found
        elif not p.exists() and _GLOB_CHARS & set(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                yield ImageError(arg, "no files match this pattern")
            for m in matches:
                yield from expand_inputs([m]) if Path(m).is_dir() else [Path(m)]
        else:
            yield p


def walk_images(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(root) / name
