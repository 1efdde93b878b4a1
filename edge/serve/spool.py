"""The spool: the one place a received film lives until its result is written.

Layout of a spool folder:
    films/<key><ext>      accepted films waiting for a result (durable before the sender hears Success)
    films/<key>.json      what the receiver knew (source, received time, original path, calling AE)
    quarantine/<key>...   films that could not be read or classified, with <key>.reason.txt
    outbox/               DICOM reports (outbox/sent/ once forwarded)
    results.jsonl         one line per film, appended and fsynced before the film leaves films/

A film's key is its SOP Instance UID (DICOM) or the sha256 of its bytes (files). A key with a
line in results.jsonl is done: the worker deletes the film after the line is on disk, and at
start-up deletes any film whose key is already there, so a kill between the two steps never
classifies a film twice, and a kill before the line never loses one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from xray_edge.files import fsync_dir

FILMS, QUARANTINE, OUTBOX = "films", "quarantine", "outbox"
RESULTS = "results.jsonl"
SERVICE = "service.json"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# Room kept free on the disk besides the film itself, so the results log can always be appended.
DISK_RESERVE = 16 << 20


class SpoolFull(Exception):
    """No room for this film: --max-spool reached or the disk is (nearly) full."""


def film_key(sop_uid: str | None = None, data: bytes | None = None) -> str:
    """The SOP Instance UID when it is a well-formed UID, else the sha256 of the film's bytes."""
    if sop_uid and len(sop_uid) <= 64 and _UID.match(sop_uid):
        return sop_uid
    return "sha256-" + hashlib.sha256(data or b"").hexdigest()


def durable_write(path: Path, data: bytes) -> None:
    """Write temp, fsync, rename, fsync the folder: after return the file survives a power cut.

    Not files.atomic_write_bytes: that one gives the umask's mode (often world-readable) and
    makes missing folders; films and reports are patient data, kept 0640 in folders that exist."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@dataclass(frozen=True)
class Film:
    key: str
    path: Path
    meta: dict

    @property
    def received(self) -> float:
        return float(self.meta.get("received", 0.0))


class Spool:
    """A spool folder; safe to call from the receiver threads and the worker at once."""

    def __init__(self, root: Path, max_bytes: int | None = None):
        self.root = Path(root)
        self.films = self.root / FILMS
        self.quarantine = self.root / QUARANTINE
        self.outbox = self.root / OUTBOX
        for d in (self.films, self.quarantine, self.outbox):
            d.mkdir(parents=True, exist_ok=True)
        self.results = self.root / RESULTS
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        for tmp in self.films.glob(".*.tmp"):  # a write cut short: its sender never heard Success
            tmp.unlink(missing_ok=True)
        films = {p.stem for p in self.films.iterdir() if p.suffix != ".json"}
        for meta in self.films.glob("*.json"):  # a kill between a film's metadata and its bytes
            if meta.stem not in films:
                meta.unlink(missing_ok=True)
        # Bytes of each waiting film by file name: a film sent again replaces its entry, so a
        # resent film is counted once however the receivers and the worker interleave.
        self._sizes = {p.name: p.stat().st_size for p in self.films.iterdir()
                       if p.is_file() and p.suffix != ".json" and not p.name.startswith(".")}
        self._used = sum(self._sizes.values())
        self.wake = threading.Event()  # set when a film arrives
        self.finished = self.done_keys()  # key -> status of its result line

    def known(self, key: str) -> bool:
        """True when a film with this key is waiting or has its result."""
        return key in self.finished or any(p.suffix != ".json" for p in self.films.glob(f"{key}.*"))

    # ---------------------------------------------------------------- receive side
    def accept(self, key: str, data: bytes, ext: str, meta: dict) -> Path:
        """Make a film durable under its key; SpoolFull when there is no room.

        The metadata file is written first and the film last: a film under its final name is
        always complete and always has its metadata.
        """
        need = len(data)
        with self._lock:
            if self.max_bytes is not None and self._used + need > self.max_bytes:
                raise SpoolFull(f"spool holds {self._used} bytes, the limit is {self.max_bytes}")
            if shutil.disk_usage(self.films).free < need + DISK_RESERVE:
                raise SpoolFull("the disk is full")
            self._used += need
        path = self.films / f"{key}{ext}"
        try:
            durable_write(self.films / f"{key}.json", json.dumps(meta).encode())
            durable_write(path, data)
        except OSError as exc:
            with self._lock:
                self._used -= need
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull("the disk is full") from None
            raise
        with self._lock:  # settle with the disk: an old copy (same key sent again) was replaced, or
            try:          # the worker removed this one meanwhile (its key already had a result)
                now = path.stat().st_size
            except FileNotFoundError:
                now = 0
            self._used += now - need - self._sizes.pop(path.name, 0)
            if now:
                self._sizes[path.name] = now
        self.wake.set()
        return path

    # ---------------------------------------------------------------- worker side
    def pending(self, limit: int | None = None) -> list[Film]:
        """Films waiting for a result, oldest first."""
        films = []
        for p in self.films.iterdir():
            if p.name.startswith(".") or p.suffix == ".json" or not p.is_file():
                continue
            key = p.name[: -len(p.suffix)] if p.suffix else p.name
            films.append((p.stat().st_mtime_ns, key, p))
        films.sort()
        out = []
        for _, key, p in films[:limit]:
            out.append(Film(key, p, self._meta(key)))
        return out

    def _meta(self, key: str) -> dict:
        try:
            d = json.loads((self.films / f"{key}.json").read_text(encoding="utf-8"))
            return d if isinstance(d, dict) else {}
        except (OSError, ValueError):
            return {}

    def done(self, film: Film) -> None:
        """Remove a film whose result is on disk (metadata first: a film never lacks it while waiting)."""
        (self.films / f"{film.key}.json").unlink(missing_ok=True)
        self._remove(film.path)

    def write_reason(self, film: Film, reason: str) -> None:
        durable_write(self.quarantine / f"{film.key}.reason.txt", (reason.replace("\n", " ") + "\n").encode())

    def to_quarantine(self, film: Film) -> Path | None:
        """Move a film aside (its reason file is written first, see `write_reason`); None when the
        film is no longer in films/ (nothing is moved, nothing raised)."""
        dest = self.quarantine / film.path.name
        with self._lock:  # the move and its accounting as one step (see `accept`)
            try:
                os.replace(film.path, dest)
            except FileNotFoundError:
                dest = None
            self._used -= self._sizes.pop(film.path.name, 0)
        if dest is not None:
            fsync_dir(self.quarantine)
        (self.films / f"{film.key}.json").unlink(missing_ok=True)
        return dest

    def _remove(self, path: Path) -> None:
        with self._lock:  # the removal and its accounting as one step (see `accept`)
            path.unlink(missing_ok=True)
            self._used -= self._sizes.pop(path.name, 0)

    # ---------------------------------------------------------------- results
    def done_keys(self) -> dict[str, str]:
        """Key -> status of each result line (a torn last line, from a kill mid-append, is skipped)."""
        keys = {}
        for rec in read_results(self.results):
            if isinstance(rec.get("key"), str):
                keys[rec["key"]] = str(rec.get("status", ""))
        return keys

    def append_result(self, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.results, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            _repair_torn_tail(fd)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.finished[record["key"]] = record.get("status", "")


def _repair_torn_tail(fd: int) -> None:
    """A kill mid-append can leave a last line without its newline: end it before appending."""
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
        os.write(fd, b"\n")


def read_results(path: Path):
    """Yield each well-formed record of a results.jsonl; torn or foreign lines are skipped."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        for raw in f:
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict):
                yield rec


def now_iso(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))
