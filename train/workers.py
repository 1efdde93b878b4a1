"""The process pool that decodes and draws images.

Workers are spawned, not forked: the parent has often imported TensorFlow or JAX already, and
both are multithreaded (JAX warns that a fork may deadlock). A spawned worker imports only
numpy, Pillow and the preprocessing module. Workers ignore Ctrl-C so that the parent alone
stops the work and records what was finished.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor


def process_pool(workers: int | None = None) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1,
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=_ignore_sigint)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
