"""Small file helpers: content hashes, bounded reads of regular files only, untrusted JSON
parsed with bounded depth and size, and writes that never leave a half-written final file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
from pathlib import Path

import numpy as np

from xray_edge.errors import XrayEdgeError, first_line

# A manifest, site.json or embedded metadata is a few kB; training.json lists every file of a
# dataset (about 100 bytes each). 64 MiB is a million files, and bounds the parser's memory.
MAX_JSON_BYTES = 64 << 20
# Our records nest 5 levels deep; the parser and the code that walks its result recurse per level.
MAX_JSON_DEPTH = 32
NAME_MAX = 255  # bytes in one file name (ext4, xfs, btrfs, tmpfs)
MAX_MODEL_BYTES = 2 << 30  # a model file is read whole into memory (the runtime parses it there)

_SPECIAL = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))


class NotRegularFile(OSError):
    """A path that names a FIFO, device, socket or folder where a file was expected, or a file
    over its size bound. An OSError, so every caller's existing handling (strerror) applies."""

    def __init__(self, path, reason: str):
        super().__init__(errno.EINVAL, reason, os.fspath(path))


def special_kind(mode: int) -> str | None:
    """'a FIFO', 'a character device', ... for a mode that is not a regular file's, else None."""
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _SPECIAL if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike, max_bytes: int | None = None):
    """Open `path` for reading in binary only when it is a regular file (after symlinks).

    The file is opened non-blocking, so a FIFO cannot stall the open, and checked with fstat on
    the open descriptor, so what is checked is what is read. Raises NotRegularFile (a FIFO, a
    device such as /dev/zero behind a symlink, a folder, or more than `max_bytes`) or the OSError
    of the open itself.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        kind = special_kind(st.st_mode)
        if kind is not None:
            raise NotRegularFile(path, f"not a regular file ({kind})")
        if max_bytes is not None and st.st_size > max_bytes:
            raise NotRegularFile(path, f"{st.st_size:,} bytes is over the {max_bytes:,}-byte limit")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (see `open_regular`)."""
    with open_regular(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew after the check
        raise NotRegularFile(path, f"over the {max_bytes:,}-byte limit")
    return data


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_STEP = np.zeros(256, np.int32)  # +1 for a byte that opens a level, -1 for one that closes it
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1


def json_depth(raw: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (brackets inside strings not counted)."""
    steps = _STEP[np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)]
    return int(np.cumsum(steps).max(initial=0))


def parse_json(raw: bytes | str, max_depth: int = MAX_JSON_DEPTH, max_bytes: int = MAX_JSON_BYTES):
    """`json.loads` for untrusted text: ValueError (one line) when it is too large or nests
    deeper than `max_depth`, before the recursive parser or anything walking its result runs."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > max_bytes:
        raise ValueError(f"{len(raw):,} bytes of JSON is over the {max_bytes:,}-byte limit")
    # fewer brackets than the limit cannot nest deeper (most records: a few lists, long ones)
    depth = 0 if raw.count(b"[") + raw.count(b"{") <= max_depth else json_depth(raw)
    if depth > max_depth:
        raise ValueError(f"JSON nested {depth} levels deep (the limit is {max_depth})")
    try:
        return json.loads(raw)
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise ValueError("JSON nested too deep") from None


def load_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES):
    """Parsed JSON of a regular file: OSError (NotRegularFile included) or ValueError."""
    return parse_json(read_regular(path, max_bytes), max_bytes=max_bytes)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temporary name in the same folder, fsync, then rename over `path`.

    An interrupted write leaves at most a `.tmp` file, never a truncated file under the final
    name (rename is atomic on POSIX within one filesystem).
    """
    import tempfile  # with shutil, bz2, lzma and random: not on the classify path, which only reads

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | os.PathLike) -> None:
    """Prove, before long work, that `atomic_write_bytes(path, ...)` can succeed: `path` is no
    folder, and its folder can be made and written in (see `check_folder_writable`).

    Raises:
        XrayEdgeError: in one line, naming the path and the reason.
    """
    path = Path(path)
    if path.is_dir():
        raise XrayEdgeError(f"{path}: cannot write (is a folder, not a file)")
    check_folder_writable(path.parent, path)


def check_folder_writable(folder: str | os.PathLike, named: str | os.PathLike | None = None) -> None:
    """Make `folder` and create and remove a temporary file in it: what a later write needs, as
    the file system decides (permissions, read-only mounts, a file in the way; root included).

    Raises:
        XrayEdgeError: in one line, naming `named` (default: the folder) and the reason.
    """
    import tempfile

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".xray-edge-probe.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise XrayEdgeError(f"{named or folder}: cannot write ({exc.strerror or first_line(exc)})") from None


def fit_name(stem: str, suffix: str = "", limit: int = NAME_MAX) -> str:
    """`stem + suffix`, the stem cut by whole characters until the name's bytes fit in `limit`."""
    room = limit - len(os.fsencode(suffix))
    while stem and len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    return stem + suffix


def _temp_prefix(name: str) -> str:
    """`.NAME.`, cut so that the temporary name (8 random characters and `.tmp` after it) stays
    within NAME_MAX bytes even when the final name is near it."""
    return "." + fit_name(name, ".", NAME_MAX - 1 - 8 - len(".tmp"))


def fsync_dir(folder: str | os.PathLike) -> None:
    """fsync a folder, so that a rename or a new file in it survives a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """Strict JSON (a NaN or infinity is written as null: see `json_safe`), atomically."""
    return atomic_write_bytes(path, (dumps(obj, indent=2) + "\n").encode())


def json_safe(obj):
    """`obj` with every non-finite float (NaN, an undefined ROC AUC or rate) replaced by None,
    and numpy scalars and arrays as plain values: what strict JSON readers accept."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def dumps(obj, **kw) -> str:
    """`json.dumps` of `json_safe(obj)`, refusing anything that would still not be JSON."""
    return json.dumps(json_safe(obj), allow_nan=False, **kw)


def check_schema(d, version: int, required: bool = True) -> dict:
    """`d` if it is a JSON object of this schema version, else ValueError in one line.

    `required=False`: a record without a "schema" field is taken as this version (files written
    before the field existed)."""
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    if d.get("schema", None if required else version) != version:
        raise ValueError(f"schema {d.get('schema')!r} is not {version}")
    return d


def read_json_record(path: Path, parse, error: type[Exception]):
    """`parse(obj)` of the JSON file at `path`, or None when there is no such file.

    Any other problem (unreadable, not JSON, a field `parse` refuses with ValueError or
    TypeError) becomes `error` with a one-line message naming the file.
    """
    try:
        d = load_json(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise error(f"{path}: cannot read ({first_line(exc)})") from None
    try:
        return parse(d)
    except (ValueError, TypeError) as exc:
        raise error(f"{path}: malformed ({exc})") from None
