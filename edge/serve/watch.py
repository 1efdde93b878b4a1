"""Take films a viewer writes into a folder: each complete file once, originals never changed.

A file is complete when its size and modification time are the same on two polls in a row, it
was last modified `settle` seconds ago or more (2 s by default), and its name is not a temporary
one (dot files, .tmp, .part, .partial, .crdownload, .filepart). A writer that pauses longer than
`settle` in the middle of a file would be read early: viewers that write under a temporary name
and rename at the end are always safe.
It is then read and copied into the spool under the sha256 of its bytes; a file whose content is
already waiting or done (also after a restart) is not taken again.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

from xray_edge.errors import first_line
from xray_edge.serve.spool import Spool, SpoolFull, film_key

TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart", ".swp")


def is_temporary(name: str) -> bool:
    return name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES)


class FolderWatch:
    def __init__(self, folder: Path, spool: Spool, log, interval: float = 0.5, settle: float = 2.0):
        self.folder, self.spool, self.log, self.interval = Path(folder), spool, log, interval
        self.settle_ns = int(settle * 1e9)
        self._last: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) at the last poll
        self._taken: dict[str, tuple[int, int]] = {}  # path -> (size, mtime_ns) when taken
        self._full_said = False

    def poll(self) -> int:
        """One pass over the folder; returns how many films were taken."""
        now: dict[str, tuple[int, int]] = {}
        for dirpath, dirnames, names in os.walk(self.folder):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in names:
                if is_temporary(name):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                now[path] = (st.st_size, st.st_mtime_ns)
        taken = 0
        quiet_since = time.time_ns() - self.settle_ns
        for path, sig in now.items():
            if (self._last.get(path) != sig or self._taken.get(path) == sig or sig[0] == 0
                    or sig[1] > quiet_since):
                continue  # still being written, already taken, or empty so far
            if self._take(path, sig):
                taken += 1
        self._last = now
        for gone in set(self._taken) - set(now):
            del self._taken[gone]
        return taken

    def _take(self, path: str, sig: tuple[int, int]) -> bool:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            self.log(f"cannot read {path}: {first_line(exc)} (will retry)")
            return False
        if len(data) != sig[0]:
            return False  # changed between stat and read: the next polls decide
        key = film_key(None, data)
        if self.spool.known(key):
            self._taken[path] = sig
            return False
        ext = Path(path).suffix.lower()
        if not re.fullmatch(r"\.[a-z0-9]{1,8}", ext) or ext == ".json":
            ext = ""  # the decoder reads the content, not the name; .json names the spool's metadata
        try:
            self.spool.accept(key, data, ext, {"source": "watch", "received": time.time(), "path": path})
        except (SpoolFull, OSError) as exc:
            if not self._full_said:
                self.log(f"cannot spool {path}: {first_line(exc)} (left in place; retrying)")
                self._full_said = True
            return False
        self._full_said = False
        self._taken[path] = sig
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - the folder vanished, permissions: keep watching
                self.log(f"watching {self.folder}: {first_line(exc)}")
            stop.wait(self.interval)
