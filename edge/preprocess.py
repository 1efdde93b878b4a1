"""Where an image file becomes the model's input array: the recipe.

`load_image` is the one preprocessing of the project: training, calibration, parity checks and
the edge runner all call it. It returns plain 0-255 pixels as uint8 (H, W, 3); the scaling to
[0, 1] lives inside the model, so every exported format takes the same array. Decoding (limits,
memory budget, bit depths) is `xray_edge.decode`'s; DICOM's grey levels are `xray_edge.dicom`'s.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from xray_edge.decode import MIN_SIDE, check_file, is_dicom, read_pillow
from xray_edge.errors import ImageError

# Bump whenever the pixels this module produces change: the training cache and the manifest
# are keyed by it, so a model is never fed arrays made by a different recipe. "2" added
# `intensity`; a "1" record is the same recipe with intensity "none". A runner older than "2"
# refuses a "2" record instead of silently skipping an intensity step it does not know.
PREPROCESS_VERSION = "2"
_SAME_PIXELS = {"1": ("none",), "2": None}  # version -> intensities it may carry (None: any)

MAX_SIZE = 1024  # a model input side beyond this is not a chest X-ray classifier's


@dataclass(frozen=True)
class Preprocessing:
    """How a file becomes an array; recorded in the manifest and in every model file."""

    size: int = 200
    channels: int = 3
    resample: str = "bilinear"
    dtype: str = "uint8"
    scaling: str = "none: 0-255 pixels; the model divides by 255"
    # "equalize": each film's grey levels spread by histogram equalisation after resizing, so
    # exposure and processing (which differ by hospital, not by disease) weigh less
    intensity: str = "none"
    version: str = PREPROCESS_VERSION

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, self.channels)

    @property
    def geometry(self) -> "Preprocessing":
        """This recipe without its intensity step: the pixels the input gate judges."""
        return replace(self, intensity="none")

    def adjust(self, image: np.ndarray) -> np.ndarray:
        """The intensity step on an array of `geometry`: load_image(p, s) == s.adjust(load_image(p, s.geometry))."""
        if self.intensity == "none":
            return image
        return np.asarray(ImageOps.equalize(Image.fromarray(image)), dtype=np.uint8)  # per channel; grey stays grey

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """Build from a manifest or metadata dict; ValueError names the first value this runner
        cannot honour (it never feeds a model arrays made by another recipe)."""
        if not isinstance(d, dict):
            raise ValueError("preprocessing is not an object")
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        spec = cls(**known)
        spec.check()
        return spec

    def check(self) -> None:
        size, channels = self.size, self.channels
        if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIDE <= size <= MAX_SIZE:
            raise ValueError(f"preprocessing size {size!r} is not an integer in {MIN_SIDE}..{MAX_SIZE}")
        if isinstance(channels, bool) or channels != 3:
            raise ValueError(f"preprocessing channels {channels!r} is not 3 (RGB)")
        if not isinstance(self.resample, str) or self.resample not in _RESAMPLE_NAMES:
            raise ValueError(f"preprocessing resample {self.resample!r} is not one of "
                             f"{', '.join(sorted(_RESAMPLE_NAMES))}")
        if self.dtype != "uint8":
            raise ValueError(f"preprocessing dtype {self.dtype!r} is not uint8")
        if self.intensity not in INTENSITIES:
            raise ValueError(f"preprocessing intensity {self.intensity!r} is not one of {', '.join(INTENSITIES)}")
        if self.version not in _SAME_PIXELS:
            raise ValueError(f"preprocessing version {self.version!r} is not this runner's "
                             f"{PREPROCESS_VERSION!r} (re-export the model with this version)")
        if _SAME_PIXELS[self.version] and self.intensity not in _SAME_PIXELS[self.version]:
            raise ValueError(f"preprocessing version {self.version!r} has no intensity {self.intensity!r}")
        if not isinstance(self.scaling, str):
            raise ValueError("preprocessing scaling is not a string")


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
_RESAMPLE_NAMES = frozenset(_RESAMPLE)
INTENSITIES = ("none", "equalize")


DEFAULT = Preprocessing()


def decode_file(p: Path, fit, draft_side: int | None = None) -> Image.Image:
    """Any supported file -> `fit(8-bit L or RGB image)`, by Pillow or, for DICOM, pydicom."""
    check_file(p)
    if is_dicom(p):
        from xray_edge.dicom import read_dicom  # optional extra, imported only when needed

        return read_dicom(p, lambda grey: fit(Image.fromarray(grey)))
    return read_pillow(p, fit, draft_side)


def load_image(path: str | os.PathLike, spec: Preprocessing = DEFAULT) -> np.ndarray:
    """Decode any supported file into the model's input array.

    Args:
        path: JPEG, PNG (8/16-bit, L, RGB, RGBA, P), BMP, TIFF, GIF, WebP or DICOM file.
        spec: the preprocessing recorded with the model.

    Returns:
        uint8 array of shape ``spec.shape``; pixels 0-255, RGB, EXIF orientation applied, then
        the recipe's intensity step (`Preprocessing.adjust`).

    Raises:
        ImageError: for anything that is not a usable image, with a one-line reason.

    Example:
        >>> x = load_image("scan.jpg")          # (200, 200, 3) uint8
    """
    p = Path(path)

    def shrink(img: Image.Image) -> Image.Image:  # 8-bit L/RGB at full size -> the model's size
        if img.mode not in ("L", "RGB"):
            raise ImageError(p, f"unsupported pixel mode {img.mode}")  # pragma: no cover - defensive
        return img.resize((spec.size, spec.size), _RESAMPLE[spec.resample])

    arr = np.asarray(decode_file(p, shrink, spec.size), dtype=np.uint8)
    if arr.ndim == 2:  # grayscale: the tutorial's model takes RGB, so copy to three channels
        arr = np.repeat(arr[:, :, None], spec.channels, axis=2)
    return np.ascontiguousarray(spec.adjust(arr))


def load_display_image(path: str | os.PathLike, max_side: int = 512) -> Image.Image:
    """The file as 8-bit L or RGB at its own aspect ratio, longest side at most `max_side`.

    For pictures of an image (xray-edge explain), never for the model: that is `load_image`.
    The same checks, decoders and memory budget as `load_image`. Raises ImageError.
    """
    p = Path(path)

    def fit(img: Image.Image) -> Image.Image:
        if img.mode not in ("L", "RGB"):
            raise ImageError(p, f"unsupported pixel mode {img.mode}")  # pragma: no cover - defensive
        w, h = img.size
        scale = min(1.0, max_side / max(w, h))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)  # a new image, never in place

    return decode_file(p, fit, max_side)


def load_images(paths: list, spec: Preprocessing = DEFAULT, workers: int | None = None,
                load=None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode many files with `load_image` on threads (Pillow releases the GIL while decoding).

    For the few hundred images that export and the report read; training's cache
    (`xray_edge.train.cache`) does the same for whole data sets, on disk.

    Returns:
        (images uint8 [n_ok, H, W, C], index into `paths` of each decoded image, one message per
        file that could not be decoded). A bad file is skipped, never fatal.
        `load(path, spec)` replaces `load_image` (e.g. the input gate's `load_checked`).
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(p):
        try:
            return (load or load_image)(p, spec), None
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
