"""The one preprocessing: every kind of file a hospital has, and every kind of bad file."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xray_edge.errors import ImageError
from xray_edge.decode import MAX_PIXELS, high_depth_to_uint8
from xray_edge.preprocess import Preprocessing, load_image


def gradient(w=300, h=240) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return ((x * 255 // (w - 1) + y) % 256).astype(np.uint8)


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "1", "CMYK", "I;16", "I", "F"])
def test_every_pixel_mode_gives_model_input(tmp_path, mode):
    base = Image.fromarray(gradient())
    img = base.convert(mode) if mode not in ("I;16", "I", "F") else Image.fromarray(
        (gradient().astype(np.uint16) * 16).astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    suffix = ".tif" if mode in ("CMYK", "I", "F") else ".png"
    x = load_image(save(img, tmp_path / f"im{suffix}"))
    assert x.shape == (200, 200, 3) and x.dtype == np.uint8
    assert x.max() > 100, "contrast lost"


def test_grayscale_is_copied_to_three_equal_channels(tmp_path):
    x = load_image(save(Image.fromarray(gradient()), tmp_path / "g.png"))
    assert np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 1], x[..., 2])


def test_lossless_formats_give_identical_arrays(tmp_path):
    img = Image.fromarray(gradient())
    arrays = [load_image(save(img, tmp_path / f"a{s}")) for s in (".png", ".bmp", ".tif")]
    assert all(np.array_equal(arrays[0], a) for a in arrays[1:])


def test_16bit_png_with_12bit_data_keeps_contrast(tmp_path):
    data = (gradient().astype(np.uint32) * 4095 // 255).astype(np.uint16)  # a 12-bit detector in a 16-bit PNG
    x = load_image(save(Image.fromarray(data), tmp_path / "d.png"))
    assert x.max() >= 250  # scaled by 12 bits, not by 16 (which would give max 16)
    assert high_depth_to_uint8(np.array([0, 4095], np.uint16)).tolist() == [0, 255]
    assert high_depth_to_uint8(np.array([0, 65535], np.uint16)).tolist() == [0, 255]


def test_rgba_transparency_is_black_not_white(tmp_path):
    arr = np.zeros((240, 300, 4), np.uint8)
    arr[..., :3] = 255  # white, but fully transparent
    x = load_image(save(Image.fromarray(arr, "RGBA"), tmp_path / "t.png"))
    assert x.max() == 0


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((240, 300), np.uint8)
    arr[:, :30] = 255  # a white band on the left edge
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    p = save(img, tmp_path / "o.jpg", exif=exif, quality=95)
    x = load_image(p)
    # after the 90-degree clockwise rotation the band is along the top edge
    assert x[:10, :, 0].mean() > 200 and x[-10:, :, 0].mean() < 50


def test_real_shared_images_all_decode(shared_data):
    paths = sorted((shared_data / "train").rglob("*.*"))
    assert len(paths) > 100
    for p in paths:
        assert load_image(p).shape == (200, 200, 3)


def test_size_comes_from_the_spec(tmp_path):
    p = save(Image.fromarray(gradient()), tmp_path / "s.png")
    assert load_image(p, Preprocessing(size=64)).shape == (64, 64, 3)


# ---------------------------------------------------------------- bad input: one clear error each
def _png_header_only(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gradient()).save(buf, format="JPEG")
    return buf.getvalue()


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gradient()).save(buf, format="PNG")
    return buf.getvalue()


BAD = {
    "zero_bytes.jpg": (b"", "empty file"),
    "truncated.jpg": (_jpeg_bytes()[:400], "cannot decode"),
    "truncated.png": (_png_bytes()[:200], "cannot decode"),
    "text.jpg": (b"this is a radiology report, not an image\n", "not a recognised image"),
    "bomb.png": (_png_header_only(30000, 30000), "decompression bomb"),
    "tiny.png": (None, "too small"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_raise_one_line_image_error(tmp_path, name):
    data, reason = BAD[name]
    p = tmp_path / name
    if data is None:
        Image.new("L", (1, 1)).save(p)
    else:
        p.write_bytes(data)
    with pytest.raises(ImageError) as info:
        load_image(p)
    msg = str(info.value)
    assert reason in msg and str(p) in msg and "\n" not in msg


def test_bomb_limit_is_checked_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header_only(30000, 30000))
    assert 30000 * 30000 > MAX_PIXELS
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(p)


def test_directory_named_like_an_image(tmp_path):
    d = tmp_path / "scan.png"
    d.mkdir()
    with pytest.raises(ImageError, match="is a directory"):
        load_image(d)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")


def test_unreadable_file():
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="xray-edge-perm-"))
    folder.chmod(0o755)  # reachable by the unprivileged user below; the file itself is not
    p = folder / "secret.png"
    p.write_bytes(_png_bytes())
    p.chmod(0)
    code = ("import sys; from xray_edge.preprocess import load_image\n"
            "from xray_edge.errors import ImageError\n"
            f"try:\n load_image({str(p)!r})\nexcept ImageError as e:\n print(e); sys.exit(3)\n")
    cmd = [sys.executable, "-c", code]
    if os.geteuid() == 0:  # root reads anything: check as an unprivileged user
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if os.geteuid() == 0 and "Permission denied" in out.stderr and "secret" not in out.stdout:
        pytest.skip("the unprivileged user cannot reach the test folder")
    assert out.returncode == 3, out.stderr
    assert "permission denied" in out.stdout


# ---------------------------------------------------------------- hostile files (issue #11)
def test_postscript_named_like_a_jpeg_is_refused_by_name(tmp_path):
    p = tmp_path / "scan.jpg"  # never handed to Ghostscript, whether or not it is installed
    p.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 300 300\nshowpage\n")
    with pytest.raises(ImageError, match="EPS files are not accepted"):
        load_image(p)


@pytest.mark.parametrize("fmt,suffix", [("PCX", ".pcx"), ("TGA", ".tga"), ("PPM", ".ppm")])
def test_formats_outside_the_allow_list_are_refused(tmp_path, fmt, suffix):
    p = save(Image.fromarray(gradient()), tmp_path / f"x{suffix}", format=fmt)
    with pytest.raises(ImageError, match="not accepted|not a recognised"):
        load_image(p)


def test_16bit_grey_png_with_transparency_chunk_is_not_clipped(tmp_path):
    data = (gradient().astype(np.uint32) * 4095 // 255).astype(np.uint16)
    plain = save(Image.fromarray(data), tmp_path / "plain.png")
    trns = save(Image.fromarray(data), tmp_path / "trns.png", transparency=65000)  # a tRNS chunk
    assert "transparency" in Image.open(trns).info
    assert np.array_equal(load_image(trns), load_image(plain))


def _peak_rss_mb(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code + "\nimport resource\n"
                          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def test_largest_allowed_16bit_png_decodes_in_bounded_memory(tmp_path):
    side = int(MAX_PIXELS ** 0.5)  # 7999 x 7999: the worst image under the limit
    p = tmp_path / "big16.png"
    Image.new("I;16", (side, side), 3000).save(p)
    code = f"from xray_edge.preprocess import load_image\nx = load_image({str(p)!r})"
    base = _peak_rss_mb("from xray_edge.preprocess import load_image")
    # the decoded 16-bit image (2 bytes/px) and its 8-bit copy; before: int64 and float64 copies
    assert _peak_rss_mb(code) - base < 3.5 * side * side / 2**20


def test_pixel_budget_never_admits_more_than_its_capacity():
    import threading
    import time

    from xray_edge.decode import PixelBudget

    budget, lock, now, peak = PixelBudget(100), threading.Lock(), [0], [0]

    def work(w):
        with budget.hold(w):
            with lock:
                now[0] += min(w, 100)
                peak[0] = max(peak[0], now[0])
            time.sleep(0.01)
            with lock:
                now[0] -= min(w, 100)

    threads = [threading.Thread(target=work, args=(w,)) for w in (60, 60, 250, 10, 30, 60, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads) and 0 < peak[0] <= 100


@pytest.mark.parametrize("bad", [{"size": "200"}, {"size": 4}, {"size": 100000}, {"channels": 1},
                                 {"channels": 4}, {"resample": "lanczos"}, {"resample": ["x"]},
                                 {"dtype": "float32"}, {"version": "0"}, {"size": True}])
def test_preprocessing_values_the_runner_cannot_honour_are_refused(bad):
    with pytest.raises(ValueError, match="preprocessing"):
        Preprocessing.from_dict({**Preprocessing().to_dict(), **bad})
    assert Preprocessing.from_dict(Preprocessing().to_dict()) == Preprocessing()


def test_name_too_long_and_unreachable_folder_are_image_errors(tmp_path):
    with pytest.raises(ImageError, match="cannot open"):
        load_image(tmp_path / ("x" * 300 + ".png"))


# --------------------------------------------------------------------------- intensity
EQUALIZE = Preprocessing(intensity="equalize")


def test_equalize_spreads_a_dull_film_and_is_the_step_after_geometry(tmp_path):
    dull = (96 + gradient() // 8).astype(np.uint8)  # grey levels 96-127 only, as an under-exposed film
    path = save(Image.fromarray(dull), tmp_path / "dull.png")
    plain, eq = load_image(path), load_image(path, EQUALIZE)
    assert plain.max() - plain.min() < 40 and eq.max() - eq.min() > 200
    assert np.array_equal(eq, EQUALIZE.adjust(load_image(path, EQUALIZE.geometry)))
    assert np.array_equal(eq[..., 0], eq[..., 2])  # grey stays grey
    assert np.array_equal(plain, Preprocessing().adjust(plain))  # "none" leaves pixels alone


def test_equalize_makes_two_exposures_of_one_film_alike(tmp_path):
    film = gradient()
    dark = save(Image.fromarray((film * 0.4).astype(np.uint8)), tmp_path / "dark.png")
    bright = save(Image.fromarray((80 + film * 0.6).astype(np.uint8)), tmp_path / "bright.png")
    gap = lambda spec: np.abs(load_image(dark, spec).astype(int) - load_image(bright, spec)).mean()
    assert gap(EQUALIZE) < gap(Preprocessing()) / 4


@pytest.mark.parametrize("record,ok", [({"intensity": "none", "version": "1"}, True),
                                        ({"version": "1"}, True),  # records made before the field
                                        ({"intensity": "equalize", "version": "2"}, True),
                                        ({"intensity": "equalize", "version": "1"}, False),
                                        ({"intensity": "clahe"}, False), ({"intensity": None}, False)])
def test_intensity_in_a_record_is_honoured_or_refused(record, ok):
    d = {**Preprocessing().to_dict(), **record}
    if "intensity" not in record:
        del d["intensity"]
    if ok:
        assert Preprocessing.from_dict(d).intensity == record.get("intensity", "none")
    else:
        with pytest.raises(ValueError, match="preprocessing"):
            Preprocessing.from_dict(d)
