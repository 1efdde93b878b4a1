"""Time `xray-edge explain` on one image, after the model is loaded: occlusion, picture, PNG.

    .venv/bin/python tests/tools/bench_explain.py artifacts scan.jpg [--runs 3]

Prints the bare invoke time beside it: the occlusion is grid x grid + 1 invokes, so the two
move together on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from xray_edge import explain as ex
from xray_edge.model import open_model
from xray_edge.preprocess import load_image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("image", type=Path)
    ap.add_argument("--file", default=None)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    loaded = open_model(args.model, args.file, "auto", os.cpu_count())
    be, info = loaded.backend, loaded.info
    img = load_image(args.image, info.preprocessing)
    be.predict(img)
    n = ex.DEFAULT.grid ** 2 + 1
    t = time.perf_counter()
    for _ in range(n):
        be.predict(img)
    print(f"{loaded.path.name}: {n} bare invokes {time.perf_counter() - t:.3f} s")
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.runs):
            t = time.perf_counter()
            x = load_image(args.image, info.preprocessing)
            res = ex.explain_image(x, be.predict, info.labels, info.threshold)
            pic, caption = ex.picture(args.image, res)
            ex.write_png(pic, Path(tmp) / "x.png", caption, res)
            print(f"one image (decode, {n} invokes, picture, PNG): {time.perf_counter() - t:.3f} s")


if __name__ == "__main__":
    main()
