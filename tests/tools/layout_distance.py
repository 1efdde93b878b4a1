"""Would the layout of the image itself, fitted to a model's training films, refuse the pictures
the input gate's statistics let through, without refusing films from another hospital?

    python tests/tools/layout_distance.py [--shared ../shared/data] [--run RUN] [--refuse DIR ...]

Features of the gate's input (200 x 200 grey): 10 x 10 block means, standardised, and a 5 x 5 grid
of 8 gradient orientations (square roots of their shares): `xray_edge.likeness.layout`, which the
gate's likeness score weighs. A distance is the larger of two ratios:
the Mahalanobis distance in the K first principal components of the films fitted to, and the
residual outside them, each over its 99.5th percentile on other films of the same kind (new films
lie farther than those the components were fitted to). Fits: half of chest-xray-small, of nih-adult
and of 300 phantoms, a quarter scaling, the last quarter counted; with --run, the training films of
a training folder (training.json; --splits for others), scaled by its validation films
(--calibrate), the way a model's gate would be fitted, those films left out of the real sets.
Prints, for K = 5, 10, 20 and bounds of 1-2, the share of each real set and of the phantoms
refused, and how many of the misses are: the distinct non-radiographs of `make gate-eval` and the
pictures under each DIR (also in grey) that every bound of the statistics but likeness accepts.
Then each of the four sources (chest-xray-small's two classes are two) is counted under a fit to
the other three.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def layout_features(images: np.ndarray) -> np.ndarray:
    """xray_edge.likeness.layout of each model input (grey, 200 x 200)."""
    from xray_edge.likeness import layout

    return np.stack([layout(x[..., 0]) for x in images])


def fitted(features: np.ndarray, k: int, calibration: np.ndarray | None = None):
    """distance(X): the larger of Mahalanobis-in-k and residual, each over its 99.5th percentile
    on `calibration` (default: `features`, which the components fit more closely than new films)."""
    mu = features.mean(0)
    _, s, vt = np.linalg.svd(features - mu, full_matrices=False)

    def raw(x):
        z = x - mu
        p = z @ vt[:k].T
        return np.sqrt(((p / (s[:k] / np.sqrt(len(features)))) ** 2).mean(1)), np.linalg.norm(z - p @ vt[:k], axis=1)

    m0, r0 = raw(features if calibration is None else calibration)
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
    ap.add_argument("--calibrate", metavar="SPLIT", default="validation",
                    help="with --run, the split whose 99.5th percentiles scale the distance "
                         "(default: %(default)s; none: the films fitted to); left out of the real sets")
    args = ap.parse_args(argv)
    from gate_eval import SOURCES, noise_and_slices, phantoms, pydicom_sets, statistics_accept, user_sets
    from xray_edge.gate import image_statistics
    from xray_edge.inputs import walk_images
    from xray_edge.preprocess import DEFAULT, load_images

    def plain(paths):  # the gate's input: the model's geometry, before any intensity step
        return load_images([Path(p) for p in paths], DEFAULT.geometry)[0]

    # Each fit: (films fitted to, films whose 99.5th percentiles scale the distance, the set it
    # came from, whose remaining films are the ones counted for it).
    fits = {}
    used = set()
    if args.run:
        import json

        files = json.loads((args.run / "training.json").read_text())["files"]
        fit_paths = sorted({str(Path(p).resolve()) for split in args.splits.split(",") for p in files[split]})
        scale_paths = [str(Path(p).resolve()) for p in files[args.calibrate]] if args.calibrate != "none" else []
        fitted_films = layout_features(plain(fit_paths))
        scale = layout_features(plain(scale_paths)) if scale_paths else fitted_films
        fits[f"{args.splits} of {args.run.name}"] = (fitted_films, scale, None)
        used = set(fit_paths) | set(scale_paths)
    sources = {name: layout_features(plain([p for p in sorted(walk_images(args.shared / folder))
                                            if str(Path(p).resolve()) not in used]))
               for name, folder in SOURCES.items() if (args.shared / folder).is_dir()}
    cxs = [f for name, f in sources.items() if name.startswith("chest-xray-small/")]
    films = {**({"chest-xray-small": np.concatenate(cxs)} if cxs else {}),
             **{k: v for k, v in sources.items() if not k.startswith("chest-xray-small/")}}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {**noise_and_slices(Path(tmp)), **pydicom_sets(Path(tmp)), **user_sets(Path(tmp), [], args.refuse)[0]}
        drawn = plain(phantoms(Path(tmp), 300))  # what the default `make train` sees
        films["phantoms"] = layout_features(drawn)
        # what every bound but likeness accepts, keyed by content: a grey picture and its grey copy count once
        misses = {x.tobytes(): x for paths in sets.values() for x in plain([p for p in paths if p.suffix != ".dcm"])
                  if statistics_accept(x)}
    for name in ("chest-xray-small", "nih-adult", "phantoms"):  # half fitted, a quarter scales, a quarter counted
        if name in films and len(films[name]) >= 8:
            f = films[name]
            fits[f"half of {name}"] = (f[0::2], f[1::4], name)
    miss = layout_features(np.stack(list(misses.values()))) if misses else np.zeros((0, 300))
    print(f"{len(miss)} non-radiographs accepted by every bound of the statistics (likeness aside)")
    for fit, (fitted_films, scale, source) in fits.items():
        for k in (5, 10, 20):
            distance = fitted(fitted_films, k, scale)
            for bound in (1.0, 1.25, 1.5, 2.0):
                shares = "  ".join(f"{name} {100 * np.mean(distance(f[3::4] if name == source else f) > bound):4.1f}%"
                                   for name, f in films.items())
                print(f"fit {fit:22} K={k:2d} bound {bound:4}: films refused {shares}  "
                      f"| misses refused {int((distance(miss) > bound).sum())}/{len(miss)}")
    for left in sources:  # three sources fitted (half, the other half scales), the fourth counted
        rest = [f for name, f in sources.items() if name != left]
        distance = fitted(np.concatenate([f[0::2] for f in rest]), 20, np.concatenate([f[1::2] for f in rest]))
        for bound in (1.0, 1.25, 1.5, 2.0):
            print(f"fit all sources but {left:24} K=20 bound {bound:4}: {left} refused "
                  f"{100 * np.mean(distance(sources[left]) > bound):4.1f}%  | misses refused "
                  f"{int((distance(miss) > bound).sum())}/{len(miss)}")
    one = drawn[:1]  # one phantom's model input, timed
    fitted_films, scale, _ = next(iter(fits.values()))
    distance = fitted(fitted_films, 20, scale)
    for label, step in (("layout distance", lambda: distance(layout_features(one))),
                        ("gate statistics", lambda: image_statistics(one[0]))):
        t0 = time.perf_counter()
        for _ in range(200):
            step()
        print(f"{label}: {(time.perf_counter() - t0) / 200 * 1e3:.2f} ms per input")
    return 0


if __name__ == "__main__":
    sys.exit(main())
