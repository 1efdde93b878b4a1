"""Small file helpers: content hashes and writes that never leave a half-written final file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


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
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise error(f"{path}: cannot read ({exc})") from None
    try:
        return parse(d)
    except (ValueError, TypeError) as exc:
        raise error(f"{path}: malformed ({exc})") from None
