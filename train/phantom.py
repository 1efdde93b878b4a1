"""The embedded default dataset: synthetic "phantom" chest X-rays, generated deterministically.

Two lung fields, ribs, a mediastinum and noise; the OPACITY-bearing class adds soft blobs in the
lungs, standing in for the ground-glass opacities of COVID-19 pneumonia. They let `make train`
run offline on a fresh clone. They are NOT X-rays: a root `SYNTHETIC` file marks the folder, and
every output trained on it says so.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from xray_edge.train.dataset import SYNTHETIC_MARKER
from xray_edge.train.workers import process_pool

CLASSES = ("COVID19", "NORMAL")  # same names and order as the tutorial's dataset
GENERATOR_VERSION = "2"


def phantom_image(rng: np.random.Generator, opacities: bool, size: int = 256,
                  marker: bool = False) -> np.ndarray:
    """One grayscale phantom, uint8 (size, size).

    `marker` adds a bright square label in the top-left corner, like a hospital's burned-in
    text: a planted shortcut for testing saliency (not used by the default data set).
    """
    return phantom_with_lungs(rng, opacities, size, marker)[0]


def phantom_lung_mask(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """The lung fields (bool (size, size)) of the phantom that `phantom_image` draws from `rng`.

    Pass a generator in the same state as the one given to phantom_image (same seed).
    """
    return phantom_with_lungs(rng, False, size)[1]


def phantom_with_lungs(rng: np.random.Generator, opacities: bool, size: int = 256,
                       marker: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(phantom uint8, lung mask bool): the ground truth of where a model ought to look."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.full((size, size), 25.0, np.float32)
    # torso and soft tissue
    cx, cy = 0.5 + rng.normal(0, 0.02), 0.55 + rng.normal(0, 0.02)
    torso = ((xx - cx) / 0.46) ** 2 + ((yy - cy) / 0.55) ** 2 < 1
    img[torso] = 115 + rng.normal(0, 8)
    lungs = np.zeros_like(img, bool)
    for side in (-1, 1):
        lx = cx + side * (0.18 + rng.normal(0, 0.015))
        ly = cy - 0.05 + rng.normal(0, 0.015)
        ax, ay = 0.13 + rng.normal(0, 0.01), 0.3 + rng.normal(0, 0.02)
        lungs |= ((xx - lx) / ax) ** 2 + ((yy - ly) / ay) ** 2 < 1
    img[lungs] = 55 + rng.normal(0, 6)
    # ribs: curved bright bands over the lungs
    period = 0.075 + rng.normal(0, 0.005)
    phase = rng.uniform(0, 1)
    ribs = np.sin(2 * np.pi * ((yy + 0.6 * (xx - cx) ** 2) / period + phase)) > 0.55
    img[ribs & lungs] += 35
    # mediastinum and spine
    img[(np.abs(xx - cx) < 0.06 + 0.02 * (yy > cy)) & torso] = 170 + rng.normal(0, 8)
    if opacities:
        for _ in range(rng.integers(3, 6)):
            inside = np.argwhere(lungs)
            oy, ox = inside[rng.integers(len(inside))] / size
            s = rng.uniform(0.06, 0.11)
            blob = np.exp(-(((xx - ox) ** 2 + (yy - oy) ** 2) / (2 * s * s)))
            img += rng.uniform(70, 110) * blob * lungs
    img += rng.normal(0, 7, img.shape)
    if marker:  # after the noise draw, so the rest of the image is the unmarked phantom's
        m = int(round(0.08 * size))
        img[int(0.03 * size):int(0.03 * size) + m, int(0.03 * size):int(0.03 * size) + m] = 250
    return np.clip(img, 0, 255).astype(np.uint8), lungs


def generate_phantoms(out: Path, n_train: int = 60, n_test: int = 20, seed: int = 0,
                     size: int = 256, workers: int | None = None) -> Path:
    """Write out/{train,test}/{COVID19,NORMAL}/*.png (n per class per split); skip if present.

    Drawn in parallel; each image depends only on (seed, class, index, split), so the set is the
    same whatever the number of workers.

    Returns:
        `out`, a dataset folder that `xray_edge.train.dataset.discover` reads like a real one.
    """
    stamp = out / SYNTHETIC_MARKER
    expected = f"xray-edge phantom v{GENERATOR_VERSION} n_train={n_train} n_test={n_test} seed={seed}"
    expected += f" size={size}\n" if size != 256 else "\n"
    if stamp.exists() and stamp.read_text() == expected:
        return out
    stamp.unlink(missing_ok=True)
    jobs = []
    for split, n in (("train", n_train), ("test", n_test)):
        for ci, cls in enumerate(CLASSES):
            folder = out / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob("*.png"):
                old.unlink()
            jobs += [(folder / f"phantom_{split}_{cls.lower()}_{i:04d}.png", [seed, ci, i, 0 if split == "train" else 1],
                      cls == "COVID19", size) for i in range(n)]
    chunks = [jobs[a:a + 64] for a in range(0, len(jobs), 64)]
    workers = min(workers or os.cpu_count() or 1, len(chunks))
    if workers <= 1:
        for c in chunks:
            _write_phantoms(c)
    else:
        with process_pool(workers) as pool:
            list(pool.map(_write_phantoms, chunks))
    stamp.write_text(expected)
    return out


def _write_phantoms(jobs) -> None:
    for path, rng_key, opacities, size in jobs:
        arr = phantom_image(np.random.default_rng(rng_key), opacities=opacities, size=size)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        # renamed into place, never half-written; not fsynced: the set is redrawn when its
        # stamp (written last) is missing, and thousands of fsyncs cost more than the drawing
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)


def generate_source(out: Path, counts: dict[str, int], seed: int, marker: bool = False,
                    films_per_patient: int = 1) -> Path:
    """A phantom data source laid out as bare out/<class>/*.png, for tests of several sources.

    `counts`: images per class (COVID19 phantoms carry opacities, any other class not).
    `marker`: every image carries the source's planted marker (a bright corner square), as a
    hospital's burned-in label would. With `films_per_patient` > 1, out/labels.csv groups the
    films of each (made-up) patient, as nih-adult's does.
    """
    rows = []
    for ci, (cls, n) in enumerate(sorted(counts.items())):
        folder = out / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = phantom_image(np.random.default_rng([seed, ci, i, 2]), opacities=cls == "COVID19",
                                marker=marker)
            name = f"{cls.lower()}_{i:04d}.png"
            Image.fromarray(arr).save(folder / name)
            rows.append(f"{cls}/{name},{cls},{seed}-{cls}-{i // films_per_patient}")
    if films_per_patient > 1:
        (out / "labels.csv").write_text("file,class,patient\n" + "\n".join(rows) + "\n")
    (out / SYNTHETIC_MARKER).write_text(f"xray-edge phantom source seed={seed} marker={marker}\n")
    return out
