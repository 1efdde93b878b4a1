"""The worker: each spooled film through the library's classify path, one result line each.

Order per film, so that a kill at any point loses nothing and repeats nothing:
classify -> (DICOM) SR into outbox/ -> result line appended and fsynced -> film removed.
A kill before the line: the film is still in films/ and is classified on restart. A kill after
the line: the key is in results.jsonl and the film is only removed on restart. An SR that cannot
be built or written does not cost the film its label: the line says `report_error` instead.
A film goes to quarantine only when it has no result line.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from xray_edge.errors import ImageError, first_line
from xray_edge.serve.drift import DriftMonitor
from xray_edge.serve.spool import Film, Spool, durable_write, now_iso

_PHI = ("PatientName", "PatientID", "PatientBirthDate")
BATCH = 16  # films listed per pass: a new arrival waits at most this many films


@dataclass
class ServeConfig:
    our_ae: str = "XRAY_EDGE"
    forward: tuple[str, str, int] | None = None  # (AE, host, port) for the SRs
    log_phi: bool = False
    reports: bool = True  # write an SR for each DICOM film
    workers: int = 2  # decode threads
    stop_when_idle: bool = False  # --exit-when-idle: return once the spool is empty


class Worker:
    def __init__(self, spool: Spool, clf, loaded, threshold_source: str, cfg: ServeConfig, log,
                 drift: DriftMonitor | None = None):
        self.spool, self.clf, self.loaded, self.cfg, self.log = spool, clf, loaded, cfg, log
        self.threshold_source = threshold_source
        self.drift = drift
        self._last_forward_try = 0.0
        self._forward_down = False  # a forward failed: new SRs wait in outbox/ for _retry_forwards

    def run(self, stop: threading.Event) -> None:
        """Classify until `stop` is set (the current film is finished first)."""
        for film in self.spool.pending():  # a kill after the result line, before the removal
            self._settle(film)
        while not stop.is_set():
            films = self.spool.pending(BATCH)
            for f in films:
                self._settle(f)  # also the same SOP Instance UID sent again after its result
            films = [f for f in films if f.key not in self.spool.finished]
            self._retry_forwards()  # at most every 30 s, busy or idle
            if not films:
                if self.cfg.stop_when_idle:
                    return
                self.spool.wake.wait(0.5)
                self.spool.wake.clear()
                continue
            self._batch(films, stop)

    def _batch(self, films: list[Film], stop: threading.Event) -> None:
        results = self.clf.classify_paths([f.path for f in films], workers=self.cfg.workers,
                                          lookahead=max(2, self.cfg.workers * 2))
        try:
            for film, item in zip(films, results):
                try:
                    self._one(film, item)
                except Exception as exc:  # noqa: BLE001 - one film's failure must not stop the service
                    self._failed(film, f"{type(exc).__name__}: {first_line(exc)}")
                if stop.is_set():
                    return
        finally:
            results.close()

    def _failed(self, film: Film, why: str) -> None:
        """After an exception: a film with its result line keeps it (only the removal is left);
        one without is quarantined, once."""
        try:
            if film.key in self.spool.finished:
                self.log(f"{now_iso()} {film.key}: after its result line: {why}")
                self.spool.done(film)
            else:
                self._quarantine(film, f"cannot finish: {why}")
        except Exception as exc:  # noqa: BLE001 - e.g. the disk gone read-only: say so, go on
            self.log(f"{now_iso()} {film.key}: {why}; then {type(exc).__name__}: {first_line(exc)}")

    def _settle(self, film: Film) -> None:
        """A film whose key has a result: quarantine it if that result says so, else remove it."""
        status = self.spool.finished.get(film.key)
        if status == "quarantined":
            if self.spool.to_quarantine(film) is None:
                self.log(f"{now_iso()} {film.key}: gone from films/ before it was moved to quarantine/")
        elif status is not None:
            self.spool.done(film)

    def _one(self, film: Film, item) -> None:
        if isinstance(item, ImageError) and getattr(item, "rule", None):
            self._refused(film, item)  # the input gate's NotChestRadiograph: a decision, not a broken file
            return
        if isinstance(item, ImageError):
            self._quarantine(film, item.reason)
            return
        header = self._header(film)
        rec = self._record(film, header)
        labels = self.clf.info.labels
        rec.update(label=item.label, probability=round(item.probability, 6),
                   scores={k: round(v, 6) for k, v in item.scores.items()},
                   decode_ms=round(item.decode_ms, 2), infer_ms=round(item.infer_ms, 2),
                   status="classified", unlike_training=list(item.unlike_training))
        if header is not None and self.cfg.reports:
            try:
                rec["report"] = self._report(header, rec)
            except Exception as exc:  # noqa: BLE001 - the label stands without its SR
                rec["report_error"] = f"{type(exc).__name__}: {first_line(exc)}"
        rec["received"] = round(film.received, 3) if film.received else None
        rec["receive_to_result_ms"] = round((time.time() - film.received) * 1e3, 1) if film.received else None
        self.spool.append_result(rec)
        self.spool.done(film)
        self.log(f"{rec['time']} classified {rec.get('sop_instance_uid') or rec.get('path')}: "
                 f"{item.label} p={item.probability:.3f}"
                 + (f" (unlike training: {', '.join(rec['unlike_training'])})" if rec["unlike_training"] else "")
                 + (f" (no report: {rec['report_error']})" if "report_error" in rec else ""))
        if self.drift is not None and len(labels) == 2:
            line = self.drift.add(item.scores[labels[1]], item.label == labels[1])
            if line:
                self.log(line)

    def _record(self, film: Film, header) -> dict:
        rec = {"time": now_iso(), "key": film.key, "source": film.meta.get("source", "spool")}
        if film.meta.get("path"):
            rec["path"] = film.meta["path"]
        if header is not None:
            for kw, name in (("SOPInstanceUID", "sop_instance_uid"), ("StudyInstanceUID", "study_instance_uid"),
                             ("SeriesInstanceUID", "series_instance_uid"), ("SOPClassUID", "sop_class_uid")):
                rec[name] = str(header.get(kw, "") or "")
            if self.cfg.log_phi:
                for kw in _PHI:
                    rec[kw] = str(header.get(kw, "") or "")
        rec.update(threshold=self.clf.threshold, threshold_source=self.threshold_source,
                   model=self.loaded.path.name, model_sha256=self.loaded.sha256)
        return rec

    def _header(self, film: Film):
        """The DICOM header (no pixels) of a DICOM film, else None."""
        try:
            with open(film.path, "rb") as f:
                f.seek(128)
                if f.read(4) != b"DICM":
                    return None
            from pydicom import dcmread

            return dcmread(film.path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - unreadable headers are the decoder's to report
            return None

    def _refused(self, film: Film, err) -> None:
        """A film the classify path declined to label: a result line, no report, film removed."""
        rec = self._record(film, self._header(film))
        rec.update(status="refused", rule=str(err.rule), reason=err.reason)
        self.spool.append_result(rec)
        self.spool.done(film)
        self.log(f"{rec['time']} refused {rec.get('sop_instance_uid') or rec.get('path') or film.key}: {err.reason}")

    def _quarantine(self, film: Film, reason: str) -> None:
        header = self._header(film)
        rec = self._record(film, header)
        rec.update(status="quarantined", reason=reason)
        self.spool.write_reason(film, reason)
        self.spool.append_result(rec)
        name = rec.get("sop_instance_uid") or rec.get("path") or film.key
        if self.spool.to_quarantine(film) is None:
            self.log(f"{rec['time']} quarantined {name}: {reason} (the film itself was gone from films/)")
            return
        self.log(f"{rec['time']} quarantined {name}: {reason}")

    def _report(self, header, rec: dict) -> str:
        from xray_edge.serve.report_sr import build_sr, encode

        ds = build_sr(header, rec)
        path = self.spool.outbox / f"{ds.SOPInstanceUID}.dcm"
        durable_write(path, encode(ds))
        if self.cfg.forward and not self._forward_down:  # a down destination: no 10 s wait per film
            self._forward(path)
        return path.name

    def _forward(self, path: Path) -> bool:
        from xray_edge.serve.report_sr import forward

        why = forward(path, self.cfg.forward, self.cfg.our_ae)
        if why is None:
            self._forward_down = False
            sent = self.spool.outbox / "sent"
            sent.mkdir(exist_ok=True)
            os.replace(path, sent / path.name)
            return True
        self._forward_down = True
        self._last_forward_try = time.monotonic()
        ae, host, port = self.cfg.forward
        self.log(f"could not forward {path.name} to {ae}@{host}:{port}: {why} "
                 "(kept in outbox/ with the next ones, retried every 30 s)")
        return False

    def _retry_forwards(self) -> None:
        """SRs a destination did not take, retried every 30 s while idle."""
        if not self.cfg.forward or time.monotonic() - self._last_forward_try < 30:
            return
        self._last_forward_try = time.monotonic()
        for path in sorted(self.spool.outbox.glob("*.dcm")):
            if not self._forward(path):
                break
