"""`manifest.json`: what binds labels, threshold, preprocessing and sha256 to the model files.

Export writes it (see `xray_edge.export.pipeline`); the edge runner reads and verifies it here.
"""

from __future__ import annotations

import json
from pathlib import Path

from xray_edge.errors import ModelError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


def read_manifest(path: Path) -> dict:
    """Load and sanity-check a manifest; every problem is a one-line ModelError."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"{path}: manifest not found") from None
    except OSError as exc:
        raise ModelError(f"{path}: cannot read manifest ({exc.strerror or exc})") from None
    try:
        m = json.loads(raw)
    except ValueError as exc:
        raise ModelError(f"{path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict) or "labels" not in m:
        raise ModelError(f"{path}: manifest is malformed (needs 'labels' and 'files')")
    if m.get("schema") != SCHEMA_VERSION:
        raise ModelError(f"{path}: manifest schema {m.get('schema')!r} is not {SCHEMA_VERSION}")
    return m


def manifest_entry(manifest: dict, model_path: Path) -> dict:
    """The manifest's entry for a model file; ModelError when the file is not listed."""
    entry = manifest["files"].get(model_path.name)
    if not isinstance(entry, dict) or "sha256" not in entry:
        raise ModelError(f"{model_path}: not listed in its folder's {MANIFEST_NAME}")
    return entry


def check_digest(entry: dict, model_path: Path, actual: str) -> None:
    """Raise ModelError when the file's sha256 is not the one the manifest recorded."""
    if actual != entry["sha256"]:
        raise ModelError(f"{model_path}: sha256 {actual[:12]}... does not match the manifest's "
                         f"{str(entry['sha256'])[:12]}... (corrupt or replaced file)")
