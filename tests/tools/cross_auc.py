"""How well a trained model separates two sets no threshold was chosen on: ROC AUC of the disease
score of figure1-covid's COVID-19 films against the held-out NIH normals of the recipe study, and
the best that any single threshold could do on both (the smaller of the two shares called right).

    python tests/tools/cross_auc.py artifacts/study/robust_b8_s1 [RUN ...]

Each RUN is a study run folder (model.keras, training.json); the sets are the study's
(`nih_external/NORMAL` beside the runs) and ../shared/data/figure1-covid. Needs the training extra.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--figure1", type=Path, default=Path("../shared/data/figure1-covid"))
    args = ap.parse_args(argv)
    import keras

    from xray_edge.inputs import walk_images
    from xray_edge.metrics import positive_index, positive_score, roc_auc
    from xray_edge.preprocess import Preprocessing, load_images

    for run in args.runs:
        record = json.loads((run / "training.json").read_text())
        spec = Preprocessing.from_dict(record["preprocessing"])
        pos = positive_index(record["classes"], record.get("positive_class"))
        model = keras.saving.load_model(run / "model.keras", compile=False)
        scores = {}
        for name, folder in (("normal", run.parent / "nih_external" / "NORMAL"), ("covid", args.figure1)):
            images = load_images(sorted(walk_images(folder)), spec)[0]
            scores[name] = positive_score(np.asarray(model.predict(images, batch_size=32, verbose=0)), pos)
        y = np.r_[np.zeros(len(scores["normal"])), np.ones(len(scores["covid"]))]
        auc = roc_auc(y, np.r_[scores["normal"], scores["covid"]])
        best = max(min(float((scores["normal"] < t).mean()), float((scores["covid"] >= t).mean()))
                   for t in np.linspace(0, 1, 1001))
        print(json.dumps({"run": run.name, "figure1_vs_nih_normal_auc": round(auc, 3),
                          "best_single_threshold_min_share": round(best, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
