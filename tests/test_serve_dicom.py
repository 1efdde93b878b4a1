"""`xray-edge serve --dicom-port`: pynetdicom as the sending node and as the forwarding destination."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("pynetdicom")

from pydicom import dcmread  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, MPEG2MPML, RLELossless  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402
from pynetdicom.sop_class import (BasicTextSRStorage, ComputedRadiographyImageStorage,  # noqa: E402
                                  DigitalXRayImageStorageForPresentation, MRImageStorage, Verification)

from serve_helpers import Service, brightness_model, dicom_from_image, free_port, real_images, results, wait_results  # noqa: E402

DX, CR = DigitalXRayImageStorageForPresentation, ComputedRadiographyImageStorage


@pytest.fixture
def films(tmp_path) -> list[Path]:
    images = real_images(3, tmp_path)
    return [dicom_from_image(images[0], tmp_path / "dx.dcm"),
            dicom_from_image(images[1], tmp_path / "dx-jpeg.dcm", jpeg=True),
            dicom_from_image(images[2], tmp_path / "cr.dcm", sop_class=CR)]


@pytest.fixture
def pacs():
    """A second Storage SCP: where the reports are forwarded."""
    got = []
    ae = AE(ae_title="PACS")
    ae.add_supported_context(BasicTextSRStorage, ExplicitVRLittleEndian)
    port = free_port()

    def on_store(event):
        got.append(event.dataset)
        return 0x0000

    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    yield port, got
    server.shutdown()


def sender(ae_title: str = "MODALITY", syntaxes=(ExplicitVRLittleEndian, JPEGBaseline8Bit)) -> AE:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    for sop in (DX, CR):
        for ts in syntaxes:  # one context per syntax: the SCP accepts one syntax per context
            ae.add_requested_context(sop, ts)
    return ae


def test_echo_store_report_forward_and_refusals(tmp_path, films, pacs):
    model = brightness_model(tmp_path / "model")
    spool, port = tmp_path / "spool", free_port()
    pacs_port, forwarded = pacs
    svc = Service("--model", model, "--spool", spool, "--dicom-port", port, "--bind", "127.0.0.1",
                  "--allow-ae", "MODALITY,PACS", "--forward", f"PACS@127.0.0.1:{pacs_port}")
    try:
        svc.wait_for("listening")
        assoc = sender().associate("127.0.0.1", port, ae_title="XRAY_EDGE")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        statuses = [assoc.send_c_store(dcmread(f)).Status for f in films]
        assoc.release()
        assert statuses == [0x0000] * 3
        recs = wait_results(spool, 3)

        # a transfer syntax we do not take (video), and a storage class we do not take: refused at
        # negotiation; RLE Lossless, which pydicom decodes, is offered
        from pydicom.pixels import get_decoder

        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(DX, MPEG2MPML)
        ae.add_requested_context(CR, RLELossless)
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port)
        assert assoc.is_established
        rejected = {c.abstract_syntax: c.result for c in assoc.rejected_contexts}
        assert rejected == {DX: 0x04, MRImageStorage: 0x03}  # transfer syntax / abstract syntax not supported
        rle = [c for c in assoc.accepted_contexts if c.transfer_syntax[0] == RLELossless]
        assert bool(rle) == get_decoder(RLELossless).is_available
        with pytest.raises(ValueError, match="No presentation context"):
            ds = dcmread(films[0])
            ds.file_meta.TransferSyntaxUID = MPEG2MPML
            assoc.send_c_store(ds)
        assoc.release()

        # a calling AE title not allowed: association rejected, nothing stored
        intruder = AE(ae_title="INTRUDER")
        intruder.add_requested_context(Verification)
        assoc = intruder.associate("127.0.0.1", port)
        assert assoc.is_rejected and not assoc.is_established
        svc.wait_for("'INTRUDER' not allowed")

        end = time.monotonic() + 30
        while len(forwarded) < 3 and time.monotonic() < end:
            time.sleep(0.1)
        assert svc.stop() == 0
    finally:
        svc.proc.kill()

    by_uid = {r["sop_instance_uid"]: r for r in results(spool)}
    assert len(by_uid) == 3
    for f in films:
        src = dcmread(f, stop_before_pixels=True)
        r = by_uid[src.SOPInstanceUID]
        assert r["status"] == "classified" and r["source"] == "dicom"
        assert r["study_instance_uid"] == src.StudyInstanceUID and r["series_instance_uid"] == src.SeriesInstanceUID
        assert (spool / "outbox" / "sent" / r["report"]).is_file()
    text = (spool / "results.jsonl").read_text() + "\n".join(svc.lines)
    assert "Test^Patient" not in text and "PID-12345" not in text  # no PHI without --log-phi

    # the reports reached the PACS: Basic Text SRs in the films' studies, naming result and model
    assert len(forwarded) == 3
    studies = {dcmread(f, stop_before_pixels=True).StudyInstanceUID: f for f in films}
    for sr in forwarded:
        assert sr.SOPClassUID == BasicTextSRStorage and sr.Modality == "SR"
        assert sr.StudyInstanceUID in studies and sr.PatientID == "PID-12345"
        r = next(r for r in by_uid.values() if r["study_instance_uid"] == sr.StudyInstanceUID)
        items = {i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue for i in sr.ContentSequence}
        assert items["Label"] == r["label"]
        assert float(items["Probability"]) == pytest.approx(r["probability"], abs=1e-4)
        assert items["Threshold"].startswith("0.5000") and r["model_sha256"] in items["Model"]
        ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == r["sop_instance_uid"]


def test_full_spool_answers_out_of_resources(tmp_path, films):
    """--max-spool below one film: the film is refused with 0xA700 (the sender keeps it), nothing
    is half-kept, and the service goes on answering."""
    model = brightness_model(tmp_path / "model")
    spool, port = tmp_path / "spool", free_port()
    size = films[0].stat().st_size
    svc = Service("--model", model, "--spool", spool, "--dicom-port", port, "--bind", "127.0.0.1",
                  "--max-spool", str(size // 2))
    try:
        svc.wait_for("listening")
        assoc = sender(syntaxes=(ExplicitVRLittleEndian,)).associate("127.0.0.1", port)
        assert assoc.send_c_store(dcmread(films[0])).Status == 0xA700
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        svc.wait_for("0xA700")
        time.sleep(0.5)
        assert svc.stop() == 0
    finally:
        svc.proc.kill()
    assert results(spool) == [] and list((spool / "films").iterdir()) == []


def test_a_malformed_dataset_is_quarantined_and_the_service_goes_on(tmp_path, films):
    model = brightness_model(tmp_path / "model")
    spool, port = tmp_path / "spool", free_port()
    svc = Service("--model", model, "--spool", spool, "--dicom-port", port, "--bind", "127.0.0.1")
    try:
        svc.wait_for("listening")
        assoc = sender(syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian)).associate("127.0.0.1", port)
        bad = dcmread(films[0])
        bad.Rows = 60000  # the pixel data no longer fits the header
        bad.SOPInstanceUID = bad.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.10.999"
        assert assoc.send_c_store(bad).Status == 0x0000
        assert assoc.send_c_store(dcmread(films[2])).Status == 0x0000
        assoc.release()
        recs = wait_results(spool, 2)
        assert svc.stop() == 0
    finally:
        svc.proc.kill()
    status = {r["sop_instance_uid"]: r["status"] for r in recs}
    assert status["1.2.826.0.1.3680043.10.999"] == "quarantined"
    assert list(status.values()).count("classified") == 1
    assert (spool / "quarantine" / "1.2.826.0.1.3680043.10.999.reason.txt").read_text().strip()


def test_a_full_disk_answers_out_of_resources(tmp_path, films):
    """The spool on a small tmpfs filled with ballast: 0xA700; room again: Success and a result."""
    import os
    import shutil
    import subprocess

    from xray_edge.serve.spool import DISK_RESERVE

    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    svc = None
    try:
        model = brightness_model(tmp_path / "model")
        spool, port = disk / "spool", free_port()
        svc = Service("--model", model, "--spool", spool, "--dicom-port", port, "--bind", "127.0.0.1")
        svc.wait_for("listening")
        free = shutil.disk_usage(disk).free
        ballast = disk / "ballast"
        ballast.write_bytes(b"\0" * (free - DISK_RESERVE - films[0].stat().st_size // 2))
        assoc = sender(syntaxes=(ExplicitVRLittleEndian,)).associate("127.0.0.1", port)
        assert assoc.send_c_store(dcmread(films[0])).Status == 0xA700
        os.unlink(ballast)
        assert assoc.send_c_store(dcmread(films[0])).Status == 0x0000
        assoc.release()
        (rec,) = wait_results(spool, 1)
        assert rec["status"] == "classified"
        assert any("the disk is full" in line and "0xA700" in line for line in svc.lines)
        assert svc.stop() == 0
    finally:
        if svc is not None:
            svc.proc.kill()
            svc.proc.wait()
        subprocess.run(["umount", str(disk)], capture_output=True)
