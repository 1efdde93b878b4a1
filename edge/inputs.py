"""Expand command-line inputs (files, folders, globs, '-' for stdin) into image paths."""

from __future__ import annotations

import glob
import os
import stat
from pathlib import Path
from typing import Iterable, Iterator

from xray_edge.errors import ImageError, first_line
from xray_edge.files import special_kind
from xray_edge.decode import IMAGE_SUFFIXES, has_dicom_preamble

_GLOB_CHARS = set("*?[")


def expand_inputs(args: Iterable[str], stdin_paths: Iterable[str] = ()) -> Iterator[Path | ImageError]:
    """Yield paths to classify, in order; an input that names nothing yields an ImageError.

    Folders are walked recursively (sorted, hidden entries skipped) for known image suffixes and
    suffix-less DICOM files; a folder that cannot be read yields an ImageError. A file named
    explicitly is always tried, whatever its suffix: the decoder decides. `stdin_paths` are the
    paths read for '-' (see `read_paths`); none at all is an error, as an empty folder is.
    """
    for arg in args:
        if arg == "-":
            n = 0
            for line in stdin_paths:
                if line:
                    n += 1
                    yield from expand_inputs([line])
            if n == 0:
                yield ImageError("-", "no paths on standard input")
            continue
        yield from _expand_one(arg)


def _expand_one(arg: str) -> Iterator[Path | ImageError]:
    p = Path(arg)
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:  # a folder that cannot be entered, a name too long, ...
        yield ImageError(p, f"cannot open: {exc.strerror or first_line(exc)}")
        return
    if mode is not None and special_kind(mode) and not stat.S_ISDIR(mode):
        # a FIFO would block the decoder forever; a device such as /dev/zero never ends
        yield ImageError(p, f"not a regular file ({special_kind(mode)})")
    elif mode is not None and stat.S_ISDIR(mode):
        found = list(walk_images(p, errors := []))
        yield from errors
        if not found and not errors:
            yield ImageError(p, "folder holds no image files")
        yield from found
    elif mode is None and _GLOB_CHARS & set(arg):
        matches = sorted(glob.glob(arg, recursive=True))
        if not matches:
            yield ImageError(arg, "no files match this pattern")
        for m in matches:
            # stat'ed again rather than expanded: a broken link named like a pattern matches itself
            kind = _special(Path(m), None)
            if os.path.isdir(m):
                yield from _expand_one(m)
            elif kind:
                yield ImageError(m, f"not a regular file ({kind})")
            else:
                yield Path(m)
    else:
        yield p  # a missing file is reported by the decoder, in its place in the output


def read_paths(stream, nul: bool = False) -> Iterator[str]:
    """Paths from a binary stream as they arrive, one per line (or NUL-terminated with `nul`).

    Only the line ending is removed: a name may begin or end with spaces. Bytes that are not
    UTF-8 are kept as the file system's own (os.fsdecode), so the file can still be opened.
    """
    if not nul:
        for raw in stream:
            raw = raw.rstrip(b"\n")
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            if raw:
                yield os.fsdecode(raw)
        return
    read = getattr(stream, "read1", stream.read)  # read1: what has arrived, without waiting for more
    pending = b""
    while chunk := read(1 << 16):
        *names, pending = (pending + chunk).split(b"\0")
        yield from (os.fsdecode(n) for n in names if n)
    if pending:
        yield os.fsdecode(pending)


def walk_images(folder: Path, errors: list | None = None) -> Iterator[Path]:
    """Image files under `folder`, sorted; suffix-less files are kept when they are DICOM.

    A subfolder that cannot be read is appended to `errors` as an ImageError (when given).
    """
    def onerror(exc: OSError) -> None:
        if errors is not None:
            errors.append(ImageError(exc.filename or folder,
                                     f"cannot read folder: {exc.strerror or first_line(exc)}"))

    for root, dirs, files in os.walk(folder, onerror=onerror):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            kind = _special(path, errors)
            if kind is not None:
                if kind and errors is not None:
                    errors.append(ImageError(path, f"not a regular file ({kind})"))
                continue
            suffix = path.suffix.lower()
            # PACS exports: no suffix, or a UID whose last part looks like one (".../1.2.840.3")
            maybe_dicom = suffix == "" or suffix[1:].isdigit()
            if suffix in IMAGE_SUFFIXES or (maybe_dicom and _is_dicom(path, errors)):
                yield path


def _special(path: Path, errors: list | None) -> str | None:
    """None for a regular file (after symlinks); else what it is ('' when it cannot be stat'ed,
    which is then reported in `errors`). Checked before any read: a FIFO blocks the reader."""
    try:
        return special_kind(os.stat(path).st_mode)
    except OSError as exc:
        if errors is not None:
            errors.append(ImageError(path, f"cannot open: {exc.strerror or first_line(exc)}"))
        return ""


def _is_dicom(path: Path, errors: list | None) -> bool:
    try:
        return has_dicom_preamble(path)
    except ImageError as err:
        if errors is not None:
            errors.append(err)
        return False
