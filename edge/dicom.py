"""DICOM to 8-bit grey levels, as a radiologist's viewer would show the image.

Needs the optional ``[dicom]`` extra (pydicom). Order follows the DICOM standard (PS3.3 C.11):
modality LUT (rescale slope/intercept), then VOI LUT or window, then MONOCHROME1 inversion.
The pixel limits of every other image apply, checked from the header before any pixel is
decoded; only the first frame is decoded, a band of rows at a time in float32.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

from xray_edge.decode import DECODE_BUDGET, MAX_PIXELS, check_size
from xray_edge.errors import ImageError, first_line

DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole dataset is zipped
# A deflated dataset may not inflate beyond what the largest allowed image needs (3 bytes per
# pixel: 8-bit RGB or 16-bit grey plus header); pydicom inflates it whole, so check first.
_DEFLATE_SLACK = 16 << 20
_BAND_PIXELS = 1 << 20


def read_dicom(path: Path, finish=None):
    """Return the first frame as uint8, (H, W) for grey images or (H, W, 3) for colour.

    The size limits of `xray_edge.decode.check_size` are checked before pixel data is decoded,
    and the decode holds the shared `DECODE_BUDGET`.

    Args:
        path: a DICOM file.
        finish: applied to the uint8 frame inside the budget (e.g. resizing); its result is returned.
    """
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut, pixel_array
    except ImportError:
        raise ImageError(path, "DICOM support needs the extra: pip install 'xray-edge[dicom]'") from None
    _check_deflated(path)
    try:
        # defer_size: pixel data stays on disk until the header has been checked
        ds = pydicom.dcmread(path, defer_size=1 << 16)
    except Exception as exc:  # noqa: BLE001 - InvalidDicomError, EOFError, struct.error, ...
        raise ImageError(path, f"not a readable DICOM file: {first_line(exc)}") from None
    if "PixelData" not in ds:
        raise ImageError(path, "DICOM file has no pixel data")
    rows, cols = _int_tag(path, ds, "Rows"), _int_tag(path, ds, "Columns")
    check_size(path, cols, rows)
    with DECODE_BUDGET.hold(rows * cols):
        grey = _frame(path, ds, pixel_array, apply_modality_lut, apply_voi_lut)
        if finish is None:
            return grey
        small = finish(grey)
        del grey, ds  # free the full-size pixels before the next large decode may start
        return small


HEADER_KEYWORDS = ("Modality", "BodyPartExamined", "ViewPosition", "NumberOfFrames", "SOPClassUID",
                   "ImageType", "ConversionType")


def read_header(path: Path) -> dict[str, str]:
    """The tags the input gate decides on, as plain strings ("" when absent); no pixel is read.

    Multi-valued tags (ImageType) are joined with a backslash, as DICOM writes them.
    """
    try:
        import pydicom
    except ImportError:
        raise ImageError(path, "DICOM support needs the extra: pip install 'xray-edge[dicom]'") from None
    _check_deflated(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - InvalidDicomError, EOFError, struct.error, ...
        raise ImageError(path, f"not a readable DICOM file: {first_line(exc)}") from None
    out = {}
    for key in HEADER_KEYWORDS:
        try:
            v = ds.get(key)
        except Exception:  # noqa: BLE001 - a value pydicom cannot parse counts as absent
            v = None
        if v is None:
            out[key] = ""
        elif isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
            out[key] = "\\".join(str(x) for x in v)
        else:
            out[key] = str(v).strip()
    return out


def _frame(path: Path, ds, pixel_array, apply_modality_lut, apply_voi_lut) -> np.ndarray:
    """The first frame as 8-bit grey levels or RGB."""
    try:
        arr = pixel_array(ds, index=0)  # the first frame only
    except Exception as exc:  # noqa: BLE001 - missing decoder plugin, bad length, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        if syntax is not None and getattr(syntax, "is_compressed", False):
            if not _decoder_available(syntax):
                raise ImageError(path, f"compressed DICOM ({name}) needs a decoder: pip install "
                                       "'xray-edge[dicom]' (JPEG Extended 12-bit: also pylibjpeg-libjpeg)") from None
            hint = " (12-bit JPEG Extended needs pylibjpeg-libjpeg)" if syntax == "1.2.840.10008.1.2.4.51" else ""
            raise ImageError(path, f"cannot decode compressed DICOM ({name}){hint}: {first_line(exc)}") from None
        raise ImageError(path, f"cannot decode DICOM pixels: {first_line(exc)}") from None
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return arr if arr.dtype == np.uint8 else _stretch_rows(arr, lambda a: a.astype(np.float64))
    if arr.ndim != 2:
        raise ImageError(path, f"unsupported DICOM pixel array of shape {arr.shape}")
    try:
        return _grey(path, arr, ds, apply_modality_lut, apply_voi_lut)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a LUT that does not fit the pixels, ...
        raise ImageError(path, f"cannot apply the DICOM grey-level tables: {first_line(exc)}") from None


def _decoder_available(syntax) -> bool:
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(syntax).is_available)
    except Exception:  # noqa: BLE001 - no decoder known for this syntax at all
        return False


def _grey(path: Path, arr: np.ndarray, ds, apply_modality_lut, apply_voi_lut) -> np.ndarray:
    invert = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper() == "MONOCHROME1"
    windowed = "WindowCenter" in ds and "WindowWidth" in ds
    if "ModalityLUTSequence" in ds or ("VOILUTSequence" in ds and not windowed):
        # LUT tables: rare; pydicom applies them to the whole frame
        values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
        if "VOILUTSequence" in ds and not windowed:
            values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
        grey = _stretch_rows(values, lambda a: a)
    else:
        slope = _number(path, ds, "RescaleSlope", 1.0)
        intercept = _number(path, ds, "RescaleIntercept", 0.0)

        def modality(a: np.ndarray) -> np.ndarray:
            return a.astype(np.float64) * slope + intercept

        if windowed:
            center = _number(path, ds, "WindowCenter", None)
            width = max(_number(path, ds, "WindowWidth", None), 1.0)

            def window(a: np.ndarray) -> np.ndarray:  # DICOM linear window (PS3.3 C.11.2.1.2.1)
                scaled = (modality(a) - (center - 0.5)) / (width - 1 if width > 1 else 1) + 0.5
                return np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8)

            grey = _rows(arr, window)
        else:
            grey = _stretch_rows(arr, modality)
    if invert:  # MONOCHROME1: low values are white
        np.subtract(255, grey, out=grey)
    return grey


def _rows(arr: np.ndarray, fn) -> np.ndarray:
    """Apply `fn` (rows -> uint8 rows) a band of rows at a time: no full-size float copy."""
    out = np.empty(arr.shape, dtype=np.uint8)
    step = max(1, _BAND_PIXELS // max(1, arr[0].size))
    for top in range(0, arr.shape[0], step):
        out[top:top + step] = fn(arr[top:top + step])
    return out


def _stretch_rows(arr: np.ndarray, values) -> np.ndarray:
    """Map `values(arr)` linearly from its minimum to its maximum onto 0-255, band by band."""
    lo, hi = math.inf, -math.inf
    step = max(1, _BAND_PIXELS // max(1, arr[0].size))
    for top in range(0, arr.shape[0], step):
        v = values(arr[top:top + step])
        lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return _rows(arr, lambda a: np.round((values(a) - lo) * (255.0 / (hi - lo))).astype(np.uint8))


def _number(path: Path, ds, keyword: str, default: float | None) -> float:
    """A numeric tag's first value as float; ImageError when it is not a finite number."""
    try:
        v = ds.get(keyword)
        if v is not None and not isinstance(v, (str, bytes, int, float)):
            v = v[0]  # a multi-valued tag: its first value, as viewers do
        if v is None or v == "":
            if default is None:
                raise ImageError(path, f"DICOM {keyword} is empty")
            return default
        x = float(v)
    except ImageError:
        raise
    except Exception:  # noqa: BLE001 - ValueError, TypeError, IndexError from odd tag values
        raise ImageError(path, f"DICOM {keyword} is not a number") from None
    if not math.isfinite(x):
        raise ImageError(path, f"DICOM {keyword} {x} is not a finite number")
    return x


def _int_tag(path: Path, ds, keyword: str) -> int:
    try:
        v = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a value pydicom cannot parse
        v = None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ImageError(path, f"DICOM {keyword} {v!r} is not a positive integer")
    return int(v)


def _check_deflated(path: Path) -> None:
    """Refuse a deflated dataset that inflates beyond the largest allowed image (a zip bomb)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132 + 12)
            if head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
                return  # no preamble or no group length: pydicom decides
            meta_len = struct.unpack("<I", head[140:144])[0]
            meta = f.read(min(meta_len, 1 << 16))
            if DEFLATED.encode() not in meta:
                return
            limit = 3 * MAX_PIXELS + _DEFLATE_SLACK
            inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
            f.seek(132 + 12 + meta_len)
            while chunk := f.read(1 << 16):
                while chunk:
                    total += len(inflater.decompress(chunk, 1 << 20))
                    chunk = inflater.unconsumed_tail
                    if total > limit:
                        raise ImageError(path, f"deflated DICOM inflates beyond {limit:,} bytes "
                                               "(decompression bomb?)")
    except OSError as exc:
        raise ImageError(path, f"cannot read: {exc.strerror or exc}") from None
    except zlib.error as exc:
        raise ImageError(path, f"not a readable DICOM file: {first_line(exc)}") from None
