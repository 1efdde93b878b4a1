"""Fit the input gate's likeness score (edge/likeness.py, likeness.json) and measure it.

    python tests/tools/fit_likeness.py [--data ../shared/data] [--write] [--refuse DIR ...]

A logistic regression, by Newton's method with an L2 penalty (both classes weighted equally),
on `xray_edge.gate.measure`'s features of each model input (a 10 x 10 layout, a 5 x 5 grid of
gradient orientations and the gate's statistics):
- chest films: the real films of the shared data, one source at a time (chest-xray-small's COVID19
  films from publications and its NORMAL films from a children's archive are two sources;
  nih-adult, one hospital; figure1-covid), and 300 phantoms of `make train`;
- not: the non-radiographs gate_eval.py builds (blank, noise, pages, colour, smoothed noise,
  clouds, drawn slices, pydicom's pixels as PNG); not its held-out set, not your folders.

The bound is set on films alone: each source is scored by a fit that left it out, and the bias is
shifted so that 0.5% of those held-out scores fall below 0: about one film in 200 of a new
source refused. Then, with that bound, each kind of built non-radiograph is scored by a fit that
left its kind out, and the held-out pictures (matplotlib's, and every image under each --refuse
DIR, as it is and in grey) by the final fit: how far the score carries beyond what it was fitted
to. --write stores the final weights in edge/likeness.json (`make likeness`), or in FILE.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from gate_eval import SOURCES, generated, held_out, noise_and_slices, phantoms, pydicom_sets, user_sets
from xray_edge.gate import check_statistics, measure
from xray_edge.likeness import WEIGHTS
from xray_edge.preprocess import DEFAULT, load_images

PENALTY = 2.0  # L2 on the standardised weights: of 0.002-10, the most non-radiographs refused leaving their kind out
HELD_OUT_SHARE = 0.5  # % of a new source's films below the bound


def model_inputs(paths) -> np.ndarray:
    """The gate's input of each file that decodes: the model's geometry, before any intensity step."""
    images, _, _ = load_images([Path(p) for p in paths], DEFAULT.geometry)
    return images


def fit(pos: np.ndarray, neg: np.ndarray, penalty: float = PENALTY) -> tuple[np.ndarray, float]:
    """(weights, bias) of the raw features: logistic regression, the standardisation folded in."""
    x = np.concatenate([pos, neg])
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    c = np.r_[np.full(len(pos), 0.5 / len(pos)), np.full(len(neg), 0.5 / len(neg))]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = np.c_[(x - mu) / sd, np.ones(len(x))]
    ridge = np.full(z.shape[1], penalty)
    ridge[-1] = 0.0  # the bias is not penalised
    w = np.zeros(z.shape[1])
    for _ in range(100):
        p = 1 / (1 + np.exp(-(z @ w)))
        grad = z.T @ (c * (p - y)) + ridge * w
        hess = (z * (c * p * (1 - p))[:, None]).T @ z + np.diag(ridge)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    weights = w[:-1] / sd
    return weights, float(w[-1] - mu @ weights)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2].parent / "shared" / "data")
    ap.add_argument("--refuse", type=Path, action="append", default=[], metavar="DIR",
                    help="a folder of pictures that are not chest films, to measure the fit on")
    ap.add_argument("--penalty", type=float, default=PENALTY, help="the L2 penalty (default: %(default)s)")
    ap.add_argument("--write", type=Path, nargs="?", const=WEIGHTS, metavar="FILE",
                    help=f"store the fit (default FILE: {WEIGHTS})")
    args = ap.parse_args(argv)
    if not all((args.data / d).is_dir() for d in SOURCES.values()):
        ap.error(f"{args.data} lacks one of {', '.join(SOURCES.values())}")
    from xray_edge.inputs import walk_images

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        films = {name: model_inputs(sorted(walk_images(args.data / d))) for name, d in SOURCES.items()}
        films["phantoms"] = model_inputs(phantoms(out, 300))
        kinds = {**generated(out, args.data), **noise_and_slices(out), **pydicom_sets(out)}
        kinds.pop("pydicom DICOM files", None)  # the same pixels as "pydicom images as PNG"
        built = {k: model_inputs(v) for k, v in kinds.items()}
        held = {k: model_inputs(v) for k, v in {**held_out(out), **user_sets(out, [], args.refuse)[0]}.items()}
    feats = {name: np.stack([measure(x)[1] for x in v]) for name, v in {**films, **built}.items()}
    neg = np.concatenate([feats[k] for k in built])

    def positives(leave=None):
        return np.concatenate([f for name, f in feats.items() if name in films and name != leave])

    print(f"fitted to {sum(len(v) for v in films.values())} chest films "
          f"({', '.join(f'{k} {len(v)}' for k, v in films.items())}) and {len(neg)} built non-radiographs")
    print("\nleave one source out: each source scored by a fit without it")
    scores = {}
    for name in SOURCES:
        w, b = fit(positives(leave=name), neg, args.penalty)
        scores[name] = feats[name] @ w + b
    pooled = np.concatenate(list(scores.values()))
    shift = float(np.percentile(pooled, HELD_OUT_SHARE))
    for name, s in scores.items():
        print(f"  {name:26} {len(s):5d} films, below the bound {int((s < shift).sum()):3d} "
              f"({100 * np.mean(s < shift):.1f}%), at a bound of 0 {100 * np.mean(s < 0):.1f}%")
    print(f"  the bound: {shift:+.3f} on those scores ({HELD_OUT_SHARE}% of all {len(pooled)} held-out films below)")

    print("\nleave one kind out: each kind of built non-radiograph scored by a fit without it")
    for kind in built:
        w, b = fit(positives(), np.concatenate([feats[k] for k in built if k != kind]), args.penalty)
        s = feats[kind] @ w + b - shift
        print(f"  {kind:34} {int((s < 0).sum()):3d} of {len(s):3d} below the bound")

    w, b = fit(positives(), neg, args.penalty)
    b -= shift
    final = {name: feats[name] @ w + b for name in films}
    print(f"\nthe final fit: chest films below 0 "
          + ", ".join(f"{k} {int((final[k] < 0).sum())}/{len(final[k])}" for k in films))
    print("pictures it was not fitted to (as labelled by the whole gate: every bound, then likeness)")
    for name, images in held.items():
        refused = likeness_only = 0
        for x in images:
            st, f = measure(x)
            st["likeness"] = float(f @ w + b)
            broken = check_statistics(st)
            refused += broken is not None
            likeness_only += broken is not None and broken[0] == "likeness"
        print(f"  {name:34} {len(images):4d}: refused {refused:4d}, by likeness alone {likeness_only:4d}")
    if args.write:
        head = {"about": "xray_edge.likeness: fitted by tests/tools/fit_likeness.py; score = features @ weights + bias",
                "films": {k: len(v) for k, v in films.items()}, "non_radiographs": len(neg),
                "penalty": args.penalty, "held_out_share": HELD_OUT_SHARE, "bias": float(f"{b:.6g}")}
        rows = [", ".join(f"{v:.6g}" for v in w[i:i + 10]) for i in range(0, len(w), 10)]
        args.write.write_text("{\n" + "".join(f"{json.dumps(k)}: {json.dumps(v)},\n" for k, v in head.items())
                           + '"weights": [\n' + ",\n".join(rows) + "\n]}\n")
        print(f"\nwrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
