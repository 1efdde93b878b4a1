"""`xray-edge serve` under load: films/s, receive-to-result latency, resident memory.

    python tests/tools/bench_serve.py [--films 2000] [--artifacts artifacts] [--side 1024]

Starts the service (DICOM port and watched folder on one spool), then sends half the films by
C-STORE (one association) and writes the other half into the folder (each written under a
temporary name and renamed, as a careful viewer does). Prints, per route: films/s from the first
send to the last result, receive-to-result p50/p99 (DICOM: from the dataset written to the spool;
folder: from the rename into the watched folder, so it includes the --watch-settle wait), and
the service's resident memory after start-up and at the end. Films are `--side` px, 8-bit, built
from real films (../shared/data when present) or phantoms, each with its own content.
Without an artifacts folder it uses a tiny ONNX model (then the figures are the service's
overhead, not a real model's).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serve_helpers import Service, brightness_model, free_port, real_images, results, wait_results  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def base_images(n: int, side: int, tmp: Path) -> list[np.ndarray]:
    out = []
    for p in real_images(n, tmp):
        im = Image.open(p).convert("L").resize((side, side))
        out.append(np.asarray(im, dtype=np.uint8))
    return out


def dicom_film(pixels: np.ndarray, i: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.SOPClassUID, ds.Modality = "1.2.840.10008.5.1.4.1.1.1.1", "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    px = pixels.copy()
    px[0, :8] = np.frombuffer(i.to_bytes(8, "little"), np.uint8)  # each film its own content
    ds.PixelData = px.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def pct(values, q):
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--films", type=int, default=2000, help="films in all, half by DICOM, half by folder")
    ap.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--settle", type=float, default=2.0, help="--watch-settle of the service")
    args = ap.parse_args()
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    try:
        if (args.artifacts / "manifest.json").is_file():
            model, what = args.artifacts, f"{args.artifacts} (its default file)"
        else:
            model, what = brightness_model(tmp / "model"), "a tiny ONNX model (no artifacts/: service overhead only)"
        bases = base_images(8, args.side, tmp)
        spool, watch, port = tmp / "spool", tmp / "watch", free_port()
        watch.mkdir()
        svc = Service("--model", model, "--spool", spool, "--dicom-port", port, "--bind", "127.0.0.1",
                      "--watch", watch, "--watch-settle", args.settle)
        try:
            svc.wait_for("listening", 120)
            rss_start = rss_mb(svc.proc.pid)
            n_dicom = args.films // 2
            n_folder = args.films - n_dicom
            print(f"model: {what}; {args.films} films of {args.side}x{args.side} px, 8-bit")

            ae = AE(ae_title="BENCH")
            ae.add_requested_context(DigitalXRayImageStorageForPresentation, "1.2.840.10008.1.2.1")
            assoc = ae.associate("127.0.0.1", port)
            t0 = time.time()
            for i in range(n_dicom):
                status = assoc.send_c_store(dicom_film(bases[i % len(bases)], i))
                if getattr(status, "Status", None) != 0:
                    code = getattr(status, "Status", None)
                    raise SystemExit(f"film {i}: C-STORE {'gave no answer' if code is None else f'status {code:#06x}'} "
                                     f"(association {'aborted' if assoc.is_aborted else 'open'}); "
                                     f"service log: {svc.lines[-5:]}")
            assoc.release()
            recs = wait_results(spool, n_dicom, 60 + n_dicom)
            t_dicom = max(r["received"] + r["receive_to_result_ms"] / 1e3 for r in recs) - t0
            lat_dicom = [r["receive_to_result_ms"] for r in recs]

            written = {}
            t1 = time.time()
            for i in range(n_folder):
                px = bases[i % len(bases)].copy()
                px[0, :8] = np.frombuffer((10**9 + i).to_bytes(8, "little"), np.uint8)
                final = watch / f"film{i:05d}.png"
                tmpname = watch / f".film{i:05d}.png.tmp"
                Image.fromarray(px).save(tmpname, format="PNG", compress_level=1)
                os.replace(tmpname, final)
                written[str(final)] = time.time()
            recs = wait_results(spool, n_dicom + n_folder, 60 + n_folder)
            folder = [r for r in recs if r.get("source") == "watch"]
            done_at = [r["received"] + r["receive_to_result_ms"] / 1e3 for r in folder]
            t_folder = max(done_at) - t1
            lat_folder = [(d - written[r["path"]]) * 1e3 for r, d in zip(folder, done_at)]
            rss_end = rss_mb(svc.proc.pid)
            svc.stop()
        finally:
            svc.proc.kill()
        bad = [r for r in results(spool) if r["status"] != "classified"]
        print(f"{'route':8} {'films':>6} {'films/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
        print(f"{'DICOM':8} {n_dicom:6d} {n_dicom / t_dicom:8.1f} {pct(lat_dicom, 50):8.0f} {pct(lat_dicom, 99):8.0f}")
        print(f"{'folder':8} {n_folder:6d} {n_folder / t_folder:8.1f} {pct(lat_folder, 50):8.0f} {pct(lat_folder, 99):8.0f}"
              f"   (includes the {args.settle:g} s settle time)")
        print(f"resident memory: {rss_start:.0f} MB after start, {rss_end:.0f} MB at the end; "
              f"{len(bad)} films not classified")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
