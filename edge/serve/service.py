"""One running service: receivers on threads, the worker on the calling thread, until SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from xray_edge.serve.drift import DriftMonitor
from xray_edge.serve.spool import SERVICE, Spool, durable_write
from xray_edge.serve.worker import ServeConfig, Worker


@dataclass
class Receivers:
    dicom: object | None = None  # receive.ScpConfig
    watch: Path | None = None
    watch_interval: float = 0.5
    watch_settle: float = 2.0


def log_line(line: str) -> None:
    """The service's log: one line per event on stderr (journald keeps it under systemd)."""
    print(line, file=sys.stderr, flush=True)


def validation_scores(loaded) -> dict:
    m = loaded.resolved.manifest
    return m.validation_scores if m is not None else {}


def serve(spool_dir: Path, clf, loaded, threshold_source: str, receivers: Receivers, cfg: ServeConfig,
          max_spool: int | None = None, log=log_line) -> int:
    """Run until SIGTERM/SIGINT (or, with cfg.stop_when_idle, until the spool is empty)."""
    spool = Spool(spool_dir, max_spool)
    dist = validation_scores(loaded)
    durable_write(spool.root / SERVICE, json.dumps({
        "pid": os.getpid(), "model": str(loaded.path), "model_sha256": loaded.sha256,
        "labels": list(clf.info.labels), "threshold": clf.threshold, "threshold_source": threshold_source,
        "validation_scores": dist}, indent=1).encode())
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()
        spool.wake.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    server = watcher = None
    if receivers.dicom is not None:
        from xray_edge.serve.receive import start_scp

        server = start_scp(receivers.dicom, spool, log)
        d = receivers.dicom
        log(f"DICOM Storage SCP {d.ae_title} listening on {d.bind}:{d.port}")
    if receivers.watch is not None:
        from xray_edge.serve.watch import FolderWatch

        watch = FolderWatch(receivers.watch, spool, log, receivers.watch_interval, receivers.watch_settle)
        watcher = threading.Thread(target=watch.run, args=(stop,), name="xray-edge-watch", daemon=True)
        watcher.start()
        log(f"watching {receivers.watch}")
    pending = len(spool.pending())
    log(f"model {loaded.path.name} sha256 {loaded.sha256[:12]}, threshold {clf.threshold} ({threshold_source}); "
        f"spool {spool.root} ({pending} film{'s' if pending != 1 else ''} waiting)"
        + ("" if dist else "; no validation scores in the manifest: no drift check"))
    drift = DriftMonitor(dist, clf.threshold, called=clf.info.labels[-1]) if dist else None
    try:
        Worker(spool, clf, loaded, threshold_source, cfg, log, drift).run(stop)
    finally:
        stop.set()
        if server is not None:
            server.shutdown()
        if watcher is not None:
            watcher.join(timeout=5)
    log("stopped")
    return 0
