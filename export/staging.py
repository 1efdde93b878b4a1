"""All or nothing for an export: `xray_edge.staging` (shared with training) with the manifest
as the index written last.

What is export's own: every file is proven inside the staging folder before the set is
published; the edge runner trusts a model file only when the manifest lists its sha256
(`xray_edge.model.open_model`), so a process killed between two renames leaves an old manifest
whose files are each its own or refused, never a silent mix. Training files (model.keras,
training.json, metrics, plots) are never touched: only the names in `owned` are. A versioned
subfolder behind a swapped symlink would make the switch one rename, but symlinks do not survive
every way a folder reaches a device (FAT sticks, zip).
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
