"""Accepted / refused per set by the input gate (xray_edge.gate): the evidence for its bounds.

    python tests/tools/gate_eval.py [--data ../shared/data] [--stats] [--refused] [--rules]
                                    [--accept DIR ...] [--refuse DIR ...]

Sets: the real chest films of DATA (every <set>/<class>/* image; skipped without DATA), the
phantoms `make train` draws (train/phantom.py), and non-radiographs built here: uniform and
gradient images, noise (grey, colour, smoothed), smoothed noise at blur radii of 1-32 pixels
(also mirror-symmetric and grainy), clouds (1/f noise), terraces (an 8-bit blur stretched, also
grainy), pages of text rendered with Pillow, colour pictures (shapes, a red square on black, an
explain-style heat map over a film), the pixels of pydicom's own test files of other modalities
saved as PNG (screenshots; its CT and MR slices upside down too), drawn slices (a Shepp-Logan
head phantom, axial chest CT slices), and the DICOM files themselves. Prints a table; --stats
adds each statistic's least value, 0.5/1/50/99/99.5 percentiles and largest value per set,
--refused lists each refused real film with its reason, --rules how many files of each set each
rule refused.

Your own sets: --accept DIR (chest films: at most 1% refused) and --refuse DIR (anything else:
none labelled), each repeatable; every image under DIR counts, and a --refuse set is checked a
second time converted to grey, since colour alone refuses a colour picture. The set "held out"
(matplotlib's sample pictures in grey, its map of heights and its MR slice) was not looked at when
the bounds were chosen, nor fitted to by likeness; it says how far they carry to pictures nobody
tuned them on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from xray_edge.errors import ImageError
from xray_edge.gate import DEFAULT_RULES, check_input, check_statistics, image_statistics, measure

SUFFIXES = {".jpg", ".jpeg", ".png", ".dcm"}
USER_SUFFIXES = SUFFIXES | {".bmp", ".gif", ".tif", ".tiff", ".webp"}  # --accept / --refuse folders
# The four sources of the shared films, by folder: chest-xray-small's two classes come from two
# (its README). likeness is fitted and checked one source left out at a time.
SOURCES = {"chest-xray-small/COVID19": "chest-xray-small/train/COVID19",
           "chest-xray-small/NORMAL": "chest-xray-small/train/NORMAL",
           "nih-adult": "nih-adult", "figure1-covid": "figure1-covid"}


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


def _saver(out: Path, sets: dict[str, list[Path]], stem):
    """save(kind, name, array or image): a PNG named stem(kind)_name.png in `out`, listed under kind."""
    def save(kind: str, name: str, arr_or_img) -> None:
        img = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
        p = out / f"{stem(kind)}_{name}.png"
        img.save(p)
        sets.setdefault(kind, []).append(p)
    return save


def generated(out: Path, data: Path | None) -> dict[str, list[Path]]:
    rng = np.random.default_rng(1)
    sets: dict[str, list[Path]] = {}
    save = _saver(out, sets, lambda kind: kind.replace("/", "_"))

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


def _stretch(a: np.ndarray, contrast: float) -> np.ndarray:
    a = (a - a.mean()) / max(float(a.std()), 1e-6) * contrast + 128
    return a.clip(0, 255).astype(np.uint8)


def _blurred_noise(rng, radius: float, contrast: float, size: int = 300) -> np.ndarray:
    """White noise blurred by a Gaussian of `radius` pixels (in float), stretched to `contrast`."""
    f = np.fft.fftfreq(size)
    gauss = np.exp(-2 * np.pi ** 2 * radius ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    return _stretch(np.fft.ifft2(np.fft.fft2(rng.normal(size=(size, size))) * gauss).real, contrast)


def _clouds(rng, beta: float, size: int = 300) -> np.ndarray:
    """1/f noise: power falling as k^-beta, structure at every scale like a film's, no anatomy."""
    f = np.fft.fftfreq(size)
    k = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    k[0, 0] = 1
    spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / k ** (beta / 2)
    spectrum[0, 0] = 0
    return _stretch(np.fft.ifft2(spectrum).real, 55)


def _shepp_logan(size: int = 300) -> np.ndarray:
    """The modified Shepp-Logan head phantom of CT reconstruction (ellipses on black)."""
    ellipses = [(1, .69, .92, 0, 0, 0), (-.8, .6624, .874, 0, -.0184, 0), (-.2, .11, .31, .22, 0, -18),
                (-.2, .16, .41, -.22, 0, 18), (.1, .21, .25, 0, .35, 0), (.1, .046, .046, 0, .1, 0),
                (.1, .046, .046, 0, -.1, 0), (.1, .046, .023, -.08, -.605, 0),
                (.1, .023, .023, 0, -.606, 0), (.1, .023, .046, .06, -.605, 0)]
    y, x = np.mgrid[1:-1:size * 1j, -1:1:size * 1j]
    img = np.zeros((size, size))
    for value, a, b, x0, y0, phi in ellipses:
        c, s = np.cos(np.radians(phi)), np.sin(np.radians(phi))
        xr, yr = (x - x0) * c + (y - y0) * s, -(x - x0) * s + (y - y0) * c
        img[(xr / a) ** 2 + (yr / b) ** 2 <= 1] += value
    return (img.clip(0, 1.2) / 1.2 * 255).astype(np.uint8)


def _axial_chest_ct(rng, size: int = 300) -> Image.Image:
    """A drawn axial chest CT slice: a wide body on black air, two dark lungs, the heart in front,
    a vertebra behind, a ring of ribs and the table."""
    y, x = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size))
    img[((x - .5) / .46) ** 2 + ((y - .5) / .33) ** 2 <= 1] = 150
    for cx in (.3, .7):
        img[((x - cx) / .17) ** 2 + ((y - .5) / .23) ** 2 <= 1] = 25
    img[((x - .53) / .13) ** 2 + ((y - .45) / .12) ** 2 <= 1] = 170
    img[((x - .5) / .06) ** 2 + ((y - .74) / .06) ** 2 <= 1] = 250
    ring = np.sqrt(((x - .5) / .42) ** 2 + ((y - .5) / .29) ** 2)
    img[(abs(ring - 1) < .03) & (np.sin(np.arctan2(y - .5, x - .5) * 9) > .3)] = 240
    img[(y > .88) & (y < .9) & (x > .05) & (x < .95)] = 120
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))


def noise_and_slices(out: Path) -> dict[str, list[Path]]:
    """Smoothed noise at many scales, clouds and blobs, drawn CT slices (no data needed)."""
    rng = np.random.default_rng(2)
    sets: dict[str, list[Path]] = {}
    save = _saver(out, sets, lambda kind: kind.split()[0])

    smooth = "smoothed noise (radius 1-32 px)"
    for radius in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
        for contrast in (35, 60):
            save(smooth, f"r{radius}c{contrast}", _blurred_noise(rng, radius, contrast))
    for radius in (4, 8, 16):
        a = _blurred_noise(rng, radius, 55)
        save(smooth, f"mirrored_r{radius}", np.concatenate([a[:, :150], a[:, 149::-1]], axis=1))
        save(smooth, f"grainy_r{radius}", (a + rng.normal(0, 3, a.shape)).clip(0, 255).astype(np.uint8))
    clouds = "clouds (1/f noise), terraces"
    for beta in (1.5, 2.0, 2.5, 3.0, 3.5):
        for i in range(2):
            save(clouds, f"clouds_b{beta}_{i}", _clouds(rng, beta))
    for radius in (12, 20, 30):  # an 8-bit blur stretched: few grey levels, large blobs
        noise = Image.fromarray(rng.integers(0, 256, (300, 300), dtype=np.uint8))
        blur = noise.filter(ImageFilter.GaussianBlur(radius))
        terraced = _stretch(np.asarray(blur, np.float64), 55)
        save(clouds, f"posterized_r{radius}", terraced)
        grain = rng.normal(0, 2.5, terraced.shape)  # hides the empty grey levels between the terraces
        save(clouds, f"grainy_posterized_r{radius}", (terraced + grain).clip(0, 255).astype(np.uint8))
    drawn = "drawn CT slices"
    save(drawn, "shepp_logan", _shepp_logan())
    for i in range(3):
        save(drawn, f"axial_chest_ct{i}", _axial_chest_ct(rng))
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
             "liver_1frame.dcm", "image_dfl.dcm", "ExplVR_BigEnd.dcm", "SC_rgb_rle_2frame.dcm",
             "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"]  # the last two: axial CT slices of a head
    files = [Path(f) for f in (get_testdata_file(n) for n in names) if f]
    shots, flipped = [], []
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
        if pydicom.dcmread(f, stop_before_pixels=True).get("Modality") in ("CT", "MR"):
            p = out / f"upside_down_{f.stem}.png"
            Image.fromarray(arr[::-1]).save(p)
            flipped.append(p)
    return {"pydicom DICOM files": files, "pydicom images as PNG": shots,
            "pydicom CT/MR slices upside down": flipped}


def held_out(out: Path) -> dict[str, list[Path]]:
    """Pictures the bounds were not chosen on and likeness was not fitted to: matplotlib's sample
    pictures in grey (Grace Hopper upside down too), its map of heights and the MR slice it ships
    (s1045.ima.gz, 256 x 256 big-endian 16-bit)."""
    import gzip

    import matplotlib

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    paths = []
    for f in sorted(sample.glob("*.[jp][pn]g")):
        p = out / f"held_out_{f.stem}.png"
        with Image.open(f) as im:
            im.convert("L").save(p)
        paths.append(p)
    with Image.open(sample / "grace_hopper.jpg") as im:  # a grey photograph upside down
        paths.append(out / "held_out_grace_hopper_upside_down.png")
        im.convert("L").transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(paths[-1])
    topo = np.load(sample / "topobathy.npz")["topo"].astype(np.float64)  # a map of heights
    paths.append(out / "held_out_topobathy.png")
    Image.fromarray((255 * (topo - topo.min()) / (topo.max() - topo.min())).astype(np.uint8)).save(paths[-1])
    mri = sample / "s1045.ima.gz"
    if mri.is_file():
        a = np.frombuffer(gzip.decompress(mri.read_bytes()), ">u2").reshape(256, 256).astype(np.float64)
        for name, arr in (("mr_s1045", a), ("mr_s1045_upside_down", a[::-1])):
            paths.append(out / f"held_out_{name}.png")
            Image.fromarray((arr / arr.max() * 255).astype(np.uint8)).save(paths[-1])
    return {"held out: matplotlib, grey": paths}


def user_sets(out: Path, accept: list[Path], refuse: list[Path]) -> tuple[dict, set[str]]:
    """The --accept and --refuse folders as sets; a --refuse set also converted to grey.
    Returns (sets, the names of the sets of chest films)."""
    sets, chest = {}, set()
    for d in accept:
        sets[f"yours: {d.name}"] = _images_under(d)
        chest.add(f"yours: {d.name}")
    for i, d in enumerate(refuse):
        files = _images_under(d)
        sets[f"yours: {d.name}"] = files
        grey = []
        for j, f in enumerate(files):
            try:
                with Image.open(f) as im:
                    g = im.convert("L")
            except Exception:  # noqa: BLE001 - any decoder failure (Pillow raises SyntaxError too)
                continue  # counted as an error in the set as it is
            grey.append(out / f"yours{i}_{j}_{f.stem}.png")
            g.save(grey[-1])
        sets[f"yours: {d.name}, in grey"] = grey
    return sets, chest


def _images_under(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in USER_SUFFIXES)


def statistics_accept(image: np.ndarray) -> bool:
    """Whether every bound but likeness accepts a model input: what the statistics alone let
    through, as the one-class distances of layout_distance.py and feature_distance.py, measured
    before likeness, were asked to catch."""
    return check_statistics({**measure(image)[0], "likeness": np.inf}) is None


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
    ap.add_argument("--rules", action="store_true", help="how many files of each set each rule refused")
    ap.add_argument("--reference", default="real: nih-adult",
                    help="the set whose even-numbered films make the training reference of the "
                         "'unlike training' flag (default: %(default)s)")
    ap.add_argument("--accept", type=Path, action="append", default=[], metavar="DIR",
                    help="a folder of your own chest films: at most 1%% may be refused (repeatable)")
    ap.add_argument("--refuse", type=Path, action="append", default=[], metavar="DIR",
                    help="a folder of your own non-radiographs: none may be labelled, as they are "
                         "or in grey (repeatable)")
    args = ap.parse_args(argv)
    for d in args.accept + args.refuse:
        if not d.is_dir():
            ap.error(f"{d} is not a folder")
    data = args.data if args.data.is_dir() else None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        sets: dict[str, list[Path]] = real_sets(data) if data else {}
        sets["phantoms (make train)"] = phantoms(out)
        sets.update(generated(out, data))
        sets.update(noise_and_slices(out))
        sets.update(pydicom_sets(out))
        sets.update(held_out(out))
        yours, your_films = user_sets(out, args.accept, args.refuse)
        sets.update(yours)
        print(f"{'set':32} {'files':>6} {'accepted':>9} {'refused':>8} {'errors':>7}  kind")
        bad = 0
        stats_rows = {}
        for name, paths in sets.items():
            rows = evaluate(paths)
            acc = sum(1 for r in rows if r[1] is not None and r[1].accepted)
            err = sum(1 for r in rows if r[1] is None)
            ref = len(rows) - acc - err
            chest = name.startswith(("real", "phantoms")) or name in your_films
            print(f"{name:32} {len(rows):6d} {acc:9d} {ref:8d} {err:7d}  "
                  f"{'chest films: accept' if chest else 'not radiographs: refuse'}")
            if chest and ref > 0.01 * len(rows):
                bad += 1
            if not chest and acc:
                bad += 1
                for p, d, reason, _ in rows:
                    if d is not None and d.accepted:
                        print(f"    ACCEPTED {p.name}: " + ", ".join(f"{k} {v:.3g}" for k, v in d.statistics.items()))
            if args.rules and ref:
                counts = Counter(d.rule for _, d, _, _ in rows if d is not None and not d.accepted)
                print("    refused by: " + ", ".join(f"{rule} {n}" for rule, n in counts.most_common()))
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
                if not (name.startswith(("real", "phantoms")) or name in your_films):
                    continue
                rows = rows[1::2] if name == args.reference else rows
                flagged = sum(1 for r in rows if unlike_training(r, rules))
                print(f"  {name:32} {flagged:5d} of {len(rows):5d}  ({100 * flagged / max(1, len(rows)):.0f}%)")
        if args.stats:
            print("\nleast, percentiles 0.5 / 1 / 50 / 99 / 99.5, largest, of each statistic")
            for name, rows in stats_rows.items():
                if not rows:
                    continue
                print(name)
                for k in rows[0]:
                    v = np.percentile([r[k] for r in rows], [0, 0.5, 1, 50, 99, 99.5, 100])
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
