"""Find the model file, check it against its manifest, and read what its outputs mean."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_edge.backends import MappedModel, choose_backend, map_model, open_backend, read_model_bytes
from xray_edge.errors import ModelError, first_line
from xray_edge.files import MAX_MODEL_BYTES, read_regular
from xray_edge.manifest import MANIFEST_NAME, FileEntry, Manifest, check_digest, read_manifest
from xray_edge.metadata import ModelInfo, parse_onnx_metadata, read_tflite_metadata

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
    first_invoke_ms: float = 0.0  # the check run at load time, which is also the cold invoke

    @property
    def path(self) -> Path:
        return self.resolved.path


def open_model(model: str | Path, file_name: str | None = None, backend: str = "auto",
               threads: int | None = None, *, mapped: bool = False) -> LoadedModel:
    """Resolve, verify and load a model: the one entry point of classify, info and bench.

    The file is read once; its sha256 is checked against the manifest and the runtime loads
    those same bytes, so nothing can change the file in between (the hash is computed while the
    runtime parses, and checked before anything runs). Then every fact the runner
    relies on is checked before any image is read: the input shape and type fit the
    preprocessing, the outputs fit the labels, the labels embedded in the file agree with the
    manifest's, and one inference on a blank image runs.

    `mapped=True` (a .tflite file; for short-lived processes such as `classify`): the runtime
    maps the file instead of getting a copy in memory; it is hashed through a mapping and
    loaded from the same open file, which must then show the size, mtime and ctime it had when
    opened (`backends.MappedModel`); a file changed in the last 2 s is read as usual. A long-running
    process keeps the copy: page-cache eviction or a later write cannot change what it runs.

    Raises:
        ModelError: missing/malformed manifest, unlisted or mismatching file, unloadable model,
            a model that does not fit its manifest.
        RuntimeMissing: no runtime installed for this file type.
    """
    resolved = resolve_model(model, file_name)
    choose_backend(resolved.path, backend)  # an unknown file type or backend fails before reading
    source = map_model(resolved.path) if mapped and resolved.path.suffix.lower() == ".tflite" else None
    try:
        return _load(resolved, backend, threads, source if source is not None else read_model_bytes(resolved.path))
    finally:
        if source is not None:
            source.close()  # the runtime holds its own mapping


def _load(resolved: ResolvedModel, backend: str, threads: int | None, data: bytes | MappedModel) -> LoadedModel:
    """open_model's checks on the bytes read or the file mapped."""
    # Hash on a second thread while the runtime parses the same bytes (both release the GIL);
    # nothing runs on the model before the digest has matched.
    with ThreadPoolExecutor(max_workers=1) as pool:
        digest = pool.submit(data.sha256 if isinstance(data, MappedModel) else lambda: hashlib.sha256(data).hexdigest())
        try:
            be = open_backend(resolved.path, backend, threads, content=data)
        except ModelError:
            if resolved.entry is not None:  # a mismatch is the better diagnosis of a bad file
                check_digest(resolved.entry, resolved.path, digest.result())
            raise
        sha = digest.result()
    if resolved.entry is not None:
        check_digest(resolved.entry, resolved.path, sha)
    info = model_info(resolved, be, data.file if isinstance(data, MappedModel) else data)
    check_fit(resolved.path, be, info)
    t = time.perf_counter()
    try:
        y = np.asarray(be.predict(np.zeros(info.preprocessing.shape, np.uint8)))
    except Exception as exc:  # noqa: BLE001 - the runtime's own errors on a model that loads
        raise ModelError(f"{resolved.path}: cannot run on a {info.preprocessing.shape} image "
                         f"({first_line(exc)})") from None
    first_ms = (time.perf_counter() - t) * 1e3
    _check_units(resolved.path, y.shape[-1] if y.ndim == 1 else None, info, "gives")
    if not np.all(np.isfinite(y)):
        raise ModelError(f"{resolved.path}: gives a non-finite output ({y.tolist()[:4]}) on a blank image")
    if isinstance(data, MappedModel) and not data.unchanged():
        raise ModelError(f"{resolved.path}: changed while it was being loaded (run again once it is written)")
    return LoadedModel(resolved, be, info, sha, first_ms)


def check_fit(path: Path, backend, info: ModelInfo) -> None:
    """ModelError unless the model takes the preprocessing's array and its outputs fit the labels."""
    want = info.preprocessing.shape
    shape = tuple(backend.input_shape)
    fixed = [(d, w) for d, w in zip(shape[1:], want) if isinstance(d, (int, np.integer)) and d > 0]
    if len(shape) != 4 or any(d != w for d, w in fixed):
        raise ModelError(f"{path}: input shape {list(shape)} does not take the manifest's "
                         f"{want[0]}x{want[1]}x{want[2]} images")
    out = tuple(backend.output_shape)
    if len(out) != 2:
        raise ModelError(f"{path}: output shape {list(out)} is not [batch, classes]")
    units = out[-1] if isinstance(out[-1], (int, np.integer)) and out[-1] > 0 else None
    _check_units(path, units, info, "has")


def _check_units(path: Path, units: int | None, info: ModelInfo, verb: str) -> None:
    if units is None:
        return
    n = len(info.labels)
    fits = n == 2 if units == 1 else units == n
    if not fits:
        raise ModelError(f"{path}: the model {verb} {units} output{'s' if units != 1 else ''} but "
                         f"{n} labels are given ({'a single sigmoid output needs two labels' if units == 1 else 'one label per output'})")


def resolve_model(model: str | Path, file_name: str | None = None) -> ResolvedModel:
    """See `_resolve`; a path that cannot be inspected (permissions, name too long) is a ModelError."""
    try:
        return _resolve(model, file_name)
    except OSError as exc:
        raise ModelError(f"{exc.filename or model}: cannot open ({exc.strerror or first_line(exc)})") from None


def _resolve(model: str | Path, file_name: str | None = None) -> ResolvedModel:
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
        if not path.exists():  # a FIFO or a folder under that name is refused by its reader, by name
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


def model_info(resolved: ResolvedModel, backend=None, data=None) -> ModelInfo:
    """Labels, threshold and preprocessing: from the manifest, else from the file itself.

    `data`: the file's bytes or a binary file open on it, when already read or opened.
    When both exist, the labels embedded in the file must be the manifest's: swapped labels
    would invert every answer.
    """
    embedded = _embedded(resolved.path, backend, data)
    if resolved.manifest is not None:
        m = resolved.manifest
        if embedded is not None and "labels" in embedded:
            inner = embedded["labels"]
            if not isinstance(inner, list) or [str(x) for x in inner] != list(m.labels):
                raise ModelError(f"{resolved.path}: labels in the file {inner!r} differ from the "
                                 f"manifest's {list(m.labels)!r}")
        return ModelInfo(m.labels, m.threshold, m.preprocessing,
                         resolved.entry.format if resolved.entry else "", m.synthetic)
    if embedded is None:
        raise ModelError(f"{resolved.path}: no embedded metadata and no {MANIFEST_NAME} beside it "
                         "(labels unknown); export it with xray-edge export")
    return ModelInfo.from_dict(embedded)


def _embedded(path: Path, backend, data) -> dict | None:
    if path.suffix.lower() == ".onnx":
        return parse_onnx_metadata(getattr(backend, "metadata", {}) or {}, path)
    return read_tflite_metadata(path, data)
