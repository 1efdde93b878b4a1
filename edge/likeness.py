"""How much an image looks like a chest radiograph: one number for the input gate.

A linear score (logistic regression) over the image's coarse layout and the gate's own
statistics, fitted by ``tests/tools/fit_likeness.py`` to tell the real films of several sources
and the phantoms of ``make train`` from the non-radiographs ``tests/tools/gate_eval.py`` builds
(noise, pages, drawings, slices). Most of the grey photographs, icons and diagrams that pass every
single statistic lie on the far side of it (docs/edge.md: measured on pictures it was not fitted
to). Its bias is
shifted so that 0 is the bound: a film of a source it was not fitted to scores below 0 about once
in 200 (the fit's leave-one-source-out check).

The weights (``likeness.json``, 313 and a bias) are a discriminant, not a picture: they hold
no film and no mean film.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 200  # the grey image the layout is measured on (the default model input)
STATISTICS = ("black", "colour", "contrast", "edges", "falloff", "flat", "lungs", "mediastinum",
              "posterized", "roughness", "structure", "symmetry", "white")
WEIGHTS = Path(__file__).with_name("likeness.json")


def at_size(grey: np.ndarray) -> np.ndarray:
    """A float grey image resampled to SIZE x SIZE (returned as is when it already is)."""
    if grey.shape == (SIZE, SIZE):
        return grey
    return np.asarray(Image.fromarray(grey.astype(np.float32), "F").resize((SIZE, SIZE), Image.Resampling.BILINEAR))


def layout(grey: np.ndarray) -> np.ndarray:
    """300 numbers of a SIZE x SIZE grey image: 10 x 10 block means (standardised, over 10) and a
    5 x 5 grid of 8 gradient orientations (square roots of their shares of the gradient)."""
    g = np.asarray(grey, np.float64)
    means = g.reshape(10, SIZE // 10, 10, SIZE // 10).mean((1, 3)).ravel()
    means = (means - means.mean()) / (means.std() + 1e-9)
    h = g.reshape(SIZE // 2, 2, SIZE // 2, 2).mean((1, 3))
    dy, dx = np.zeros_like(h), np.zeros_like(h)
    dy[1:-1], dx[:, 1:-1] = h[2:] - h[:-2], h[:, 2:] - h[:, :-2]
    bins = np.minimum(((np.arctan2(dy, dx) % np.pi) / np.pi * 8).astype(np.intp), 7)
    # one weighted count: gradient magnitude per (cell of a 5 x 5 grid, orientation)
    grid = np.bincount((_cells() + bins).ravel(), weights=np.hypot(dx, dy).ravel(), minlength=5 * 5 * 8)
    return np.concatenate([means / 10, np.sqrt(grid / (grid.sum() + 1e-9))])


@lru_cache(maxsize=1)
def _cells() -> np.ndarray:
    """8 x the 5 x 5 grid cell of each pixel of the half-size image (cells in row order)."""
    cell = np.arange(SIZE // 2) // (SIZE // 10)
    return (cell[:, None] * 5 + cell[None, :]) * 8


def features(grey: np.ndarray, statistics: dict) -> np.ndarray:
    """What the score weighs: `layout` of a SIZE x SIZE grey image and its statistics (signed
    log scale: contrast and edges run to the hundreds)."""
    s = np.array([statistics[k] for k in STATISTICS], np.float64)
    return np.concatenate([layout(grey), np.sign(s) * np.log1p(np.abs(s))])


@lru_cache(maxsize=1)
def _weights() -> tuple[np.ndarray, float]:
    d = json.loads(WEIGHTS.read_text())
    return np.asarray(d["weights"], np.float64), float(d["bias"])


def score(x: np.ndarray) -> float:
    """The likeness of `features` x: above 0 like a chest film, below 0 not (a logit)."""
    w, b = _weights()
    return float(x @ w + b)
