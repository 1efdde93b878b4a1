"""All or nothing: an export's files are staged beside the destination and published as a set.

Every file of one export is written into a hidden staging folder inside the destination (same
filesystem, so a rename moves it without copying) and proven there. Only when every requested
format has passed its gates is the set published; a failure before that deletes the staging
folder and leaves the destination exactly as it was.

Publishing is several renames, which are not atomic together. The order makes every moment
safe for a reader, because readers trust a model file only when the manifest lists its sha256
(the edge runner refuses a mismatch, `xray_edge.model.open_model`):

1. model files first: while the old manifest is still in place, a replaced file no longer
   matches the sha256 it lists, so the runner refuses it instead of mixing two models;
2. files of the previous export that this one does not make are removed (the old manifest
   then names a missing file: refused too);
3. the manifest last, in one rename: from then on the folder holds exactly the new set.

A process killed between two renames thus leaves an old manifest whose every file is either its
own (accepted) or refused, never a silent mix; the next export publishes a whole set again.
A versioned subfolder behind an atomically swapped symlink would make the switch one rename, but
symlinks do not survive every way a folder reaches a device (FAT sticks, zip), and the runner
reads plain files. Training files (model.keras, training.json, metrics, plots) are never
touched: only the names in `owned` are ever replaced or removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from xray_edge.manifest import MANIFEST_NAME, Manifest, write_manifest

PREFIX = ".export-staging-"


class Staging:
    """A staging folder inside `out`; removed on exit unless it was published.

    Args:
        out: the destination folder (created when missing).
        before: called with a step name before each rename or removal while publishing
            ("place xray.onnx", "remove xray_float16.tflite", "place manifest.json"); tests use it
            to interrupt the export between two renames.
    """

    def __init__(self, out: Path, before: Callable[[str], None] | None = None):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        remove_abandoned(self.out)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=self.out))
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

    def publish(self, manifest: Manifest, owned: Iterable[str]) -> None:
        """Move the staged files listed in `manifest` into `out`, then the manifest itself.

        Args:
            manifest: lists the staged files (each already written here and proven).
            owned: every file name an export may write; those not in this manifest are removed.
        """
        write_manifest(self.dir, manifest)
        for name in manifest.files:
            self._before(f"place {name}")
            os.replace(self.dir / name, self.out / name)
            self.changed.append(name)
        for name in sorted(set(owned) - set(manifest.files)):
            if (self.out / name).exists():
                self._before(f"remove {name}")
                (self.out / name).unlink()
                self.changed.append(name)
        _fsync_dir(self.out)  # the model files are on disk before the manifest that names them
        self._before(f"place {MANIFEST_NAME}")
        os.replace(self.dir / MANIFEST_NAME, self.out / MANIFEST_NAME)
        _fsync_dir(self.out)
        self.discard()

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def remove_abandoned(out: Path) -> None:
    """Delete staging folders left by exports that were killed (their process is gone)."""
    for d in out.glob(f"{PREFIX}*"):
        pid = d.name[len(PREFIX):].split("-", 1)[0]
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


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
