"""Decoded images in one uint8 `.npy` file on disk: rows written by many processes, read by row.

The file is a plain `.npy` (`np.load(path, mmap_mode="r")` opens it). Rows are read with
`pread` into one batch buffer rather than through a memory map: mapped pages count towards the
process's resident memory until unmapped, so an epoch over a 12 GB map would show 12 GB
resident; `pread` leaves the file in the OS page cache and the process holds one batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class ImageStore:
    """Rows of a uint8 array of shape (n, H, W, C) stored as `.npy` at `path`.

    Example:
        >>> store = ImageStore.create(path, 1000, (200, 200, 3))
        >>> store.write(0, image)            # from any process
        >>> batch = store.read([3, 4, 9])   # (3, 200, 200, 3) uint8
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        m = np.load(self.path, mmap_mode="r")  # parses the header; no page is touched
        if m.dtype != np.uint8 or m.ndim != 4 or not m.flags.c_contiguous:
            raise ValueError(f"{self.path}: not a uint8 (n, H, W, C) image store")
        self.shape: tuple[int, ...] = m.shape
        self.offset = int(m.offset)
        del m
        self.row_bytes = int(np.prod(self.shape[1:]))
        self._fd: int | None = None
        self._pid: int | None = None

    @classmethod
    def create(cls, path: str | os.PathLike, n: int, image_shape: tuple[int, int, int]) -> "ImageStore":
        """A new store of `n` zero rows (a sparse file: disk fills as rows are written)."""
        m = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, *image_shape))
        del m
        return cls(path)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def fd(self) -> int:
        # opened lazily, and again after a fork or a pickle into a worker process
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDWR), os.getpid()
        return self._fd

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}

    def write(self, row: int, image: np.ndarray) -> None:
        data = np.ascontiguousarray(image, np.uint8)
        if data.shape != self.shape[1:]:
            raise ValueError(f"image shape {data.shape} is not the store's {self.shape[1:]}")
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], self.offset + row * self.row_bytes + done)

    def read(self, rows) -> np.ndarray:
        """The images at `rows` in that order; runs of consecutive rows are read in one call."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), *self.shape[1:]), np.uint8)
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"rows outside 0..{len(self) - 1}")
        flat = memoryview(out).cast("B")
        starts = np.flatnonzero(np.diff(rows, prepend=rows[0] - 2) != 1)
        for a, b in zip(starts, [*starts[1:], len(rows)]):
            self._read_exact(flat[a * self.row_bytes:b * self.row_bytes],
                             self.offset + int(rows[a]) * self.row_bytes)
        return out

    def _read_exact(self, view: memoryview, pos: int) -> None:
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], pos + done)
            if n == 0:
                raise OSError(f"{self.path}: file ends early (truncated store)")
            done += n

    def rows(self, rows) -> "RowView":
        """An indexable view of some rows, read one image at a time (for plots)."""
        return RowView(self, np.asarray(rows, np.int64))

    def flush(self) -> None:
        """Make the rows written so far durable (before recording them as done)."""
        os.fsync(self.fd)

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class RowView:
    def __init__(self, store: ImageStore, rows: np.ndarray):
        self.store, self._rows = store, rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.store.read([self._rows[i]])[0]
