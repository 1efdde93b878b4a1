"""Peak memory of `classify` on a folder of the largest images the decoder accepts.

    python tests/tools/decode_memory.py make /tmp/worst --kind png16 --count 4
    /usr/bin/time -v python tests/tools/decode_memory.py run artifacts /tmp/worst --threads 4

`make` writes COUNT images of MAX_PIXELS (7999 x 7999) in a separate process, so their creation
does not count; `run` classifies the folder with THREADS decode threads (a 4-core Pi runs four)
and prints the process's peak resident memory (ru_maxrss), which /usr/bin/time -v also reports
as "Maximum resident set size".
"""

from __future__ import annotations

import argparse
import resource
from pathlib import Path


def make(folder: Path, kind: str, count: int) -> None:
    import numpy as np
    from PIL import Image

    from xray_edge.decode import MAX_PIXELS

    side = int(MAX_PIXELS ** 0.5)
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.tile(np.linspace(0, 1, side, dtype=np.float32), (side, 1))
    for i in range(count):
        if kind == "png16":
            img, name = Image.fromarray((ramp * 4095 + i).astype(np.uint16)), f"worst{i}.png"
        elif kind == "rgba":
            grey = (ramp * 255).astype(np.uint8)
            img, name = Image.fromarray(np.dstack([grey, grey, grey, 255 - grey]), "RGBA"), f"worst{i}.png"
        else:
            img, name = Image.fromarray((ramp * 255).astype(np.uint8)).convert("RGB"), f"worst{i}.jpg"
        img.save(folder / name)
        del img


def run(artifacts: str, folder: Path, threads: int) -> None:
    from xray_edge.classify import Classifier
    from xray_edge.inputs import expand_inputs
    from xray_edge.model import open_model

    loaded = open_model(artifacts, threads=1)
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = 0
    for item in Classifier(loaded.backend, loaded.info).classify_paths(expand_inputs([str(folder)]),
                                                                       workers=threads):
        print(item if isinstance(item, Exception) else f"{item.path}\t{item.label}")
        n += 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"images={n} threads={threads} peak_rss_mb={peak:.0f} after_model_load_mb={after_load:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("folder", type=Path)
    m.add_argument("--kind", choices=["png16", "rgba", "jpeg"], default="png16")
    m.add_argument("--count", type=int, default=4)
    r = sub.add_parser("run")
    r.add_argument("artifacts")
    r.add_argument("folder", type=Path)
    r.add_argument("--threads", type=int, default=4)
    a = ap.parse_args()
    if a.cmd == "make":
        make(a.folder, a.kind, a.count)
    else:
        run(a.artifacts, a.folder, a.threads)


if __name__ == "__main__":
    main()
