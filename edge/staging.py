"""All or nothing: a set of files staged beside their destination and published as a set.

Every file of one run (an export, a training) is written into a hidden staging folder inside the
destination (same filesystem, so a rename moves it without copying). Only when the run has
succeeded is the set published; a failure before that deletes the staging folder and leaves the
destination exactly as it was.

Publishing is several renames, which are not atomic together. The order makes every moment safe
for a reader that trusts a file only when the set's index file (`last`: export's manifest.json,
training's training.json) records its sha256:

1. the other files first: while the old index is still in place, a replaced file no longer
   matches the sha256 it records, so the reader refuses it instead of mixing two runs;
2. files of the previous run that this one does not make are removed;
3. the index last, in one rename: from then on the folder holds exactly the new set.

A process killed before step 3 leaves its staging folder, which the next run in that folder
removes (`remove_abandoned`, when the process that made it is gone). Only the names in `owned`
are ever replaced or removed: the folder's other files are never touched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from xray_edge.files import fsync_dir


class Staging:
    """A staging folder inside `out`; removed on exit unless it was published.

    Args:
        out: the destination folder (created when missing).
        before: called with a step name before each rename or removal while publishing
            ("place xray.onnx", "remove roc.png", "place manifest.json"); tests use it to
            interrupt a run between two renames.
        prefix: names the staging folders of one kind of run (".export-staging-").
    """

    prefix = ".staging-"

    def __init__(self, out: Path, before: Callable[[str], None] | None = None, prefix: str | None = None):
        self.prefix = prefix or self.prefix
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        remove_abandoned(self.out, self.prefix)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}{os.getpid()}-", dir=self.out))
        self._before = before or (lambda step: None)
        self.changed: list[str] = []  # names already replaced or removed in `out` by publish()

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        self.discard()

    def path(self, name: str) -> Path:
        return self.dir / name

    def write(self, name: str, data: bytes) -> Path:
        path = self.path(name)
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return path

    def publish_files(self, names: Iterable[str], last: str, owned: Iterable[str]) -> None:
        """Move the staged `names` into `out`, remove the `owned` names this run did not make,
        then move the staged `last` (the set's index) into place."""
        names = [n for n in names if n != last]
        for name in names:
            self._before(f"place {name}")
            os.replace(self.dir / name, self.out / name)
            self.changed.append(name)
        for name in sorted(set(owned) - set(names) - {last}):
            if (self.out / name).exists():
                self._before(f"remove {name}")
                (self.out / name).unlink()
                self.changed.append(name)
        fsync_dir(self.out)  # the files are on disk before the index that names them
        self._before(f"place {last}")
        os.replace(self.dir / last, self.out / last)
        fsync_dir(self.out)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def remove_abandoned(out: Path, prefix: str) -> None:
    """Delete staging folders left by runs that were killed (their process is gone)."""
    for d in out.glob(f"{prefix}*"):
        pid = d.name[len(prefix):].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True

