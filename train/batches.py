"""Batches read from an image store while Keras trains: memory does not grow with the data set.

Each epoch draws a new permutation (from the seed and the epoch number, so a run repeats);
each batch reads its rows in file order, and runs of neighbouring rows in one call.
With N devices (data-parallel), the last batch is padded to a multiple of N with copies of its
last image at sample weight 0; the trainer's loss and metrics are weighted, so the padding
changes no gradient and no accuracy.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from xray_edge.train.store import ImageStore


class Batches(keras.utils.PyDataset):
    """(images, labels[, weights]) batches of `rows` of `store`, or images only without labels.

    Args:
        rows: store rows to use (e.g. the images that decoded).
        labels: class index per row; None for prediction.
        seed: shuffle every epoch with this seed; None keeps `rows` in order.
        devices: pad each batch to a multiple of this many devices.
        weights: sample weight per row (class or source balance); None: all 1.
    """

    def __init__(self, store: ImageStore, rows, labels=None, batch_size: int = 32,
                 seed: int | None = None, devices: int = 1, weights=None):
        # no worker threads: Keras starts them before calling on_epoch_begin, so a batch could be
        # read with the last epoch's order; reading a batch is one pread per run of rows
        super().__init__()
        if batch_size % devices:
            raise ValueError(f"batch size {batch_size} is not a multiple of {devices} devices")
        self.store, self.rows = store, np.asarray(rows, np.int64)
        self.labels = None if labels is None else np.asarray(labels)
        self.weights = None if weights is None else np.asarray(weights, np.float32)
        self.batch_size, self.seed, self.devices = batch_size, seed, devices
        self.epoch = 0
        self.order = np.arange(len(self.rows))

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def on_epoch_begin(self) -> None:
        if self.seed is not None:
            self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.rows))
        self.epoch += 1

    def __getitem__(self, i: int):
        pos = self.order[i * self.batch_size:(i + 1) * self.batch_size]
        pos = pos[np.argsort(self.rows[pos], kind="stable")]
        x = self.store.read(self.rows[pos])
        pad = -len(pos) % self.devices
        if self.labels is None:
            return (_pad(x, pad),)
        y = self.labels[pos]
        if self.devices == 1 and self.weights is None:
            return x, y
        w = np.ones(len(pos), np.float32) if self.weights is None else self.weights[pos]
        w = np.concatenate([w, np.zeros(pad, np.float32)])
        return _pad(x, pad), _pad(y, pad), w


def predict(model: keras.Model, store: ImageStore, rows, batch_size: int, devices: int = 1) -> np.ndarray:
    """`model`'s outputs for `rows` of `store`, streamed in batches (float32, padding removed)."""
    rows = np.asarray(rows, np.int64)
    if len(rows) == 0:
        return np.zeros((0, model.outputs[0].shape[-1]), np.float32)
    out = model.predict(Batches(store, rows, batch_size=batch_size, devices=devices), verbose=0)
    # the batch size is a multiple of the device count: padding sits at the very end only
    return np.asarray(out, np.float32)[:len(rows)][_inverse_of_batch_sort(rows, batch_size)]


def _inverse_of_batch_sort(rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Each batch reads its rows sorted; this maps outputs back to the order of `rows`."""
    perm = np.concatenate([a + np.argsort(rows[a:a + batch_size], kind="stable")
                           for a in range(0, len(rows), batch_size)])
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    return inv


def _pad(a: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([a, np.repeat(a[-1:], n, axis=0)]) if n else a
