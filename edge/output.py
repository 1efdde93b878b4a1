"""What `classify` prints: results on stdout, one line per input; errors and progress on stderr.

Paths are written as the file system's own bytes (os.fsencode), so a name that is not UTF-8
comes out as it is and can be opened again; in JSON such bytes are escaped (\\udcXX), which
`json.loads` and `os.fsencode` turn back into the same name. A reader that goes away (`| head`)
ends the output quietly.
"""

from __future__ import annotations

import json
import os
import sys


class Printer:
    """Writes one record per input; use as a context manager so a closed pipe ends it quietly."""

    def __init__(self, as_json: bool, progress: bool = False, stdout=None, stderr=None):
        self.as_json = as_json
        self.progress = progress
        self.failed = 0
        self._out = stdout or sys.stdout.buffer
        self._err = stderr or sys.stderr.buffer
        self._done = 0
        self._total = 0

    def start(self, total: int) -> None:
        self._total = total
        self._bar()

    def result(self, pred, extra: dict) -> None:
        if self.as_json:
            line = json.dumps({
                "path": pred.path, "label": pred.label, "probability": round(pred.probability, 6),
                "scores": {k: round(v, 6) for k, v in pred.scores.items()},
                "unlike_training": list(getattr(pred, "unlike_training", ())), **extra,
                "ms": {"decode": round(pred.decode_ms, 2), "infer": round(pred.infer_ms, 2)},
            }, allow_nan=False)
        else:
            line = f"{pred.path}\t{pred.label}\t{pred.probability:.3f}"
        self._emit(self._out, line)
        self._tick()

    def refused(self, path, reason: str, rule: str) -> None:
        """The input gate's decision (no label): counted as a failed input, but not an error."""
        self.failed += 1
        path = os.fspath(path)
        self._emit(self._err, f"refused: {path}: {reason}")
        if self.as_json:
            self._emit(self._out, json.dumps({"path": path, "status": "refused", "refused": reason,
                                              "rule": rule}))
        self._tick()

    def record(self, line: str, obj: dict) -> None:
        """Any other command's result: `line` as text, or `obj` as one strict JSON line."""
        self._emit(self._out, json.dumps(obj, allow_nan=False) if self.as_json else line)
        self._tick()

    def error(self, path, reason: str) -> None:
        self.failed += 1
        path = os.fspath(path)
        self._emit(self._err, f"error: {path}: {reason}")
        if self.as_json:  # a pipeline sees every input in one stream
            self._emit(self._out, json.dumps({"path": path, "error": reason}))
        self._tick()

    def _emit(self, stream, line: str) -> None:
        if self.progress:
            self._clear()
        stream.write(os.fsencode(line) + b"\n")
        stream.flush()

    def _tick(self) -> None:
        self._done += 1
        if self.progress:
            self._bar()

    def _bar(self) -> None:
        n, total = self._done, max(self._total, 1)
        width = 30
        filled = width * n // total
        self._err.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {n}/{self._total}".encode())
        self._err.flush()

    def _clear(self) -> None:
        self._err.write(b"\r\033[K")
        self._err.flush()

    def __enter__(self) -> "Printer":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if kind is not None and issubclass(kind, BrokenPipeError):
            # The reader has gone (`| head`): send what is left to /dev/null, stop quietly.
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._out.fileno())
            except (OSError, ValueError, AttributeError):
                pass
            finally:
                os.close(devnull)
            return True
        if self.progress:
            self._clear()
        return False
