"""DICOM to 8-bit grey levels, as a radiologist's viewer would show the image.

Needs the optional ``[dicom]`` extra (pydicom). Order follows the DICOM standard (PS3.3 C.11):
modality LUT (rescale slope/intercept), then VOI LUT or window, then MONOCHROME1 inversion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xray_edge.errors import ImageError, first_line


def read_dicom(path: Path) -> np.ndarray:
    """Return the first frame as uint8, (H, W) for grey images or (H, W, 3) for colour."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise ImageError(path, "DICOM support needs the extra: pip install 'xray-edge[dicom]'") from None
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - InvalidDicomError, EOFError, struct.error, ...
        raise ImageError(path, f"not a readable DICOM file: {first_line(exc)}") from None
    if "PixelData" not in ds:
        raise ImageError(path, "DICOM file has no pixel data")
    try:
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing decoder plugin, bad length, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        if syntax is not None and getattr(syntax, "is_compressed", False):
            raise ImageError(path, f"compressed DICOM ({name}) needs a decoder: "
                                   "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg") from None
        raise ImageError(path, f"cannot decode DICOM pixels: {first_line(exc)}") from None
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if frames > 1:
        arr = arr[0]
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return _stretch(arr) if arr.dtype != np.uint8 else arr
    if arr.ndim != 2:
        raise ImageError(path, f"unsupported DICOM pixel array of shape {arr.shape}")

    values = apply_modality_lut(arr, ds).astype(np.float64)
    grey = _apply_voi(values, ds, apply_voi_lut)
    if photometric == "MONOCHROME1":  # MONOCHROME1: low values are white
        grey = 255 - grey
    return grey


def _apply_voi(values: np.ndarray, ds, apply_voi_lut) -> np.ndarray:
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center = float(_first(ds.WindowCenter))
        width = max(float(_first(ds.WindowWidth)), 1.0)
        # DICOM linear window (PS3.3 C.11.2.1.2.1)
        scaled = ((values - (center - 0.5)) / (width - 1 if width > 1 else 1) + 0.5)
        return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)
    if "VOILUTSequence" in ds:
        values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    return _stretch(values)


def _stretch(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.round((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _first(v):
    try:
        return v[0]
    except (TypeError, IndexError):
        return v
