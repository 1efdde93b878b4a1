"""Would a distance in the model's own feature space refuse what the input gate's statistics let
through? Issue 23 proposed it; this measures it before anything is built.

    python tests/tools/feature_distance.py RUN [--shared ../shared/data] [--refuse DIR ...]

RUN is a training folder (model.keras, training.json) of real films. Features are the Dense
layer's activations (the layer before the sigmoid). Three distances to the training split's
features: Mahalanobis in its 20 first principal components (standardised features), the
residual outside them, and 1 - the mean cosine similarity of the 5 nearest training films. Rows:
the splits, the real sets of ../shared/data, the non-radiographs of `make gate-eval` that the
statistics accept (every bound but likeness, which came later), and all of them; with --refuse
DIR, the images under DIR (in grey) that they accept. Needs the training extra.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--components", type=int, default=20)
    ap.add_argument("--refuse", type=Path, action="append", default=[], metavar="DIR",
                    help="a folder of non-radiographs: a row for those the statistics accept")
    args = ap.parse_args(argv)
    import keras

    from gate_eval import noise_and_slices, pydicom_sets, statistics_accept, user_sets
    from xray_edge.inputs import walk_images
    from xray_edge.preprocess import Preprocessing, load_images

    rec = json.loads((args.run / "training.json").read_text())
    spec = Preprocessing.from_dict(rec["preprocessing"])
    model = keras.saving.load_model(args.run / "model.keras", compile=False)
    dense = next(layer for layer in model.layers if layer.__class__.__name__ == "Dense")
    features = keras.Model(model.inputs, dense.output)

    def embed(paths):
        x = load_images([Path(p) for p in paths], spec)[0]
        return np.asarray(features.predict(x, batch_size=32, verbose=0)), x

    train, _ = embed(rec["files"]["train"])
    mu, sd = train.mean(0), train.std(0) + 1e-3
    _, s, vt = np.linalg.svd((train - mu) / sd, full_matrices=False)
    k = args.components
    unit = train / (np.linalg.norm(train, axis=1, keepdims=True) + 1e-9)

    def distances(f):
        z = (f - mu) / sd
        p = z @ vt[:k].T
        maha = np.sqrt(((p / (s[:k] / np.sqrt(len(train)))) ** 2).sum(1))
        resid = np.linalg.norm(z - p @ vt[:k], axis=1)
        cos = (f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-9)) @ unit.T
        return np.c_[maha, resid, 1 - np.sort(cos, axis=1)[:, -5:].mean(1)]

    rows = {"train": distances(train)}
    for split in ("validation", "test"):
        if rec["files"].get(split):
            rows[split] = distances(embed(rec["files"][split])[0])
    for name in ("chest-xray-small", "nih-adult", "figure1-covid"):
        if (args.shared / name).is_dir():
            rows[name] = distances(embed(sorted(walk_images(args.shared / name)))[0])
    with tempfile.TemporaryDirectory() as tmp:
        built = [p for paths in {**noise_and_slices(Path(tmp)), **pydicom_sets(Path(tmp))}.values()
                 for p in paths if p.suffix == ".png"]
        f, x = embed(built)
        accepted = [i for i in range(len(built)) if statistics_accept(x[i])]
        rows["built, accepted by the statistics"] = distances(f[accepted])
        rows["built, all"] = distances(f)
        names = [built[i].name for i in accepted]
        for name, paths in user_sets(Path(tmp), [], args.refuse)[0].items():
            if not name.endswith(", in grey") or not paths:
                continue
            x, index, _ = load_images(paths, spec)  # a file too small to decode is left out
            accepted = [i for i in range(len(x)) if statistics_accept(x[i])]
            if accepted:
                f = np.asarray(features.predict(x[accepted], batch_size=32, verbose=0))
                rows[f"{name.removeprefix('yours: ')}, accepted"] = distances(f)
                names += [paths[index[i]].name for i in accepted]
    print(f"{'set':<36}{'n':>5}  Mahalanobis p50/p99/max   residual p50/p99/max   5-NN cosine p50/p99/max")
    for name, d in rows.items():
        q = np.percentile(d, [50, 99, 100], axis=0)
        print(f"{name:<36}{len(d):>5}  " + "   ".join(
            f"{q[0, j]:6.3g} {q[1, j]:6.3g} {q[2, j]:6.3g}" for j in range(3)))
    print("accepted by the statistics:", ", ".join(names) or "none")
    real = [rows[n] for n in ("chest-xray-small", "nih-adult", "figure1-covid") if n in rows]
    if real:  # a bound no real film crosses: what it would refuse of the rest
        top = np.concatenate(real).max(0)
        print(f"beyond every real film (Mahalanobis > {top[0]:.3g} or 5-NN cosine > {top[2]:.3g}):")
        for name, d in rows.items():
            if "accepted" in name:
                print(f"  {name:<34}{int(((d[:, 0] > top[0]) | (d[:, 2] > top[2])).sum()):3d} of {len(d)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
