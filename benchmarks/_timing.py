"""Timing primitives: per-call samples with ``perf_counter_ns``, medians, result rows.

Why per-call samples rather than one loop divided by n: the targets are medians, and the
machine's outliers (another engineer's test run, a CPU waking up) would otherwise be
averaged into every figure. The direct call is the exception: at ~30 ns it is below the
clock's own cost, so it is timed in batches.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

_clock = time.perf_counter_ns


@dataclass(frozen=True)
class Row:
    """One measured figure. ``value`` is the median (or the rate) in ``unit``."""

    key: str
    label: str
    value: float
    unit: str
    p90: float | None = None
    n: int = 0
    note: str = ""


@dataclass(frozen=True)
class Unavailable:
    """A measurement that could not be made, and why (reported, never raised)."""

    key: str
    label: str
    reason: str


def sample_ns(fn: Callable[[], object], n: int, warmup: int, gap_s: float = 0.0) -> list[int]:
    """Nanoseconds of each of ``n`` calls of ``fn`` after ``warmup`` untimed calls.

    ``gap_s`` sleeps between calls (outside the timed region) to measure sparse calls,
    which pay the CPU's wake-up from idle.
    """
    for _ in range(warmup):
        fn()
    samples = []
    sleep = time.sleep
    for _ in range(n):
        if gap_s:
            sleep(gap_s)
        start = _clock()
        fn()
        samples.append(_clock() - start)
    return samples


def batch_ns(fn: Callable[[], object], batches: int, per_batch: int) -> list[float]:
    """Per-call nanoseconds of ``batches`` batches of ``per_batch`` back-to-back calls."""
    for _ in range(per_batch):
        fn()
    out = []
    for _ in range(batches):
        start = _clock()
        for _ in range(per_batch):
            fn()
        out.append((_clock() - start) / per_batch)
    return out


def percentile(samples: list[int] | list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; the median for q=0.5 on odd sizes."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return float(ordered[index])


def latency_row(key: str, label: str, samples_ns: list[int] | list[float], note: str = "") -> Row:
    """A row in microseconds from nanosecond samples: median and p90."""
    return Row(key=key, label=label, value=statistics.median(samples_ns) / 1000.0, unit="µs",
               p90=percentile(samples_ns, 0.9) / 1000.0, n=len(samples_ns), note=note)


def rate_row(key: str, label: str, calls: int, elapsed_ns: int, note: str = "") -> Row:
    """A throughput row: ``calls`` completed in ``elapsed_ns`` wall time."""
    return Row(key=key, label=label, value=calls / (max(elapsed_ns, 1) / 1e9), unit="calls/s",
               n=calls, note=note)
