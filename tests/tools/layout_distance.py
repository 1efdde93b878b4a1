"""Would the layout of the image itself, fitted to a model's training films, refuse the pictures
the input gate's statistics let through, without refusing films from another hospital?

    python tests/tools/layout_distance.py [--shared ../shared/data] [--run RUN] [--refuse DIR ...]

Features of the gate's input (200 x 200 grey): 10 x 10 block means, standardised, and a 5 x 5
grid of 8 gradient orientations (square roots of their shares). Fitted to half of one real set
(chest-xray-small, nih-adult) or of 300 phantoms, a distance is the larger of two ratios to the
fitted half's 99.5th percentile: Mahalanobis in K principal components and the residual outside
them. With --run, also fitted to the training films of a training folder (training.json;
--splits for others), the way a model's gate would be fitted; those films are then left out of
the real sets. Prints, for K = 5, 10, 20 and bounds of 1-2, the share of each real set refused
(the fitted set's other half) and how many of the misses are: the distinct non-radiographs of
`make gate-eval` and the pictures under each DIR (also in grey) that the statistics accept.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np


def layout_features(images: np.ndarray) -> np.ndarray:
    g = images[..., 0].astype(np.float64)
    n = len(g)
    means = g.reshape(n, 10, 20, 10, 20).mean((2, 4)).reshape(n, -1)
    means = (means - means.mean(1, keepdims=True)) / (means.std(1, keepdims=True) + 1e-9)
    h = g.reshape(n, 100, 2, 100, 2).mean((2, 4))
    dy, dx = np.zeros_like(h), np.zeros_like(h)
    dy[:, 1:-1], dx[:, :, 1:-1] = h[:, 2:] - h[:, :-2], h[:, :, 2:] - h[:, :, :-2]
    bins = np.minimum(((np.arctan2(dy, dx) % np.pi) / np.pi * 8).astype(int), 7)
    mag = np.hypot(dx, dy)
    grid = np.stack([(mag * (bins == b)).reshape(n, 5, 20, 5, 20).sum((2, 4)) for b in range(8)], -1)
    grid = grid.reshape(n, -1)
    return np.c_[means / 10, np.sqrt(grid / (grid.sum(1, keepdims=True) + 1e-9))]


def fitted(features: np.ndarray, k: int):
    """distance(X): the larger of Mahalanobis-in-k and residual, each over its 99.5th percentile
    on `features`."""
    mu = features.mean(0)
    _, s, vt = np.linalg.svd(features - mu, full_matrices=False)

    def raw(x):
        z = x - mu
        p = z @ vt[:k].T
        return np.sqrt(((p / (s[:k] / np.sqrt(len(features)))) ** 2).mean(1)), np.linalg.norm(z - p @ vt[:k], axis=1)

    m0, r0 = raw(features)
    bm, br = np.percentile(m0, 99.5), np.percentile(r0, 99.5)

    def distance(x):
        m, r = raw(x)
        return np.maximum(m / bm, r / br)

    return distance


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--refuse", type=Path, action="append", default=[], metavar="DIR")
    ap.add_argument("--run", type=Path, help="a training folder: fit to its training films too")
    ap.add_argument("--splits", default="train",
                    help="with --run, the splits of training.json to fit to (default: %(default)s; "
                         "validation,test are the films export holds)")
    args = ap.parse_args(argv)
    from gate_eval import noise_and_slices, phantoms, pydicom_sets, user_sets
    from xray_edge.errors import ImageError
    from xray_edge.gate import decide_image
    from xray_edge.inputs import walk_images
    from xray_edge.preprocess import DEFAULT, load_image

    def plain(paths):
        out = []
        for p in paths:
            try:
                out.append(load_image(p, DEFAULT.geometry))
            except ImageError:
                pass
        return np.stack(out) if out else np.zeros((0, 200, 200, 3), np.uint8)

    fits = {}
    trained = set()
    if args.run:
        import json

        files = json.loads((args.run / "training.json").read_text())["files"]
        trained = {str(Path(p).resolve()) for split in args.splits.split(",") for p in files[split]}
        fits[f"{args.splits} of {args.run.name}"] = layout_features(plain(sorted(trained)))
    films = {name: layout_features(plain([p for p in sorted(walk_images(args.shared / name))
                                          if str(Path(p).resolve()) not in trained]))
             for name in ("chest-xray-small", "nih-adult", "figure1-covid") if (args.shared / name).is_dir()}
    fits.update({f"half of {name}": f[::2] for name, f in films.items() if name != "figure1-covid"})
    with tempfile.TemporaryDirectory() as tmp:
        sets = {**noise_and_slices(Path(tmp)), **pydicom_sets(Path(tmp)), **user_sets(Path(tmp), [], args.refuse)[0]}
        drawn = layout_features(plain(phantoms(Path(tmp), 300)))  # what the default `make train` sees
        fits["half of 300 phantoms"] = drawn[::2]
        films["the other phantoms"] = drawn[1::2]
        misses = {x.tobytes(): x for paths in sets.values() for x in plain([p for p in paths if p.suffix != ".dcm"])
                  if decide_image(x).accepted}  # keyed by content: a grey picture and its grey copy count once
    miss = layout_features(np.stack(list(misses.values())))
    print(f"{len(miss)} non-radiographs accepted by the statistics")
    for fit, features in fits.items():
        for k in (5, 10, 20):
            distance = fitted(features, k)
            for bound in (1.0, 1.25, 1.5, 2.0):
                shares = "  ".join(
                    f"{name} {100 * np.mean(distance(f[1::2] if fit == f'half of {name}' else f) > bound):4.1f}%"
                    for name, f in films.items())
                print(f"fit {fit:22} K={k:2d} bound {bound:4}: films refused {shares}  "
                      f"| misses refused {int((distance(miss) > bound).sum())}/{len(miss)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
