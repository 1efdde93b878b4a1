"""The recipe study of docs/training.md: candidates x seeds on the shared sets, one table.

Training data: chest-xray-small plus every second patient's NIH normals (nih-adult/NORMAL, split
by patient). External (never used in training): the other NIH patients' normals with the NIH
pneumonia films of patients not in training, and figure1-covid. Each run is a plain
`xray-edge train` with the candidate's options; the table is read from its metrics.json.

    python tests/tools/recipe_study.py --shared ../shared/data [--epochs 10] [--seeds 1,2,3]
        [--candidates baseline,robust] [--export]

--export also exports each run (float32, int8) and measures the int8 frame share with
`xray-edge report` (slow). Needs ../shared; run with the project's .venv.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Every knob the candidates differ in is given explicitly: `train --data` has its own defaults
# for real films (robust_b8 since this study), which must not leak into the other rows.
_TUTORIAL = ["--photometric", "0", "--border-erase", "0", "--batch-size", "32"]
_ROBUST = ["--balance", "class", "--photometric", "0.3", "--border-erase", "0.5"]
CANDIDATES = {
    # the tutorial's recipe, adult normals in training, no weighting
    "baseline": ["--balance", "none", *_TUTORIAL],
    # every class the same weight in the loss
    "balanced": ["--balance", "class", *_TUTORIAL],
    # + contrast/gamma/noise augmentation and blanking of the outer band where markers sit
    "robust": [*_ROBUST, "--batch-size", "32"],
    # + each film's histogram equalised: part of the one preprocessing, so on the device too
    "equalized": [*_ROBUST, "--batch-size", "32", "--intensity", "equalize"],
    # the same two with four times as many weight updates per epoch (batch 8 instead of 32):
    # at batch 32 and Adam 1e-4 a 30-epoch run is 270 updates and ends under-fitted
    "robust_b8": [*_ROBUST, "--batch-size", "8"],
    "equalized_b8": [*_ROBUST, "--batch-size", "8", "--intensity", "equalize"],
    # robust_b8 plus blur and JPEG-like re-compression in training (the last augmentations)
    "degraded_b8": [*_ROBUST, "--batch-size", "8", "--degrade", "0.5"],
}


def prepare(shared: Path, work: Path) -> tuple[Path, Path]:
    """(NIH training half, NIH external set) as folders of links, split by patient."""
    rows = list(csv.DictReader(open(shared / "nih-adult" / "labels.csv", newline="")))
    normal_patients = sorted({r["patient"] for r in rows if r["class"] == "NORMAL"})
    train_patients = set(normal_patients[0::2])
    train, ext = work / "nih_train", work / "nih_external"
    labels = []
    for r in rows:
        src = (shared / "nih-adult" / r["file"]).resolve()
        if r["class"] == "NORMAL" and r["patient"] in train_patients:
            dst = train / r["file"]
            labels.append({"file": r["file"], "patient": r["patient"]})
        elif r["patient"] in train_patients:
            continue  # a training patient's pneumonia film would not be external
        else:
            dst = ext / r["file"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            dst.symlink_to(src)
    with open(train / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["file", "patient"])
        w.writeheader()
        w.writerows(labels)
    return train, ext


def run(cmd: list[str], log) -> int:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode


def measures(out: Path, exported: bool) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    nih, f1 = m["external"]["nih"]["folders"], m["external"]["figure1"]["folders"]
    row = {
        "nih_normal_called_normal": nih["NORMAL"]["called"]["NORMAL"],
        "nih_pneumonia_vs_normal_auc": nih["PNEUMONIA"]["roc_auc_vs_NORMAL"],
        "figure1_called_covid": f1["COVID19"]["called"]["COVID19"],
        "shared_test_auc": m["sources"]["chest-xray-small"]["roc_auc"],
        "threshold": m["operating_point"]["threshold"],
        "val_positives": m["operating_point"].get("positives"),
    }
    if exported:
        rep_file = out / "report.json"
        if rep_file.exists():
            rep = json.loads(rep_file.read_text())
            sal = [r for r in (rep.get("saliency") or {}).get("rows", []) if "int8" in r["file"]]
            row["int8_frame_share"] = sal[0]["frame_share"] if sal else None
            row["int8_gate"] = "pass"
        else:
            row["int8_frame_share"], row["int8_gate"] = None, "FAIL"
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path("../shared/data"))
    ap.add_argument("--work", type=Path, default=Path("artifacts/study"))
    ap.add_argument("--cache-dir", type=Path, default=Path(".cache/study"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--candidates", default="baseline,robust")
    ap.add_argument("--export", action="store_true", help="export and measure int8 (slow)")
    args = ap.parse_args(argv)
    if not (args.shared / "nih-adult" / "labels.csv").is_file():
        print(f"error: {args.shared}: needs chest-xray-small, nih-adult, figure1-covid", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    nih_train, nih_ext = prepare(args.shared, args.work)
    exe = str(Path(sys.executable).with_name("xray-edge"))
    results = args.work / "results.jsonl"
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.candidates.split(",")
    done = {(r["candidate"], r["seed"], r["epochs"]) for r in _rows(results)}
    with open(args.work / "study.log", "a") as log:
        for seed in seeds:  # seed-major: whatever finishes compares candidates pairwise
            for name in names:
                if (name, seed, args.epochs) in done:
                    continue  # measured by an earlier call
                out = args.work / f"{name}_s{seed}"
                cmd = [exe, "train", "--data", str(args.shared / "chest-xray-small"), "--data", str(nih_train),
                       "--classes", "COVID19,NORMAL", "--external", f"nih={nih_ext}",
                       "--external", f"figure1={args.shared / 'figure1-covid'}", "--epochs", str(args.epochs),
                       "--seed", str(seed), "--out", str(out), "--cache-dir", str(args.cache_dir),
                       *CANDIDATES[name]]
                t = time.time()
                if run(cmd, log) != 0:
                    print(f"{name} seed {seed}: training failed (see {args.work / 'study.log'})", flush=True)
                    continue
                if args.export:
                    if run([exe, "export", "--model", str(out / "model.keras"), "--formats", "float32,int8"], log) == 0:
                        run([exe, "report", "--artifacts", str(out), "--saliency-images", "4"], log)
                row = {"candidate": name, "seed": seed, "epochs": args.epochs, "seconds": round(time.time() - t),
                       **measures(out, args.export)}
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    print(table([r for r in _rows(results) if r["epochs"] == args.epochs and r["candidate"] in names]))
    return 0


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path)] if path.exists() else []


def table(rows: list[dict]) -> str:
    """Mean (min-max) over seeds per candidate, with the issue's columns."""
    cols = [("nih_normal_called_normal", "NIH held-out normals called NORMAL"),
            ("nih_pneumonia_vs_normal_auc", "NIH pneumonia vs normal AUC"),
            ("figure1_called_covid", "figure1 called COVID19"),
            ("shared_test_auc", "chest-xray-small test AUC"),
            ("int8_frame_share", "int8 frame share"), ("int8_gate", "int8 gate")]
    lines = ["| candidate | seeds | " + " | ".join(c[1] for c in cols) + " |",
             "|" + "|".join(["---"] * (len(cols) + 2)) + "|"]
    for name in dict.fromkeys(r["candidate"] for r in rows):
        rs = [r for r in rows if r["candidate"] == name]
        cells = []
        for key, _ in cols:
            vals = [r.get(key) for r in rs if r.get(key) is not None]
            if not vals:
                cells.append("not measured")
            elif isinstance(vals[0], str):
                cells.append(", ".join(vals))
            else:
                cells.append(f"{sum(vals) / len(vals):.2f} ({min(vals):.2f}-{max(vals):.2f})")
        lines.append(f"| {name} | {','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
