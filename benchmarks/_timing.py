"""Timing helper shared by the benchmark scripts (run as `python benchmarks/bench_*.py`)."""

from __future__ import annotations

import time
from typing import Callable


def mean_time(fn: Callable[[], object], repeat: int) -> float:
    """Mean wall time of `fn()` in seconds over `repeat` calls, after one untimed warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat
