"""Which real images calibrate the int8 model, and which (never the same) prove parity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xray_edge.errors import XrayEdgeError
from xray_edge.inputs import walk_images
from xray_edge.training_record import TrainingRecord


@dataclass(frozen=True)
class ImageSets:
    calibration: list[Path]  # from the training split
    parity: list[Path]  # validation and test splits: disjoint from calibration
    source: str
    pool: int = 0  # the training images calibration was drawn from


def sample(paths: list[Path], n: int, seed: int) -> list[Path]:
    """A reproducible sample of up to n paths (same seed and list -> same sample)."""
    paths = sorted(paths)
    if len(paths) <= n:
        return paths
    idx = np.random.default_rng(seed).permutation(len(paths))[:n]
    return [paths[i] for i in sorted(idx)]


def image_sets(record: TrainingRecord | None, data: Path | None, n_calibration: int, n_parity: int,
               seed: int) -> ImageSets:
    """Calibration from training images, parity from held-out ones.

    Uses the split lists of the training record (training.json, None when there is none); with
    `data` (a folder of images, e.g. a dataset root) instead, splits its images in two halves
    reproducibly.
    """
    if data is None and record is not None:
        train = record.split("train")[0]
        held = record.split("validation")[0] + record.split("test")[0]
        if train and held:
            return ImageSets(sample(train, n_calibration, seed), sample(held, n_parity, seed + 1),
                             "training.json: training split / validation+test splits", len(train))
    if data is None:
        raise XrayEdgeError("no images for calibration and parity: no training.json with the "
                            "training file lists beside the model; pass --data FOLDER")
    allp = sorted(walk_images(Path(data)))
    if len(allp) < 4:
        raise XrayEdgeError(f"{data}: needs at least 4 images for calibration and parity, found {len(allp)}")
    order = np.random.default_rng(seed).permutation(len(allp))
    half = len(allp) // 2
    cal = [allp[i] for i in order[:half]]
    par = [allp[i] for i in order[half:]]
    return ImageSets(sample(cal, n_calibration, seed), sample(par, n_parity, seed + 1),
                     f"{data}: random halves (seed {seed})", len(cal))
