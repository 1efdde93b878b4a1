"""Where an image file becomes the model's input array.

`load_image` is the one preprocessing of the project: training, calibration, parity checks and
the edge runner all call it. It returns plain 0-255 pixels as uint8 (H, W, 3); the scaling to
[0, 1] lives inside the model, so every exported format takes the same array.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from xray_edge.errors import ImageError, first_line

# Bump whenever the pixels this module produces change: the training cache and the manifest
# are keyed by it, so a model is never fed arrays made by a different recipe.
PREPROCESS_VERSION = "1"

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm", ".dicom"}
)
DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})

# A chest film digitised at 100 um is about 4300 x 3500 px (15 Mpx); anything far beyond that is
# a decompression bomb or not an X-ray. Pillow's own bomb check (89 Mpx) only warns below 2x.
MAX_PIXELS = 64_000_000
MIN_SIDE = 16


@dataclass(frozen=True)
class Preprocessing:
    """How a file becomes an array; recorded in the manifest and in every model file."""

    size: int = 200
    channels: int = 3
    resample: str = "bilinear"
    dtype: str = "uint8"
    scaling: str = "none: 0-255 pixels; the model divides by 255"
    version: str = PREPROCESS_VERSION

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, self.channels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


DEFAULT = Preprocessing()

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def load_image(path: str | os.PathLike, spec: Preprocessing = DEFAULT) -> np.ndarray:
    """Decode any supported file into the model's input array.

    Args:
        path: JPEG, PNG (8/16-bit, L, RGB, RGBA, P), BMP, TIFF, GIF, WebP or DICOM file.
        spec: the preprocessing recorded with the model.

    Returns:
        uint8 array of shape ``spec.shape``; pixels 0-255, RGB, EXIF orientation applied.

    Raises:
        ImageError: for anything that is not a usable image, with a one-line reason.

    Example:
        >>> x = load_image("scan.jpg")          # (200, 200, 3) uint8
    """
    img = decode_image(path, spec.size)
    if img.mode not in ("L", "RGB"):
        raise ImageError(path, f"unsupported pixel mode {img.mode}")  # pragma: no cover - defensive
    img = img.resize((spec.size, spec.size), _RESAMPLE[spec.resample])
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:  # grayscale: the tutorial's model takes RGB, so copy to three channels
        arr = np.repeat(arr[:, :, None], spec.channels, axis=2)
    return np.ascontiguousarray(arr)


def decode_image(path: str | os.PathLike, min_side: int) -> Image.Image:
    """The file as an 8-bit L or RGB image at its own aspect ratio, before the model's resize.

    JPEGs may be decoded at a reduced scale that keeps both sides >= `min_side`. Raises ImageError.
    """
    p = Path(path)
    _check_file(p)
    suffix = p.suffix.lower()
    # DICOM files often have no suffix; a file named like a picture is not read twice to check
    if suffix in DICOM_SUFFIXES or (suffix not in IMAGE_SUFFIXES and _has_dicom_preamble(p)):
        from xray_edge.dicom import read_dicom  # optional extra, imported only when needed

        return Image.fromarray(read_dicom(p))
    return _read_pillow(p, min_side)


def _check_file(p: Path) -> None:
    if not p.exists():
        raise ImageError(p, "no such file")
    if p.is_dir():
        raise ImageError(p, "is a directory, not an image")
    if not os.access(p, os.R_OK):
        raise ImageError(p, "permission denied")
    if p.stat().st_size == 0:
        raise ImageError(p, "empty file (0 bytes)")


def _has_dicom_preamble(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError as exc:
        raise ImageError(p, f"cannot read: {exc.strerror or exc}") from None
    return head[128:132] == b"DICM"


def _read_pillow(p: Path, size: int) -> Image.Image:
    """Open with Pillow and reduce to 8-bit L or RGB; every decoder failure becomes ImageError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bomb and corrupt-EXIF warnings: we decide, not stderr
            with Image.open(p) as im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageError(p, f"{w}x{h} pixels is over the {MAX_PIXELS:,} limit "
                                        "(decompression bomb?)")
                if min(w, h) < MIN_SIDE:
                    raise ImageError(p, f"{w}x{h} pixels is too small (min side {MIN_SIDE})")
                if im.format == "JPEG":
                    # Let libjpeg decode at 1/2, 1/4 or 1/8 scale, still >= size: 2-3x faster.
                    im.draft(im.mode, (size, size))
                im.load()
                im = ImageOps.exif_transpose(im)
                return _to_8bit(im)
    except ImageError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageError(p, "not a recognised image format") from None
    except Image.DecompressionBombError:
        raise ImageError(p, f"decompression bomb: over {2 * Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except Exception as exc:  # noqa: BLE001 - every decoder failure is a bad file, not a crash
        raise ImageError(p, f"cannot decode: {first_line(exc)}") from None


def _to_8bit(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("L", "RGB"):
        return im
    if mode in ("RGBA", "LA", "PA", "P", "La", "RGBa") or "transparency" in im.info:
        # Alpha over black: transparent margins of an exported figure look like film background.
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        out = Image.alpha_composite(black, rgba).convert("RGB")
        return out.convert("L") if mode in ("LA", "La") else out
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(high_depth_to_uint8(np.asarray(im)))
    if mode == "1":
        return im.convert("L")
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def high_depth_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Map 16-bit (or wider) grey levels to 0-255.

    Integer data is scaled by its bit depth, taken as the smallest of 8..16+ bits that holds the
    image's maximum, so 12-bit detectors stored in 16-bit PNGs keep their contrast. Float data
    is stretched from its minimum to its maximum.
    """
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64))
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        return np.round(scaled * 255).astype(np.uint8)
    arr = np.clip(arr.astype(np.int64), 0, None)
    hi = int(arr.max()) if arr.size else 0
    bits = max(8, math.ceil(math.log2(hi + 1))) if hi > 0 else 8
    return np.round(arr * (255.0 / (2**bits - 1))).astype(np.uint8)


def load_images(paths: list, spec: Preprocessing = DEFAULT,
                workers: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode many files with `load_image` on threads (Pillow releases the GIL while decoding).

    For the few hundred images that export and the report read; training's cache
    (`xray_edge.train.cache`) does the same for whole data sets, on disk.

    Returns:
        (images uint8 [n_ok, H, W, C], index into `paths` of each decoded image, one message per
        file that could not be decoded). A bad file is skipped, never fatal.
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(p):
        try:
            return load_image(p, spec), None
        except ImageError as err:
            return None, str(err)

    images, ok, errors = [], [], []
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for i, (arr, err) in enumerate(pool.map(one, paths)):
            if err is None:
                images.append(arr)
                ok.append(i)
            else:
                errors.append(err)
    stacked = np.stack(images) if images else np.zeros((0, *spec.shape), np.uint8)
    return stacked, np.asarray(ok, dtype=np.int64), errors
