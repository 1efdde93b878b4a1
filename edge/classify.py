"""Batch-of-one classification: decode on worker threads, invoke on this one, in input order."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from xray_edge.errors import ImageError, first_line
from xray_edge.gate import DEFAULT_RULES, GateRules, load_checked
from xray_edge.metadata import ModelInfo


@dataclass(frozen=True)
class Prediction:
    path: str
    label: str
    scores: dict[str, float]  # probability of each class
    decode_ms: float
    infer_ms: float
    unlike_training: tuple[str, ...] = ()  # gate statistics outside the training films' range

    @property
    def probability(self) -> float:
        return self.scores[self.label]


def predicted_classes(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """The runner's decision rule on [N, K] outputs, as class indices.

    Sigmoid (K = 1): class 1 when P(class 1) >= threshold (0.5 when None), else class 0.
    Softmax: the most probable class. Training, export and the report count with this too.
    """
    probs = np.asarray(probs)
    if probs.shape[-1] == 1:
        return (probs[:, 0] >= (0.5 if threshold is None else threshold)).astype(np.int64)
    return probs.argmax(axis=-1)


def decide(probs: np.ndarray, info: ModelInfo, threshold: float | None) -> tuple[str, dict[str, float]]:
    """One model output -> (label, scores), by `predicted_classes`'s rule."""
    labels = info.labels
    label = labels[int(predicted_classes(np.asarray(probs)[None], threshold)[0])]
    if info.binary and probs.shape[-1] == 1:
        p = float(probs[0])
        return label, {labels[0]: 1.0 - p, labels[1]: p}
    return label, {lab: float(v) for lab, v in zip(labels, probs)}


def resolve_threshold(info: ModelInfo, override: float | None = None) -> float | None:
    """The operating point in use: the one asked for, else the model's. The one place it is decided."""
    return info.threshold if override is None else override


_END = object()


def _feed(paths: Iterable, size: int):
    """Pull `paths` on a thread into a bounded queue, so waiting for the next input (a slow
    stdin) never holds back an answer that is ready; `stop` ends it when the reader stops."""
    inbox: queue.Queue = queue.Queue(maxsize=max(1, size))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                inbox.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in paths:
                if not put(item):
                    return
        except Exception as exc:  # noqa: BLE001 - listing inputs failed: say so in the output
            put(ImageError("-", f"cannot list inputs: {first_line(exc)}"))
        finally:
            put(_END)

    threading.Thread(target=run, name="xray-edge-inputs", daemon=True).start()
    return inbox, stop


class Classifier:
    """A loaded backend plus the meaning of its outputs."""

    def __init__(self, backend, info: ModelInfo, threshold: float | None = None,
                 rules: GateRules = DEFAULT_RULES):
        self.backend = backend
        self.info = info
        self.threshold = resolve_threshold(info, threshold)
        self.rules = rules  # the input gate: only chest radiographs get a label

    def classify_array(self, image: np.ndarray) -> tuple[str, dict[str, float]]:
        """(label, scores); ValueError when the model's output is not finite (no decision then)."""
        probs = self.backend.predict(image)
        if not np.all(np.isfinite(probs)):
            raise ValueError("the model gave a non-finite output for this image")
        return decide(probs, self.info, self.threshold)

    def classify_paths(self, paths: Iterable[Path | ImageError], workers: int = 2,
                       lookahead: int = 8) -> Iterator[Prediction | ImageError]:
        """Yield one Prediction or ImageError per input, in order.

        An input the gate refuses yields `NotChestRadiograph` (an ImageError: no label).

        Decoding runs on `workers` threads (Pillow releases the GIL while decoding and
        resizing), `lookahead` images ahead of inference, so on a multi-core device throughput
        is set by the slower of decode and invoke rather than their sum.
        """
        spec = self.info.preprocessing

        def decode(p: Path):
            t0 = time.perf_counter()
            try:
                image, decision = load_checked(p, spec, self.rules)
            except ImageError:
                raise
            except Exception as exc:  # noqa: BLE001 - last guard: one file never ends the batch
                raise ImageError(p, f"cannot decode: {type(exc).__name__}: {first_line(exc)}") from None
            return image, decision.unlike_training, (time.perf_counter() - t0) * 1e3

        pending: deque[tuple[Path | ImageError, Future | None]] = deque()
        inbox, stop = _feed(paths, lookahead)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            try:
                yield from self._drain(inbox, pending, pool, decode, lookahead)
            finally:
                stop.set()

    def _drain(self, inbox, pending, pool, decode, lookahead):
        """Keep up to `lookahead` decodes in flight; answer the oldest input first."""
        exhausted = False
        while True:
            while not exhausted and len(pending) < lookahead:
                try:
                    # wait for the next input only when nothing is in flight, so a slow
                    # stream of paths (stdin) is answered path by path
                    item = inbox.get(block=not pending)
                except queue.Empty:
                    break
                if item is _END:
                    exhausted = True
                    break
                fut = None if isinstance(item, ImageError) else pool.submit(decode, item)
                pending.append((item, fut))
            if not pending:
                return
            item, fut = pending.popleft()
            if fut is None:
                yield item
                continue
            try:
                image, unlike, decode_ms = fut.result()
            except ImageError as err:
                yield err
                continue
            t0 = time.perf_counter()
            try:
                label, scores = self.classify_array(image)
            except Exception as exc:  # noqa: BLE001 - the model was checked at load: this image's fault
                yield ImageError(item, f"inference failed: {first_line(exc)}")
                continue
            yield Prediction(str(item), label, scores, decode_ms,
                             (time.perf_counter() - t0) * 1e3, unlike)
