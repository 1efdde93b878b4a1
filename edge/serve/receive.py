"""A DICOM Storage SCP (C-ECHO, C-STORE) that writes each film to the spool before answering.

Only the radiography storage classes are offered, with the uncompressed transfer syntaxes and
the JPEG and RLE ones the installed decoders read (asked of pydicom at start-up, so what is accepted is
exactly what can be decoded). Anything else is refused at association negotiation, the DICOM way:
the presentation context is rejected ("abstract syntax" or "transfer syntaxes not supported"),
so the sender knows before sending and nothing is accepted and dropped. A calling AE title not
in --allow-ae is rejected at association ("calling AE title not recognised").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from xray_edge.errors import first_line
from xray_edge.serve.spool import Spool, SpoolFull, film_key

STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
}
UNCOMPRESSED = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99"]
JPEG = ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
        "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"]
RLE_LOSSLESS = "1.2.840.10008.1.2.5"  # pydicom's own decoder, or GDCM's
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


def readable_syntaxes() -> list[str]:
    """Uncompressed syntaxes plus the compressed ones (JPEG family, RLE Lossless) whose decoder
    is installed."""
    from pydicom.pixels import get_decoder

    ok = []
    for uid in JPEG + [RLE_LOSSLESS]:
        try:
            if get_decoder(uid).is_available:
                ok.append(uid)
        except Exception:  # noqa: BLE001 - a syntax pydicom has no decoder for at all
            continue
    return UNCOMPRESSED + ok


@dataclass(frozen=True)
class ScpConfig:
    port: int
    ae_title: str = "XRAY_EDGE"
    bind: str = "0.0.0.0"
    allow_ae: tuple[str, ...] = ()  # empty: any calling AE


def start_scp(cfg: ScpConfig, spool: Spool, log):
    """Start the SCP on its own threads; returns the server (call `.shutdown()` to stop)."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # its per-PDU log is not for radiographers
    ae = AE(ae_title=cfg.ae_title)
    syntaxes = readable_syntaxes()
    for uid in STORAGE_CLASSES:
        ae.add_supported_context(uid, syntaxes)
    ae.add_supported_context(Verification)
    if cfg.allow_ae:
        ae.require_calling_aet = list(cfg.allow_ae)

    def on_store(event):
        return store(event, spool, log)

    def on_rejected(event):
        log(f"refused association from {event.assoc.requestor.address} "
            f"(calling AE {event.assoc.requestor.ae_title!r} not allowed)")

    handlers = [(evt.EVT_C_STORE, on_store), (evt.EVT_REJECTED, on_rejected)]
    return ae.start_server((cfg.bind, cfg.port), block=False, evt_handlers=handlers)


def store(event, spool: Spool, log) -> int:
    """One C-STORE: durable in the spool, then Success; out-of-resources when it cannot be."""
    try:
        data = event.encoded_dataset(include_meta=True)
        uid = str(event.request.AffectedSOPInstanceUID or "")
        key = film_key(uid, data)
        meta = {"source": "dicom", "received": time.time(), "calling_ae": event.assoc.requestor.ae_title,
                "sop_instance_uid": uid, "sop_class_uid": str(event.request.AffectedSOPClassUID or "")}
        spool.accept(key, data, ".dcm", meta)
    except SpoolFull as exc:
        log(f"refused a film from {event.assoc.requestor.ae_title}: {exc} (status 0xA700)")
        return OUT_OF_RESOURCES
    except OSError as exc:
        log(f"refused a film: cannot write to the spool ({first_line(exc)}) (status 0xA700)")
        return OUT_OF_RESOURCES
    except Exception as exc:  # noqa: BLE001 - a dataset pynetdicom cannot encode: say so, never crash
        log(f"refused a film: {first_line(exc)} (status 0xC000)")
        return CANNOT_UNDERSTAND
    return SUCCESS
