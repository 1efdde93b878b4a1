"""The result as a DICOM Basic Text SR in the film's study, for the viewer to show beside it.

Why Basic Text SR (written with pydicom): it is the SR that PACS and viewers display as plain
text in the study's series list (Orthanc, OHIF, Weasis, Horos), it needs no template (TID 1500 of
a Comprehensive SR is for measurements tied to image regions, which we do not have), and pydicom
is already the DICOM extra's reader, so no further dependency (highdicom would add one for
templates we do not use). The SR joins the film's study (same patient and study module, a series
of its own) and references the film in its evidence sequence.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

from xray_edge import __version__
from xray_edge.errors import first_line

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
           "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")


def _code(ds_cls, value: str, scheme: str, meaning: str):
    c = ds_cls()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = value, scheme, meaning
    return c


def _text(ds_cls, concept, text: str):
    item = ds_cls()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    item.ConceptNameCodeSequence = [concept]
    item.TextValue = text[:1024]
    return item


def summary_text(result: dict) -> str:
    thr = result.get("threshold")
    thr_txt = "most probable class" if thr is None else f"threshold {thr:.3f} ({result.get('threshold_source')})"
    return (f"{result['label']} (probability {result['probability']:.3f}, {thr_txt}). "
            "Machine result for triage, not a diagnosis.")


def build_sr(source, result: dict):
    """A Basic Text SR dataset for `result` about the film whose header is `source`."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import generate_uid

    ds = Dataset()
    for kw in _COPIED:
        ds.__setattr__(kw, source.get(kw, ""))
    # UIDs derived from the film and the model: a film classified again after a kill gets the
    # same SR (overwritten in outbox/, replaced at the destination), never a second one
    seed = [str(result.get("key")), str(result.get("model_sha256"))]
    ds.SOPClassUID, ds.SOPInstanceUID = BASIC_TEXT_SR, generate_uid(entropy_srcs=seed + ["sr"])
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "SR", 9901, 1
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(source.get("StudyInstanceUID", "")), seed[1], "series"])
    ds.SeriesDescription = "xray-edge result"
    ds.Manufacturer, ds.SoftwareVersions = "xray-edge", __version__
    t = time.gmtime()
    ds.ContentDate, ds.ContentTime = time.strftime("%Y%m%d", t), time.strftime("%H%M%S", t)
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.ConceptNameCodeSequence = [_code(Dataset, "18748-4", "LN", "Diagnostic imaging report")]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.get("SOPClassUID", "")
    ref.ReferencedSOPInstanceUID = source.get("SOPInstanceUID", "")
    series = Dataset()
    series.SeriesInstanceUID = source.get("SeriesInstanceUID", "")
    series.ReferencedSOPSequence = [ref]
    study = Dataset()
    study.StudyInstanceUID = source.get("StudyInstanceUID", "")
    study.ReferencedSeriesSequence = [series]
    ds.CurrentRequestedProcedureEvidenceSequence = [study]
    thr = result.get("threshold")
    ds.ContentSequence = [
        _text(Dataset, _code(Dataset, "121071", "DCM", "Finding"), summary_text(result)),
        _text(Dataset, _code(Dataset, "LABEL", "99XRAYEDGE", "Label"), str(result["label"])),
        _text(Dataset, _code(Dataset, "PROB", "99XRAYEDGE", "Probability"), f"{result['probability']:.4f}"),
        _text(Dataset, _code(Dataset, "THRESH", "99XRAYEDGE", "Threshold"),
              "none (most probable class)" if thr is None else f"{thr:.4f} ({result.get('threshold_source')})"),
        _text(Dataset, _code(Dataset, "MODEL", "99XRAYEDGE", "Model"),
              f"{result.get('model')} sha256 {result.get('model_sha256')} (xray-edge {__version__})"),
    ]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = BASIC_TEXT_SR, ds.SOPInstanceUID
    meta.TransferSyntaxUID = EXPLICIT_LE
    ds.file_meta = meta
    return ds


def encode(ds) -> bytes:
    from pydicom import dcmwrite

    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def parse_destination(text: str) -> tuple[str, str, int]:
    """'AE@host:port' -> (ae, host, port); ValueError in one line otherwise."""
    ae, sep, rest = text.partition("@")
    host, sep2, port = rest.rpartition(":")
    if not sep or not sep2 or not ae or not host or not port.isdigit() or not 0 < int(port) < 65536 or len(ae) > 16:
        raise ValueError(f"{text!r} is not AE@host:port (AE title of 16 characters at most)")
    return ae, host, int(port)


def forward(path: Path, destination: tuple[str, str, int], our_ae: str) -> str | None:
    """C-STORE one SR file to the destination; None on Success, else a one-line reason."""
    from pydicom import dcmread
    from pynetdicom import AE

    ae_title, host, port = destination
    ae = AE(ae_title=our_ae)
    ae.add_requested_context(BASIC_TEXT_SR, EXPLICIT_LE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    try:
        assoc = ae.associate(host, port, ae_title=ae_title)
    except Exception as exc:  # noqa: BLE001 - socket errors
        return first_line(exc)
    if not assoc.is_established:
        return f"association with {ae_title}@{host}:{port} refused or failed"
    try:
        status = assoc.send_c_store(dcmread(path))
        code = getattr(status, "Status", None)
        return None if code == 0 else f"C-STORE status {code if code is None else hex(code)}"
    except Exception as exc:  # noqa: BLE001
        return first_line(exc)
    finally:
        assoc.release()
