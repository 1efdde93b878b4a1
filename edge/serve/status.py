"""`xray-edge status`: what a spool has seen, read from its files alone (the service may be down)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from xray_edge.serve.drift import WINDOW, assess
from xray_edge.serve.spool import FILMS, RESULTS, SERVICE, read_results


def spool_status(root: Path) -> dict:
    """Counts, rates per label, the last film's time and the drift state of a spool folder."""
    root = Path(root)
    service = _service(root)
    counts: Counter = Counter()
    labels: Counter = Counter()
    window: list[tuple[float, bool]] = []
    last = None
    unlike = 0  # labelled films the input gate flagged as unlike the training films
    names = service.get("labels") or []
    for rec in read_results(root / RESULTS):
        counts[rec.get("status", "?")] += 1
        last = rec.get("time", last)
        if rec.get("status") == "classified":
            labels[rec.get("label")] += 1
            unlike += bool(rec.get("unlike_training"))
            scores = rec.get("scores") or {}
            if len(names) == 2 and names[1] in scores:
                window.append((float(scores[names[1]]), rec.get("label") == names[1]))
                if len(window) > 2 * WINDOW:
                    window = window[-WINDOW:]
    window = window[-WINDOW:]
    waiting = sum(1 for p in (root / FILMS).glob("*") if p.is_file() and p.suffix != ".json"
                  and not p.name.startswith(".")) if (root / FILMS).is_dir() else 0
    done = sum(counts.values())
    classified = counts.get("classified", 0)
    drift = assess([s for s, _ in window], [p for _, p in window],
                   service.get("validation_scores") or {}, service.get("threshold"),
                   called=names[1] if len(names) == 2 else "labels[1]")
    return {
        "spool": str(root),
        "model": service.get("model"), "model_sha256": service.get("model_sha256"),
        "received": done + waiting, "waiting": waiting, "classified": classified,
        "unlike_training": unlike,
        "quarantined": counts.get("quarantined", 0), "refused": counts.get("refused", 0),
        "rates": {lab: round(n / classified, 4) for lab, n in sorted(labels.items())} if classified else {},
        "last_film": last,
        "called": names[1] if len(names) == 2 else None,
        "drift": drift.to_dict(),
    }


def _service(root: Path) -> dict:
    try:
        d = json.loads((root / SERVICE).read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def format_status(s: dict) -> str:
    d = s["drift"]
    rates = ", ".join(f"{k} {v:.0%}" for k, v in s["rates"].items()) or "-"
    state = ("DRIFT: " if d["drifting"] else "ok: ") + d["reason"]
    if d.get("psi") is not None:
        state = f"{state}\n             last {d['films']} films: PSI {d['psi']:.3f}, share called {s['called']} {d['positive_share']:.0%} (validation {d['expected_share']:.0%})"
    return "\n".join([
        f"spool        {s['spool']}",
        f"model        {s['model'] or '-'} ({(s['model_sha256'] or '-')[:12]})",
        f"received     {s['received']} ({s['waiting']} waiting)",
        f"classified   {s['classified']}"
        + (f" ({s['unlike_training']} unlike the training films)" if s.get("unlike_training") else ""),
        f"quarantined  {s['quarantined']}",
        f"refused      {s['refused']}",
        f"rates        {rates}",
        f"last film    {s['last_film'] or '-'}",
        f"drift        {state}",
    ])
