"""Accepted / refused per set by the input gate (xray_edge.gate): the evidence for its bounds.

    python tests/tools/gate_eval.py [--data ../shared/data] [--stats] [--refused]

Sets: the real chest films of DATA (every <set>/<class>/* image; skipped without DATA), the
phantoms `make train` draws (train/phantom.py), and non-radiographs built here: uniform and
gradient images, noise (grey, colour, smoothed), pages of text rendered with Pillow, colour
pictures (shapes, a red square on black, an explain-style heat map over a film), the pixels of
pydicom's own test files of other modalities saved as PNG (screenshots), and the DICOM files
themselves. Prints a table; --stats adds each statistic's 0.5/1/50/99/99.5 percentiles per set,
--refused lists each refused real film with its reason.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from xray_edge.errors import ImageError
from xray_edge.gate import DEFAULT_RULES, check_input, image_statistics

SUFFIXES = {".jpg", ".jpeg", ".png", ".dcm"}


def real_sets(data: Path) -> dict[str, list[Path]]:
    sets = {}
    for readme in sorted(data.glob("*/README.md")):
        files = sorted(p for p in readme.parent.rglob("*") if p.suffix.lower() in SUFFIXES)
        if files:
            sets[f"real: {readme.parent.name}"] = files
    return sets


def phantoms(out: Path, n: int = 40) -> list[Path]:
    from xray_edge.train.phantom import phantom_image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = out / f"phantom_{i}.png"
        Image.fromarray(phantom_image(rng, opacities=bool(i % 2))).save(p)
        paths.append(p)
    return paths


def _film(data: Path | None, rng) -> np.ndarray:
    """A grey chest film to build screenshots from (a phantom when DATA is absent)."""
    films = sorted((data / "nih-adult" / "NORMAL").glob("*.jpg"))[:5] if data else []
    if films:
        return np.asarray(Image.open(films[0]).convert("L").resize((400, 400)))
    from xray_edge.train.phantom import phantom_image

    return np.asarray(Image.fromarray(phantom_image(rng, opacities=False)).resize((400, 400)))


def generated(out: Path, data: Path | None) -> dict[str, list[Path]]:
    rng = np.random.default_rng(1)
    sets: dict[str, list[Path]] = {}

    def save(kind: str, name: str, arr_or_img) -> None:
        img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
        p = out / f"{kind.replace('/', '_')}_{name}.png"
        img.save(p)
        sets.setdefault(kind, []).append(p)

    # uniform and nearly uniform
    for v in (0, 1, 40, 128, 200, 255):
        save("blank/uniform", f"flat{v}", np.full((300, 300), v, np.uint8))
    save("blank/uniform", "hgrad", np.tile(np.linspace(0, 255, 300, dtype=np.uint8), (300, 1)))
    save("blank/uniform", "vgrad", np.tile(np.linspace(0, 255, 300, dtype=np.uint8)[:, None], (1, 300)))
    save("blank/uniform", "faint", (128 + rng.normal(0, 3, (300, 300))).clip(0, 255).astype(np.uint8))
    # noise
    for i in range(4):
        save("noise", f"grey{i}", rng.integers(0, 256, (300, 300), dtype=np.uint8))
        save("noise", f"colour{i}", rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))
        save("noise", f"gauss{i}", (128 + rng.normal(0, 60, (300, 300))).clip(0, 255).astype(np.uint8))
        smooth = Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8))
        save("noise", f"smooth{i}", smooth.filter(ImageFilter.GaussianBlur(2 + 3 * i)).point(lambda v: min(255, max(0, (v - 128) * 8 + 128))))
    # documents: pages of text, dark on light and light on dark, at several sizes
    words = ("patient chest radiograph report findings impression lungs clear no effusion "
             "heart size normal date signed radiologist department clinic ward").split()
    for i in range(8):
        w, h = (620, 877) if i % 2 == 0 else (800, 600)
        dark_on_light = i % 4 != 3
        page = Image.new("L", (w, h), 250 if dark_on_light else 10)
        draw = ImageDraw.Draw(page)
        y = 30
        while y < h - 30:
            line = " ".join(rng.choice(words, size=int(rng.integers(4, 12))))
            draw.text((30 + int(rng.integers(0, 20)), y), line, fill=20 if dark_on_light else 235)
            y += 14 + int(rng.integers(0, 8))
        save("documents", f"page{i}", page)
    # colour pictures and screenshots
    red = np.zeros((300, 300, 3), np.uint8)
    red[100:200, 100:200, 0] = 255
    save("colour", "red_square", red)
    for i in range(6):
        img = Image.new("RGB", (400, 300), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            box = sorted(rng.integers(0, 400, 2)), sorted(rng.integers(0, 300, 2))
            draw.rectangle([box[0][0], box[1][0], box[0][1], box[1][1]],
                           fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        save("colour", f"shapes{i}", img)
        yy, xx = np.mgrid[0:300, 0:400]
        photo = np.stack([(xx * (0.3 + i * 0.1)) % 256, (yy * 0.8) % 256, ((xx + yy) * 0.4) % 256], -1)
        save("colour", f"gradient{i}", Image.fromarray(photo.astype(np.uint8)).filter(ImageFilter.GaussianBlur(3)))
    film = _film(data, rng)
    for i, alpha in enumerate((0.25, 0.4, 0.6)):
        heat = np.zeros((400, 400, 3), np.float32)
        yy, xx = np.mgrid[0:400, 0:400]
        blob = np.exp(-(((xx - 140 - 60 * i) ** 2 + (yy - 200) ** 2) / (2 * 70.0 ** 2)))
        heat[..., 0] = 255 * blob
        heat[..., 1] = 255 * np.clip(1.5 - np.abs(blob * 3 - 1.5), 0, 1)
        heat[..., 2] = 255 * (1 - blob)
        base = np.repeat(film[..., None], 3, axis=2).astype(np.float32)
        save("colour", f"heatmap{i}", ((1 - alpha) * base + alpha * heat).astype(np.uint8))
    return sets


def pydicom_sets(out: Path) -> dict[str, list[Path]]:
    try:
        import pydicom
        from pydicom.data import get_testdata_file
    except ImportError:
        return {}
    names = ["MR_small.dcm", "CT_small.dcm", "JPEG2000.dcm", "examples_overlay.dcm",
             "examples_rgb_color.dcm", "examples_palette.dcm", "examples_ybr_color.dcm",
             "SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_RLE.dcm", "rtdose_1frame.dcm",
             "liver_1frame.dcm", "image_dfl.dcm", "ExplVR_BigEnd.dcm", "SC_rgb_rle_2frame.dcm"]
    files = [Path(f) for f in (get_testdata_file(n) for n in names) if f]
    shots = []
    for f in files:
        try:
            from xray_edge.dicom import read_dicom

            arr = read_dicom(f)
        except ImageError:
            continue
        if min(arr.shape[:2]) < 16:
            continue
        p = out / f"screenshot_{f.stem}.png"
        Image.fromarray(arr).save(p)
        shots.append(p)
    return {"pydicom DICOM files": files, "pydicom images as PNG": shots}


def evaluate(paths: list[Path], rules=DEFAULT_RULES):
    rows = []
    for p in paths:
        t0 = time.perf_counter()
        try:
            decision, image = check_input(p, rules=rules)
        except ImageError as err:
            rows.append((p, None, f"error: {err.reason}", None))
            continue
        ms = (time.perf_counter() - t0) * 1e3
        rows.append((p, decision, decision.reason, ms))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2].parent / "shared" / "data",
                    help="the shared data folder (default: ../shared/data beside the repository)")
    ap.add_argument("--stats", action="store_true", help="percentiles of each statistic per set")
    ap.add_argument("--refused", action="store_true", help="list the refused real films")
    ap.add_argument("--reference", default="real: nih-adult",
                    help="the set whose even-numbered films make the training reference of the "
                         "'unlike training' flag (default: %(default)s)")
    args = ap.parse_args(argv)
    data = args.data if args.data.is_dir() else None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sets: dict[str, list[Path]] = real_sets(data) if data else {}
        sets["phantoms (make train)"] = phantoms(out)
        sets.update(generated(out, data))
        sets.update(pydicom_sets(out))
        print(f"{'set':32} {'files':>6} {'accepted':>9} {'refused':>8} {'errors':>7}  kind")
        bad = 0
        stats_rows = {}
        for name, paths in sets.items():
            rows = evaluate(paths)
            acc = sum(1 for r in rows if r[1] is not None and r[1].accepted)
            err = sum(1 for r in rows if r[1] is None)
            ref = len(rows) - acc - err
            chest = name.startswith(("real", "phantoms"))
            print(f"{name:32} {len(rows):6d} {acc:9d} {ref:8d} {err:7d}  "
                  f"{'chest films: accept' if chest else 'not radiographs: refuse'}")
            if chest and ref > 0.01 * len(rows):
                bad += 1
            if not chest and acc:
                bad += 1
                for p, d, reason, _ in rows:
                    if d is not None and d.accepted:
                        print(f"    ACCEPTED {p.name}: {d.statistics}")
            if args.refused and chest:
                for p, d, reason, _ in rows:
                    if d is not None and not d.accepted:
                        print(f"    refused {p.name}: {reason}")
            stats_rows[name] = [d.statistics for _, d, _, _ in rows if d is not None and d.statistics]
        ref_rows = stats_rows.get(args.reference, [])
        if ref_rows:
            from xray_edge.gate import GateRules, reference_of_statistics, unlike_training

            rules = GateRules(reference=reference_of_statistics(ref_rows[::2]))
            print(f"\nflagged 'unlike training' (reference: the even-numbered films of {args.reference}; "
                  f"for that set, the odd-numbered ones)")
            for name, rows in stats_rows.items():
                if not name.startswith(("real", "phantoms")):
                    continue
                rows = rows[1::2] if name == args.reference else rows
                flagged = sum(1 for r in rows if unlike_training(r, rules))
                print(f"  {name:32} {flagged:5d} of {len(rows):5d}  ({100 * flagged / max(1, len(rows)):.0f}%)")
        if args.stats:
            print("\npercentiles 0.5 / 1 / 50 / 99 / 99.5 of each statistic")
            for name, rows in stats_rows.items():
                if not rows:
                    continue
                print(name)
                for k in rows[0]:
                    v = np.percentile([r[k] for r in rows], [0.5, 1, 50, 99, 99.5])
                    print(f"    {k:12} " + " ".join(f"{x:8.3f}" for x in v))
        x = np.zeros((200, 200, 3), np.uint8)
        t0 = time.perf_counter()
        for _ in range(200):
            image_statistics(x)
        print(f"\nimage statistics: {(time.perf_counter() - t0) / 200 * 1e3:.2f} ms per 200x200 input")
        print("verdict:", "bounds meet the targets" if not bad else f"{bad} set(s) miss the target")
        return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
