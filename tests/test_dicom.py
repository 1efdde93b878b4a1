"""DICOM through the one preprocessing: modality LUT, window, MONOCHROME1, and its failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import FileDataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid  # noqa: E402

from xray_edge.errors import ImageError  # noqa: E402
from xray_edge.preprocess import load_image  # noqa: E402


def write_dicom(path: Path, pixels: np.ndarray | None, photometric="MONOCHROME2", bits=12,
                slope=1.0, intercept=0.0, window=None, syntax=ExplicitVRLittleEndian) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        if syntax.is_compressed:  # a JPEG 2000 codestream header, then noise: no decoder gets far
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([b"\xffO\xffQ" + bytes(200)])
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def film(seed: int = 0) -> np.ndarray:
    """12-bit pixels of a phantom chest film (train/phantom.py): what the input gate accepts."""
    from xray_edge.train.phantom import phantom_image

    return phantom_image(np.random.default_rng(seed), False).astype(np.uint16) * 16


def ramp(h=256, w=256, top=4095) -> np.ndarray:
    return np.tile(np.linspace(0, top, w).astype(np.uint16), (h, 1))


def test_monochrome2_ramp_goes_dark_to_bright(tmp_path):
    x = load_image(write_dicom(tmp_path / "a.dcm", ramp()))
    assert x.shape == (200, 200, 3)
    assert x[:, :5].mean() < 10 and x[:, -5:].mean() > 245


def test_monochrome1_is_inverted(tmp_path):
    a = load_image(write_dicom(tmp_path / "m2.dcm", ramp()))
    b = load_image(write_dicom(tmp_path / "m1.dcm", ramp(), photometric="MONOCHROME1"))
    assert np.abs(a.astype(int) + b.astype(int) - 255).max() <= 1


def test_window_is_applied_after_rescale(tmp_path):
    # stored 0..4095, rescaled to -1024..3071 (HU-like); window 0 +- 500 -> left part black
    p = write_dicom(tmp_path / "w.dcm", ramp(), slope=1.0, intercept=-1024, window=(0, 1000))
    x = load_image(p)[0, :, 0].astype(int)
    frac_black = (x == 0).mean()
    frac_white = (x == 255).mean()
    # -1024..-500 is black (about 13% of the ramp), 500..3071 white (about 63%)
    assert 0.08 < frac_black < 0.2 and 0.55 < frac_white < 0.7


def test_dicom_detected_by_preamble_without_suffix(tmp_path):
    p = write_dicom(tmp_path / "IMG0001", ramp())
    assert load_image(p).shape == (200, 200, 3)


def test_dicom_without_pixel_data(tmp_path):
    with pytest.raises(ImageError, match="no pixel data"):
        load_image(write_dicom(tmp_path / "empty.dcm", None))


def test_compressed_dicom_without_decoder_says_what_to_install(tmp_path):
    p = write_dicom(tmp_path / "j2k.dcm", ramp(), syntax=JPEG2000Lossless)
    with pytest.raises(ImageError, match="decoder|cannot decode"):
        load_image(p)


def test_not_a_dicom_with_dcm_suffix(tmp_path):
    p = tmp_path / "x.dcm"
    p.write_bytes(b"hello")
    with pytest.raises(ImageError, match="DICOM"):
        load_image(p)


# ---------------------------------------------------------------- hostile DICOM (issue #11)
@pytest.mark.parametrize("tags", [{"WindowCenter": "abc", "WindowWidth": "100"},
                                  {"RescaleSlope": "x1"}, {"RescaleIntercept": "nan"}])
def test_non_numeric_grey_level_tags_are_image_errors(tmp_path, tags):
    p = write_dicom(tmp_path / "odd.dcm", ramp())
    ds = pydicom.dcmread(p)
    for k, v in tags.items():
        ds.add_new(pydicom.datadict.tag_for_keyword(k), "LO", v)  # a value no viewer would write
    ds.save_as(p)
    with pytest.raises(ImageError, match="not a (finite )?number") as info:
        load_image(p)
    assert str(p) in str(info.value)


def test_one_pixel_dicom_is_refused_like_other_images(tmp_path):
    with pytest.raises(ImageError, match="too small"):
        load_image(write_dicom(tmp_path / "dot.dcm", np.zeros((1, 1), np.uint16)))


def test_oversized_dicom_is_refused_from_its_header(tmp_path):
    p = write_dicom(tmp_path / "huge.dcm", ramp(16, 16))
    ds = pydicom.dcmread(p)
    ds.Rows, ds.Columns = 12000, 12000  # the pixel data is 16x16: only the header is read
    ds.save_as(p)
    with pytest.raises(ImageError, match="over the .* limit"):
        load_image(p)


def test_deflated_dicom_bomb_is_refused_before_inflating(tmp_path):
    import zlib

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    side = 12000  # 288 MB of pixels from a file of a few hundred KB
    head = write_dicom(tmp_path / "head.dcm", ramp(16, 16))
    ds = pydicom.dcmread(head)
    del ds.PixelData
    ds.Rows = ds.Columns = side
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "meta.dcm", enforce_file_format=True)
    raw = (tmp_path / "meta.dcm").read_bytes()
    meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
    body = zlib.decompress(raw[meta_end:], -zlib.MAX_WBITS)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [packer.compress(body + b"\xe0\x7f\x10\x00OW\x00\x00" + (side * side * 2).to_bytes(4, "little"))]
    zeros = bytes(1 << 22)
    for _ in range(side * side * 2 // len(zeros)):
        parts.append(packer.compress(zeros))
    parts.append(packer.compress(bytes(side * side * 2 % len(zeros))) + packer.flush())
    p = tmp_path / "bomb.dcm"
    p.write_bytes(raw[:meta_end] + b"".join(parts))
    assert p.stat().st_size < 1_000_000
    with pytest.raises(ImageError, match="decompression bomb|over the .* limit"):
        load_image(p)


# The transfer syntaxes radiography departments send, decoded through the [dicom] extra's plugins
# and compared with the same image stored uncompressed (pydicom's own test files).
@pytest.mark.parametrize("name, reference", [
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm"),  # JPEG Lossless SV1 (1.2.840.10008.1.2.4.70)
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),  # JPEG-LS Lossless
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),  # JPEG 2000 Lossless
    ("MR_small_RLE.dcm", "MR_small.dcm"),  # RLE Lossless
])
def test_compressed_syntaxes_of_the_dicom_extra_decode_losslessly(name, reference):
    from pydicom.data import get_testdata_file

    from xray_edge.dicom import read_dicom

    path, ref = get_testdata_file(name), get_testdata_file(reference)
    if path is None or ref is None:
        pytest.skip(f"pydicom test file {name} or {reference} is not here")
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed
    a, b = read_dicom(Path(path)), read_dicom(Path(ref))
    assert a.shape == b.shape and a.std() > 10
    np.testing.assert_array_equal(a, b)


def test_jpeg2000_lossy_decodes():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("JPEG2000.dcm")  # JPEG 2000 (lossy allowed), 1024 x 256 NM
    if path is None:
        pytest.skip("pydicom test file JPEG2000.dcm is not here")
    x = load_image(path)
    assert x.shape == (200, 200, 3) and x.std() > 5
