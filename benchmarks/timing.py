"""Interleaved timing of two callables, so that both see the same machine state."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(a: Callable[[], None], b: Callable[[], None], repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, run alternately (a, b, b, a, ...) after ``warmup`` runs of each."""
    for _ in range(warmup):
        a()
        b()
    ta: list[float] = []
    tb: list[float] = []
    for i in range(repeats):
        order = (a, b) if i % 2 == 0 else (b, a)
        for fn in order:
            t0 = time.perf_counter()
            fn()
            (ta if fn is a else tb).append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)
