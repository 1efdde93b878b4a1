"""Decode a list of images once, in parallel, into an image store cached on disk.

The cache key covers every file's name and bytes, the preprocessing recipe and its version, so
a changed image or recipe never reuses stale pixels, and a second run starts without decoding.
Worker processes write pixels straight into the store (`train/store.py`); the parent records
which rows are done every few seconds, so an interrupted decode resumes where it stopped. The
store gets its final name only once every row is decoded (or known to be a bad file).

Trainings that share the cache take turns on one set of images: each holds an exclusive lock
(`KEY.lock`, flock) while it decodes or checks that set, so a second run waits for the first
and then reuses its store instead of writing into it. The lock goes with its process, killed
or not; no stale lock is left to clear.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import time
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from xray_edge.errors import ImageError
from xray_edge.files import atomic_write_bytes, open_regular
from xray_edge.preprocess import Preprocessing, load_image
from xray_edge.train.store import ImageStore
from xray_edge.train.workers import process_pool

Progress = Callable[[str, int, int], None]  # (label, done, total), called as work completes
Log = Callable[[str], None]

PENDING, OK, BAD = 0, 1, 2  # row status
FLUSH_SECONDS = 2.0  # how much decoding an interruption may cost
CHUNK = 16  # images per task sent to a worker
# Starting a worker process costs about as much as decoding a few dozen small images in place.
MIN_IMAGES_PER_WORKER = 64


@dataclass
class Decoded:
    store: ImageStore  # one row per path, in the order given; rows of bad files stay zero
    ok: np.ndarray  # indices into the paths of the images that decoded
    errors: list[str]  # one line per bad file


def cache_key(paths: list[Path], spec: Preprocessing) -> str:
    h = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode())
    for p in paths:
        h.update(Path(p).name.encode() + b"\0")
        try:
            f = open_regular(p)  # a FIFO among the images would block here
        except OSError as exc:  # the decoder reports the file; its state still keys the cache
            h.update(f"unreadable {exc.errno}".encode())
            continue
        with f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()[:32]


@contextlib.contextmanager
def _locked(lock_file: Path, label: str, log: Log):
    """Hold an exclusive lock on `lock_file`; say so when another process holds it first."""
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{label}: waiting for another training that is decoding the same images ({lock_file})")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def decode_to_store(paths: list[Path], spec: Preprocessing, folder: Path, workers: int | None = None,
                    label: str = "decoding", progress: Progress | None = None,
                    log: Log | None = None) -> Decoded:
    """Decode `paths` into `folder`/KEY.npy, or reuse it: see the module docstring.

    Args:
        folder: a writable folder (the cache, or a temporary one).
        progress: called with (label, done, total) while decoding.

    Returns:
        Decoded: the store, the indices of the readable images, one message per bad file.
    """
    log = log or (lambda s: None)
    folder.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, spec)
    with _locked(folder / f"{key}.lock", label, log):
        return _decode_locked(paths, spec, folder, key, workers, label, progress, log)


def _decode_locked(paths, spec, folder: Path, key: str, workers, label, progress, log) -> Decoded:
    final, partial = folder / f"{key}.npy", folder / f"{key}.partial.npy"
    state_file = folder / f"{key}.state.npz"
    shape = (len(paths), *spec.shape)
    status, errors, described = _load_state(state_file, len(paths))
    # the state counts only for the very file it was written about (same device and inode)
    if status is not None and (status != PENDING).all() and described == _file_id(final):
        store = _open(final, shape)
        if store is not None:
            log(f"{label}: {len(paths)} images from cache ({final})")
            return _decoded(store, status, errors)
    store = _open(partial, shape)
    if store is None or status is None or described != _file_id(partial):
        store = ImageStore.create(partial, len(paths), spec.shape)
        status, errors = np.zeros(len(paths), np.uint8), {}
    elif (status != PENDING).any():
        log(f"{label}: resuming, {int((status != PENDING).sum())} of {len(paths)} already decoded")
    pending = int((status == PENDING).sum())
    workers = min(workers or os.cpu_count() or 1, math.ceil(pending / MIN_IMAGES_PER_WORKER))
    if workers > 1:
        log(f"{label}: {pending} images with {workers} worker processes into {partial}")
    _decode_pending(store, paths, spec, status, errors, state_file, workers, label, progress)
    store.close()
    os.replace(partial, final)
    return _decoded(_open(final, shape), status, errors)


def _decode_pending(store: ImageStore, paths, spec, status, errors, state_file, workers: int,
                    label, progress) -> None:
    pending = np.flatnonzero(status == PENDING)
    total = len(paths)
    report = progress or (lambda *a: None)
    done = total - len(pending)
    report(label, done, total)
    chunks = [[(int(i), str(paths[i])) for i in pending[a:a + CHUNK]] for a in range(0, len(pending), CHUNK)]
    last_flush = time.monotonic()

    def record(results) -> None:
        nonlocal last_flush, done
        for i, err in results:
            status[i] = BAD if err else OK
            if err:
                errors[i] = err
        done += len(results)
        report(label, done, total)
        if time.monotonic() - last_flush > FLUSH_SECONDS:
            _checkpoint(store, status, errors, state_file)
            last_flush = time.monotonic()

    try:
        if workers <= 1:
            for chunk in chunks:
                record(_decode_chunk(store, spec, chunk))
        else:
            with process_pool(workers) as pool:
                futures = [pool.submit(_decode_chunk, store, spec, c) for c in chunks]
                try:
                    for fut in as_completed(futures):
                        record(fut.result())
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:  # done or interrupted: keep what is finished
        _checkpoint(store, status, errors, state_file)


def _decode_chunk(store: ImageStore, spec: Preprocessing, items: list[tuple[int, str]]):
    out = []
    for i, path in items:
        try:
            store.write(i, load_image(path, spec))
            out.append((i, None))
        except ImageError as err:
            out.append((i, str(err)))
    return out


def _checkpoint(store: ImageStore, status, errors: dict, state_file: Path) -> None:
    store.flush()  # pixels on disk before the state says they are there
    rows = np.fromiter(errors, np.int64, len(errors))
    buf = io.BytesIO()
    np.savez(buf, status=status, error_rows=rows, error_messages=np.asarray([errors[i] for i in rows], dtype=str),
             store_id=np.asarray(_file_id(store.path), np.uint64))
    atomic_write_bytes(state_file, buf.getvalue())


def _load_state(state_file: Path, n: int):
    try:
        with np.load(state_file, allow_pickle=False) as z:
            status = z["status"]
            errors = dict(zip(z["error_rows"].tolist(), map(str, z["error_messages"])))
            described = tuple(int(v) for v in z["store_id"])
    except (OSError, KeyError, ValueError):  # a state without store_id: from before, decoded again
        return None, {}, None
    if status.shape != (n,) or status.dtype != np.uint8:
        return None, {}, None
    return status.copy(), errors, described


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode): which file a state describes; a rename keeps it, a new file changes it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _open(path: Path, shape: tuple[int, ...]) -> ImageStore | None:
    try:
        store = ImageStore(path)
    except (OSError, ValueError):
        return None
    expected = store.offset + math.prod(shape)
    if store.shape != shape or path.stat().st_size != expected:
        store.close()
        return None
    return store


def _decoded(store: ImageStore, status: np.ndarray, errors: dict) -> Decoded:
    return Decoded(store, np.flatnonzero(status == OK), [errors[i] for i in sorted(errors)])
