"""Does an exported file compute what the Keras model computes? Figures and gates.

Separate from conversion: a converter returns bytes; this module loads those bytes back in the
edge runtime, runs the parity images batch-of-one, and compares with Keras. Every failed gate is
collected and reported; nothing is downgraded to a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xray_edge.backends import open_backend
from xray_edge.classify import decide
from xray_edge.errors import first_line
from xray_edge.metadata import ModelInfo

# Named tolerances (overridable from the command line); measured margins: docs/export.md.
FLOAT_MAX_ABS_DIFF = 1e-4  # float32 files differ from Keras by float rounding only
FLOAT16_MAX_ABS_DIFF = 2e-3  # float16 weights round each weight to 11 significant bits
INT8_MAX_ABS_DIFF = 0.05
INT8_MAX_FLIP_RATE = 0.01  # share of parity images whose decision changes at the threshold


GATE_KINDS = ("float", "float16", "int8")  # which gates apply to a format


@dataclass(frozen=True)
class Gates:
    float_max_abs_diff: float = FLOAT_MAX_ABS_DIFF
    float16_max_abs_diff: float = FLOAT16_MAX_ABS_DIFF
    int8_max_abs_diff: float = INT8_MAX_ABS_DIFF
    int8_max_flip_rate: float = INT8_MAX_FLIP_RATE


@dataclass
class ParityResult:
    format: str
    runtime: str
    n: int
    max_abs_diff: float
    mean_abs_diff: float
    flips: int
    checks: list[dict] = field(default_factory=list)  # {"gate", "limit", "value", "ok"}
    error: str | None = None  # the runtime could not load or run the file: its message

    @classmethod
    def failed_to_run(cls, fmt: str, runtime: str, message: str) -> "ParityResult":
        return cls(fmt, runtime, 0, float("inf"), float("inf"), 0,
                   [{"gate": f"loads and runs in {runtime}", "limit": 0.0, "value": 1.0, "ok": False}],
                   error=message)

    @property
    def passed(self) -> bool:
        return self.n > 0 and all(c["ok"] for c in self.checks)

    @property
    def failed_gates(self) -> list[str]:
        return [c["gate"] for c in self.checks if not c["ok"]] + ([] if self.n or self.error else ["no parity images"])

    def to_dict(self) -> dict:
        d = {"runtime": self.runtime, "images": self.n, "max_abs_diff": _finite(self.max_abs_diff),
             "mean_abs_diff": _finite(self.mean_abs_diff), "decision_flips": self.flips,
             "flip_rate": self.flips / self.n if self.n else None,
             "gates": self.checks, "passed": self.passed}
        if self.error:
            d["error"] = self.error
        return d

    def line(self) -> str:
        mark = "✓" if self.passed else "✗"
        if self.error:
            return f"{mark} {self.format:<8} {self.runtime:<12} does not load or run: {self.error}"
        gates = ", ".join(f"{c['gate']} {c['value']:.3g} {'<=' if c['ok'] else '>'} {c['limit']:.3g}"
                          for c in self.checks)
        return (f"{mark} {self.format:<8} {self.runtime:<12} n={self.n:<4} max|Δp|={self.max_abs_diff:.2e} "
                f"flips={self.flips}  [{gates}]")


def prove(fmt: str, runtime: str, path: Path, reference: np.ndarray, images: np.ndarray,
          info: ModelInfo, gate_kind: str, gates: Gates, threads: int | None = None
          ) -> tuple[ParityResult, object | None]:
    """Load `path` in the edge runtime, run the parity images, compare with Keras' `reference`.

    `threads`: the runtime's threads (None: its default, all cores).

    A file the runtime refuses at load or at run time is a failed result carrying the runtime's
    message, never an exception: it is one more way for a file to be refused.

    Returns:
        The result, and the loaded backend (None when it did not load or run).
    """
    try:
        backend = open_backend(path, runtime, threads=threads)
        candidate = predict_each(backend, images)
    except Exception as exc:  # noqa: BLE001 - any runtime error means the file is refused
        return ParityResult.failed_to_run(fmt, runtime, first_line(exc)), None
    return compare(fmt, runtime, reference, candidate, info, gate_kind, gates), backend


def predict_each(backend, images: np.ndarray) -> np.ndarray:
    """Batch-of-one predictions through an edge backend, stacked to [N, K]."""
    return np.stack([backend.predict(img) for img in images]) if len(images) else np.zeros((0, 1))


def compare(fmt: str, runtime: str, reference: np.ndarray, candidate: np.ndarray,
            info: ModelInfo, gate_kind: str, gates: Gates = Gates()) -> ParityResult:
    """Compare [N, K] probabilities with Keras's; apply the gates of `gate_kind`.

    gate_kind: "float" (max |Δp| only), "float16" or "int8" (max |Δp| and decision flip rate).
    """
    if reference.shape != candidate.shape:
        return ParityResult(fmt, runtime, len(reference), float("inf"), float("inf"), len(reference),
                            [{"gate": f"output shape {candidate.shape} == {reference.shape}",
                              "limit": 0.0, "value": 1.0, "ok": False}])
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    max_d = float(diff.max()) if diff.size else 0.0
    mean_d = float(diff.mean()) if diff.size else 0.0
    flips = sum(decide(r, info, info.threshold)[0] != decide(c, info, info.threshold)[0]
                for r, c in zip(reference, candidate))
    n = len(reference)
    if gate_kind == "float":
        checks = [_check("max|Δp|", gates.float_max_abs_diff, max_d)]
    else:
        atol = gates.int8_max_abs_diff if gate_kind == "int8" else gates.float16_max_abs_diff
        checks = [_check("max|Δp|", atol, max_d),
                  _check("flip rate", gates.int8_max_flip_rate, flips / n if n else 0.0)]
    if not np.all(np.isfinite(candidate)):
        checks.append({"gate": "finite outputs", "limit": 0.0, "value": 1.0, "ok": False})
    return ParityResult(fmt, runtime, n, max_d, mean_d, int(flips), checks)


def _finite(x: float) -> float | None:
    return x if np.isfinite(x) else None  # JSON has no infinity


def _check(gate: str, limit: float, value: float) -> dict:
    return {"gate": gate, "limit": limit, "value": value, "ok": bool(value <= limit)}
