"""Where a file's bytes become 8-bit pixels: the one decoder of images and DICOM files.

Size limits checked from the header before any pixel is decoded, a pixel budget shared by every
decode thread, Pillow with an allow-list of formats, EXIF orientation, and the reduction of 16-bit,
float, palette and alpha images to 8-bit L or RGB. `xray_edge.preprocess` (the model's recipe) and
`xray_edge.dicom` both decode through here; this module imports neither.
"""

from __future__ import annotations

import math
import os
import stat
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from xray_edge.errors import ImageError, first_line

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm", ".dicom"}
)
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})

# A chest film digitised at 100 um is about 4300 x 3500 px (15 Mpx); anything far beyond that is
# a decompression bomb or not an X-ray. Pillow's own bomb check (89 Mpx) only warns below 2x.
MAX_PIXELS = 64_000_000
MIN_SIDE = 16

# Only these decoders ever see a file (DICOM goes through pydicom). Pillow knows ~40 formats,
# some of which hand the file to external programs (PostScript to Ghostscript).
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP")
_ALLOWED_TEXT = "JPEG, PNG, BMP, TIFF, GIF, WebP or DICOM"

# Rows converted at a time for images that need a pixel-wise conversion (16-bit, alpha), so a
# large image is never held in two full-size copies of a wider type.
_BAND_PIXELS = 1 << 20


# EXIF orientation tag -> the turn that shows the image upright (as ImageOps.exif_transpose)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


class PixelBudget:
    """A semaphore weighted by pixel count: large decodes wait for each other, small ones pass.

    Decoding a large image holds a few bytes per pixel for a moment; with one budget of
    `MAX_PIXELS` shared by every decode thread, the worst allowed image is decoded alone and
    the peak memory of a batch is that of one such image, whatever the number of threads.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free = capacity
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int):
        need = max(1, min(int(pixels), self.capacity))
        with self._cond:
            self._cond.wait_for(lambda: self._free >= need)
            self._free -= need
        try:
            yield
        finally:
            if need >= _TRIM_PIXELS:
                release_freed_memory()
            with self._cond:
                self._free += need
                self._cond.notify_all()


# glibc keeps what a thread freed in that thread's arena, so each decode thread would keep the
# memory of its largest image; after a large decode, hand freed memory back to the system.
_TRIM_PIXELS = 4_000_000


def release_freed_memory() -> None:
    """Hand memory this process freed back to the system (glibc keeps it otherwise)."""
    global _malloc_trim
    if _malloc_trim is None:  # looked up on the first large decode: ctypes stays off the start-up path
        _malloc_trim = _find_malloc_trim()
    if _malloc_trim:
        _malloc_trim(0)


def _find_malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim  # glibc only; elsewhere there is nothing to do
    except (OSError, AttributeError, ImportError):
        return False


_malloc_trim = None


DECODE_BUDGET = PixelBudget(MAX_PIXELS)


def is_dicom(p: Path) -> bool:
    """DICOM by suffix, or by preamble for a file without an image suffix (DICOM files often have
    none); a file named like a picture is not read twice to check."""
    suffix = p.suffix.lower()
    return suffix in DICOM_SUFFIXES or (suffix not in IMAGE_SUFFIXES and has_dicom_preamble(p))


def check_file(p: Path) -> None:
    """A readable, non-empty regular file, or ImageError with the reason."""
    try:
        st = p.stat()  # Path.exists() raises on a name too long or a folder that cannot be entered
    except FileNotFoundError:
        raise ImageError(p, "no such file") from None
    except OSError as exc:
        raise ImageError(p, f"cannot open: {exc.strerror or first_line(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageError(p, "is a directory, not an image")
    if not os.access(p, os.R_OK):
        raise ImageError(p, "permission denied")
    if st.st_size == 0:
        raise ImageError(p, "empty file (0 bytes)")


def check_size(p: Path, w: int, h: int) -> None:
    """The pixel limits every image obeys, checked from its header before pixels are decoded."""
    if w * h > MAX_PIXELS:
        raise ImageError(p, f"{w}x{h} pixels is over the {MAX_PIXELS:,} limit (decompression bomb?)")
    if min(w, h) < MIN_SIDE:
        raise ImageError(p, f"{w}x{h} pixels is too small (min side {MIN_SIDE})")


def has_dicom_preamble(p: Path) -> bool:
    """True when the file starts with the DICOM preamble (128 bytes, then b"DICM")."""
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError as exc:
        raise ImageError(p, f"cannot read: {exc.strerror or exc}") from None
    return head[128:132] == b"DICM"


def _format_name(p: Path) -> str | None:
    """The format Pillow would take this file for, from its first bytes only (nothing is opened)."""
    try:
        with open(p, "rb") as f:
            prefix = f.read(64)
    except OSError:
        return None
    Image.init()
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            if accept is not None and accept(prefix):
                return fmt
        except Exception:  # noqa: BLE001 - a plugin's sniffing is not our concern
            continue
    return None


def read_pillow(p: Path, fit, draft_side: int | None = None) -> Image.Image:
    """Open with Pillow, reduce to 8-bit L or RGB, turn upright and return `fit(image)`.

    `fit` (e.g. the resize to the model's input) runs inside the decode budget, so the full-size
    pixels are freed before the next large decode starts. `draft_side` lets libjpeg decode JPEGs
    at 1/2, 1/4 or 1/8 scale, still at least that side. Every decoder failure becomes ImageError.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bomb and corrupt-EXIF warnings: we decide, not stderr
            with Image.open(p, formats=ALLOWED_FORMATS) as im:
                check_size(p, *im.size)
                if im.format == "JPEG" and draft_side:
                    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, still >= size: faster, and a
                    # fraction of the memory (docs/edge.md).
                    im.draft(im.mode, (draft_side, draft_side))
                with DECODE_BUDGET.hold(im.size[0] * im.size[1]):
                    im.load()
                    turn = _ORIENTATION.get(im.getexif().get(0x0112))
                    out = _to_8bit(im)  # pixel-wise, so it commutes with the turn below
                    upright = out.transpose(turn) if turn is not None else out
                    small = fit(upright)
                    # free the full-size pixels before the next large decode may start
                    del out
                    im.close()
                    return small
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        name = _format_name(p)
        if name is not None and name not in ALLOWED_FORMATS:
            raise ImageError(p, f"{name} files are not accepted (only {_ALLOWED_TEXT})") from None
        raise ImageError(p, "not a recognised image format") from None
    except Image.DecompressionBombError:
        raise ImageError(p, f"decompression bomb: over {2 * Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except Exception as exc:  # noqa: BLE001 - every decoder failure is a bad file, not a crash
        raise ImageError(p, f"cannot decode: {first_line(exc)}") from None


def _to_8bit(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("L", "RGB"):
        return im
    if mode.startswith("I") or mode == "F":
        # A transparency chunk on 16-bit grey is ignored, as on 8-bit grey: a detour through
        # 8-bit RGBA would clip every level above 255.
        return _high_depth_image(im)
    if mode in ("RGBA", "LA", "PA", "P", "La", "RGBa") or "transparency" in im.info:
        out_mode = "L" if mode in ("LA", "La") else "RGB"
        return _in_bands(im, out_mode, lambda band: _over_black(band, out_mode))
    if mode == "1":
        return im.convert("L")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def _over_black(im: Image.Image, out_mode: str) -> Image.Image:
    # Alpha over black: transparent margins of an exported figure look like film background.
    rgba = im.convert("RGBA")
    black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    out = Image.alpha_composite(black, rgba).convert("RGB")
    return out.convert("L") if out_mode == "L" else out


def _in_bands(im: Image.Image, out_mode: str, convert) -> Image.Image:
    """Apply a pixel-wise `convert` a band of rows at a time into one 8-bit image.

    The same pixels as converting the whole image at once, without full-size intermediates.
    """
    w, h = im.size
    rows = max(1, _BAND_PIXELS // max(1, w))
    if rows >= h:
        return convert(im)
    out = Image.new(out_mode, (w, h))
    for top in range(0, h, rows):
        out.paste(convert(im.crop((0, top, w, min(h, top + rows)))), (0, top))
    return out


def _high_depth_image(im: Image.Image) -> Image.Image:
    """16-bit, 32-bit or float grey -> 8-bit L, band by band, scaled by `high_depth_to_uint8`'s rule."""
    if im.mode == "F":
        lo, hi = (float(v) for v in im.getextrema())
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN/inf: only the slow path copes
            return Image.fromarray(high_depth_to_uint8(np.asarray(im)))

        def convert(band):
            a = np.asarray(band, dtype=np.float64)
            return Image.fromarray(_scale_float(a, lo, hi))
    else:
        hi = max(0, int(im.getextrema()[1]))
        factor = 255.0 / (2 ** _bits(hi) - 1)

        def convert(band):
            a = np.clip(np.asarray(band).astype(np.int64), 0, None)
            return Image.fromarray(np.round(a * factor).astype(np.uint8))
    return _in_bands(im, "L", convert)


def _bits(hi: int) -> int:
    return max(8, math.ceil(math.log2(hi + 1))) if hi > 0 else 8


def _scale_float(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    return np.round(scaled * 255).astype(np.uint8)


def high_depth_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map 16-bit (or wider) grey levels to 0-255.

    Integer data is scaled by its bit depth, taken as the smallest of 8..16+ bits that holds the
    image's maximum, so 12-bit detectors stored in 16-bit PNGs keep their contrast. Float data
    is stretched from its minimum to its maximum.
    """
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64))
        return _scale_float(arr, float(arr.min()), float(arr.max()))
    arr = np.clip(arr.astype(np.int64), 0, None)
    hi = int(arr.max()) if arr.size else 0
    return np.round(arr * (255.0 / (2 ** _bits(hi) - 1))).astype(np.uint8)
