"""All or nothing: an export's files are staged beside the destination and published as a set
(the mechanism is `xray_edge.staging`'s, shared with training).

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

from pathlib import Path
from typing import Iterable

from xray_edge import staging
from xray_edge.manifest import MANIFEST_NAME, Manifest, write_manifest

PREFIX = ".export-staging-"


class Staging(staging.Staging):
    """A staging folder inside `out` for one export; see `xray_edge.staging.Staging`."""

    prefix = PREFIX

    def publish(self, manifest: Manifest, owned: Iterable[str]) -> None:
        """Move the staged files listed in `manifest` into `out`, then the manifest itself.

        Args:
            manifest: lists the staged files (each already written here and proven).
            owned: every file name an export may write; those not in this manifest are removed.
        """
        write_manifest(self.dir, manifest)
        self.publish_files(manifest.files, MANIFEST_NAME, owned)


def remove_abandoned(out: Path) -> None:
    """Delete staging folders left by exports that were killed (their process is gone)."""
    staging.remove_abandoned(out, PREFIX)
