"""Find the model file, check it against its manifest, and read what its outputs mean."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from xray_edge.backends import open_backend
from xray_edge.errors import ModelError
from xray_edge.files import sha256_file
from xray_edge.manifest import MANIFEST_NAME, FileEntry, Manifest, check_digest, read_manifest
from xray_edge.metadata import ModelInfo, read_tflite_metadata

DEFAULT_FILE = "xray_int8.tflite"  # smallest and fastest on a Pi; the manifest may name another


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    manifest: Manifest | None  # None when a lone file is used with its embedded metadata
    entry: FileEntry | None  # the manifest's entry for this file


@dataclass(frozen=True)
class LoadedModel:
    resolved: ResolvedModel
    backend: object  # see xray_edge.backends
    info: ModelInfo
    sha256: str

    @property
    def path(self) -> Path:
        return self.resolved.path


def open_model(model: str | Path, file_name: str | None = None, backend: str = "auto",
               threads: int | None = None) -> LoadedModel:
    """Resolve, load and verify a model: the one entry point of classify, info and bench.

    The sha256 is computed on a second thread while the runtime loads the file (both release
    the GIL), so the check costs no start-up time; nothing is classified before it passes.

    Raises:
        ModelError: missing/malformed manifest, unlisted or mismatching file, unloadable model.
        RuntimeMissing: no runtime installed for this file type.
    """
    resolved = resolve_model(model, file_name)
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(sha256_file, resolved.path)
        try:
            be = open_backend(resolved.path, backend, threads)
        except ModelError:
            if resolved.entry is not None:  # a mismatch is the better diagnosis of a bad file
                check_digest(resolved.entry, resolved.path, digest.result())
            raise
        sha = digest.result()
    if resolved.entry is not None:
        check_digest(resolved.entry, resolved.path, sha)
    return LoadedModel(resolved, be, model_info(resolved, be), sha)


def resolve_model(model: str | Path, file_name: str | None = None) -> ResolvedModel:
    """Turn `--model` (an artifacts folder or a model file) into a model file and its manifest entry.

    A folder needs its manifest; a file is checked against a manifest beside it when that
    manifest lists it, and otherwise stands alone on its embedded metadata. (The sha256 check
    itself is in `open_model`.)
    """
    p = Path(model)
    if p.is_dir():
        manifest = read_manifest(p / MANIFEST_NAME)
        name = file_name or manifest.default or DEFAULT_FILE
        path = p / name
        if not path.is_file():
            listed = ", ".join(sorted(manifest.files)) or "none"
            raise ModelError(f"{path}: not found (the manifest lists: {listed})")
        return ResolvedModel(path, manifest, manifest.entry(path))
    if not p.exists():
        raise ModelError(f"{p}: model not found")
    side = p.parent / MANIFEST_NAME
    if side.exists():
        manifest = read_manifest(side)
        if p.name in manifest.files:
            return ResolvedModel(p, manifest, manifest.entry(p))
    return ResolvedModel(p, None, None)


def model_info(resolved: ResolvedModel, backend=None) -> ModelInfo:
    """Labels, threshold and preprocessing: from the manifest, else from the file itself."""
    if resolved.manifest is not None:
        m = resolved.manifest
        return ModelInfo(m.labels, m.threshold, m.preprocessing,
                         resolved.entry.format if resolved.entry else "", m.synthetic)
    if resolved.path.suffix.lower() == ".onnx":
        from xray_edge.metadata import parse_onnx_metadata

        meta = parse_onnx_metadata(getattr(backend, "metadata", {}) or {}, resolved.path)
    else:
        meta = read_tflite_metadata(resolved.path)
    if meta is None:
        raise ModelError(f"{resolved.path}: no embedded metadata and no {MANIFEST_NAME} beside it "
                         "(labels unknown); export it with xray-edge export")
    return ModelInfo.from_dict(meta)
