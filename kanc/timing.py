"""Wall-clock timing on the host: the one timer for code that has no device events (the CPU, Triton's interpreter,
a device measured with an explicit synchronize)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any


def wall_times_ms(
    fn: Callable[[], Any], reps: int = 3, warmup: int = 1, sync: Callable[[], Any] | None = None
) -> list[float]:
    """Wall-clock times of ``reps`` calls of ``fn()`` in ms, after ``warmup`` untimed calls.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs after the warm-up and inside each timed call, so that work a
    device queued is counted where it was asked for.
    """
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(fn: Callable[[], Any], reps: int = 3, warmup: int = 1, sync: Callable[[], Any] | None = None) -> float:
    """Median of :func:`wall_times_ms`."""
    return statistics.median(wall_times_ms(fn, reps, warmup, sync))


def interleaved_times_ms(cases: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall-clock ms of ``reps`` calls of each case, the cases interleaved call by call (a change of the machine's
    load hits them alike), after ``warmup`` untimed calls of each."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def percentiles(times: list[float]) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) of ``times``; a single time is all three."""
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]
