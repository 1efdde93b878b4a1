"""Decode a list of images once, in parallel, into a uint8 array cached on disk.

The cache key covers every file's bytes, the preprocessing recipe and its version, so a changed
image or recipe never reuses stale pixels, and a second run starts without decoding.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click
import numpy as np

from xray_edge.errors import ImageError
from xray_edge.files import atomic_write_bytes
from xray_edge.preprocess import Preprocessing, load_image


def cache_key(paths: list[Path], spec: Preprocessing) -> str:
    h = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode())
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:32]


def _decode(args: tuple[str, Preprocessing]):
    path, spec = args
    try:
        return load_image(path, spec), None
    except ImageError as err:
        return None, str(err)


def decode_images(paths: list[Path], spec: Preprocessing, cache_dir: Path | None,
                  workers: int | None = None, label: str = "decoding") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode `paths` with the one preprocessing.

    Returns:
        (images uint8 [n_ok, H, W, C], ok index per image into `paths`, error messages). A bad
        file is reported and skipped; the others are still decoded.
    """
    if not paths:
        return np.zeros((0, *spec.shape), np.uint8), np.zeros(0, np.int64), []
    key = cache_key(paths, spec) if cache_dir else None
    if key:
        hit = _load(cache_dir, key)
        if hit is not None:
            click.echo(f"{label}: {len(paths)} images from cache ({cache_dir / key}.npz)", err=True)
            return hit
    images = np.zeros((len(paths), *spec.shape), np.uint8)
    ok = np.zeros(len(paths), bool)
    errors: list[str] = []
    workers = workers or os.cpu_count() or 1
    jobs = [(str(p), spec) for p in paths]
    with ProcessPoolExecutor(max_workers=workers) as pool, \
            click.progressbar(pool.map(_decode, jobs, chunksize=4), length=len(jobs),
                              label=label, file=sys.stderr) as bar:
        for i, (arr, err) in enumerate(bar):
            if err:
                errors.append(err)
            else:
                images[i], ok[i] = arr, True
    idx = np.flatnonzero(ok)
    result = (images[idx], idx, errors)
    if key:
        _save(cache_dir, key, result)
    return result


def _load(cache_dir: Path, key: str):
    f = cache_dir / f"{key}.npz"
    try:
        with np.load(f, allow_pickle=False) as z:
            return z["images"], z["ok"], [str(e) for e in z["errors"]]
    except (OSError, KeyError, ValueError):
        return None


def _save(cache_dir: Path, key: str, result) -> None:
    images, ok, errors = result
    buf = io.BytesIO()
    np.savez(buf, images=images, ok=ok, errors=np.asarray(errors, dtype=str))
    try:
        atomic_write_bytes(cache_dir / f"{key}.npz", buf.getvalue())
    except OSError as exc:  # a read-only cache only costs time
        click.echo(f"warning: cannot write decode cache ({exc})", err=True)
