"""Edge runner figures on this machine, side by side with the tutorial's route.

    python tests/tools/bench_edge.py --artifacts artifacts [--runs 200] [--cold 7]

Prints, per exported file: size, load, first invoke, batch-of-one latency p50/p99, images/s with
decoding, peak memory; the runner's own overhead per image; folder throughput with decoding on
1 vs 2 threads; and the cold start of `xray-edge classify one.jpg` in a new process against the
tutorial's route (import TensorFlow, load_model, predict) on the same image.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path



def cold(cmd: list[str], n: int) -> tuple[float, float]:
    """Median wall seconds and max peak RSS (MB) of running `cmd` n times."""
    walls, rss = [], []
    for _ in range(n):
        t = time.perf_counter()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
        walls.append(time.perf_counter() - t)
        if p.returncode != 0:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-500:]}")
        rss.append(int(p.stderr.strip().splitlines()[-1]) / 1024)
    return statistics.median(walls), max(rss)


PHASES = r"""
import json, sys, time
t0 = time.perf_counter()
import click
from xray_edge import cli
t1 = time.perf_counter()
from xray_edge.classify import Classifier
from xray_edge.inputs import expand_inputs
t2 = time.perf_counter()
from xray_edge.model import open_model
import os
loaded = open_model(sys.argv[1], threads=os.cpu_count(), mapped=True)  # as classify loads it
t3 = time.perf_counter()
out = list(Classifier(loaded.backend, loaded.info).classify_paths(expand_inputs([sys.argv[2]])))
assert hasattr(out[0], 'label'), f'not a classification: {out[0]}'  # a refusal is no figure
t4 = time.perf_counter()
print(json.dumps({"click and cli": (t1 - t0) * 1e3, "numpy, Pillow, runner": (t2 - t1) * 1e3,
                  "runtime import, model load and sha256": (t3 - t2) * 1e3,
                  "decode and first invoke": (t4 - t3) * 1e3}))
"""


def run_phases(artifacts: Path, image: Path) -> str:
    """Where a cold classify spends its time (Python's own start-up is not included)."""
    p = subprocess.run([sys.executable, "-c", PHASES, str(artifacts), str(image)],
                       capture_output=True, text=True, check=True)
    return p.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--cold", type=int, default=7, help="new-process runs for the cold-start medians")
    args = ap.parse_args()

    from xray_edge.bench import run_bench, synthetic_jpeg
    from xray_edge.classify import Classifier
    from xray_edge.manifest import MANIFEST_NAME, read_manifest
    from xray_edge.model import open_model

    manifest = read_manifest(args.artifacts / MANIFEST_NAME)
    tmp = Path(tempfile.mkdtemp())
    jpeg = synthetic_jpeg(tmp / "one.jpg", 1024)

    print(f"{'file':<22}{'MB':>7}{'load ms':>9}{'1st ms':>8}{'p50 ms':>8}{'p99 ms':>8}{'img/s':>7}{'RSS MB':>8}")
    for name in manifest.files:
        d = run_bench(str(args.artifacts), name, "auto", args.runs, jpeg, os.cpu_count())
        print(f"{name:<22}{d['size_mb']:>7.1f}{d['load_ms']:>9.0f}{d['first_invoke_ms']:>8.1f}"
              f"{d['latency_p50_ms']:>8.2f}{d['latency_p99_ms']:>8.2f}{d['images_per_s_with_decode']:>7.0f}"
              f"{d['peak_rss_mb']:>8.0f}")

    # the runner's own overhead: classify_array (decision, dicts) minus the bare invoke
    loaded = open_model(args.artifacts, threads=os.cpu_count())
    be, resolved = loaded.backend, loaded.resolved
    clf = Classifier(be, loaded.info)
    from xray_edge.preprocess import load_image

    x = load_image(jpeg)
    for _ in range(20):
        clf.classify_array(x)
    # interleaved, per call, medians: a noisy machine shifts both alike
    bare, full = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        be.predict(x)
        bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        clf.classify_array(x)
        full.append(time.perf_counter() - t)
    b, f = statistics.median(bare) * 1e3, statistics.median(full) * 1e3
    print(f"\nrunner overhead per image (median classify_array minus median bare invoke, {args.runs} "
          f"interleaved runs): {f - b:+.3f} ms ({resolved.path.name}: invoke {b:.3f} ms, "
          f"classify_array {f:.3f} ms)")

    # a folder: decoding overlapped with inference
    paths = [jpeg] * 60
    for workers in (1, 2):
        t = time.perf_counter()
        for _ in clf.classify_paths(paths, workers=workers):
            pass
        print(f"folder of {len(paths)} 1024x1024 JPEGs, {workers} decode thread(s): "
              f"{len(paths) / (time.perf_counter() - t):.0f} images/s")

    # cold start: ours vs the tutorial's route. An installed wheel has its .pyc files (pip
    # compiles them at install); an editable checkout under PYTHONDONTWRITEBYTECODE has none and
    # would compile every module of the package at every run (about 0.03 s here), so compile them.
    import compileall

    import xray_edge

    compileall.compile_dir(Path(xray_edge.__file__).parent, quiet=1)
    ours = [sys.executable, "-m", "xray_edge.cli", "classify", "-m", str(args.artifacts), str(jpeg)]
    tutorial = [sys.executable, "-c",
                "import os; os.environ['TF_CPP_MIN_LOG_LEVEL']='3'\n"
                "import numpy as np, tensorflow as tf, keras\n"
                f"m = keras.saving.load_model({str(args.artifacts / 'model.keras')!r})\n"
                f"img = keras.utils.load_img({str(jpeg)!r}, target_size=(200, 200))\n"
                "print(m.predict(np.asarray(img)[None], verbose=0))"]
    # The floor under any runner of this file: Python, numpy and the runtime imported, the model
    # loaded (XNNPACK packs its weights at every load) and invoked once on zeros; no Pillow, click,
    # manifest, sha256, decode or gate.
    floor = [sys.executable, "-c",
             "import os; os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')  # as classify\n"
             "import numpy as np\n"
             "try:\n    from ai_edge_litert.interpreter import Interpreter\n"
             "except ImportError:\n    from tflite_runtime.interpreter import Interpreter\n"
             f"it = Interpreter(model_path={str(resolved.path)!r}, num_threads={os.cpu_count()})\n"
             "it.allocate_tensors(); d = it.get_input_details()[0]\n"
             "it.set_tensor(d['index'], np.zeros(d['shape'], d['dtype'])); it.invoke()"]
    phases = [json.loads(run_phases(args.artifacts, jpeg)) for _ in range(args.cold)]
    print("\ncold start by phase, new process each, medians of", args.cold, "runs (ms): " + ", ".join(
        f"{k} {statistics.median(p[k] for p in phases):.0f}" for k in phases[0]))
    w1, r1 = cold(ours, args.cold)
    print(f"\ncold `xray-edge classify one.jpg` ({resolved.path.name}): median {w1:.3f} s, peak {r1:.0f} MB")
    if resolved.path.suffix == ".tflite":
        w0, r0 = cold(floor, args.cold)
        print(f"the runtime alone (Python, numpy, LiteRT, load, one invoke on zeros): median {w0:.3f} s, "
              f"peak {r0:.0f} MB; classify is {w1 / w0:.2f}x that")
    if (args.artifacts / "model.keras").exists():
        w2, r2 = cold(tutorial, max(3, args.cold // 2))
        print(f"tutorial route (import TensorFlow, load_model, predict): median {w2:.3f} s, peak {r2:.0f} MB")


if __name__ == "__main__":
    main()
