"""What kernel confinement costs: calls with it and without, in one run, interleaved.

The load on this machine drifts by more than the effect being measured, so each pair
runs two sessions side by side (``confinement="auto"`` and ``"off"``) and alternates
blocks of calls between them; the ratio of the two medians is the overhead. Also: the
per-call /proc check that retires warm workers carrying leftovers (on the warm path), a
cold worker's lock-down (no prespawned worker: fork, lock-down, call), and session start
with its self-test.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from benchmarks._baselines import inc
from benchmarks._failcore_bench import TOOL, Isolation
from benchmarks._timing import Row, latency_row, sample_ns
from failcore import Session, ToolMetadata
from failcore._workers import leftovers

MODES = ("auto", "off")


@contextmanager
def _pair(isolation: Isolation, prespawn: int = 2) -> Iterator[dict[str, Session]]:
    with ExitStack() as stack:
        sessions = {}
        for mode in MODES:
            s = stack.enter_context(Session(prespawn=prespawn, confinement=mode))
            s.register(TOOL, inc, ToolMetadata(isolation=isolation))
            sessions[mode] = s
        yield sessions


def _interleaved(sessions: dict[str, Session], n: int, blocks: int, warmup: int,
                 gap_s: float) -> dict[str, list[int]]:
    samples: dict[str, list[int]] = {m: [] for m in MODES}
    per_block = max(1, n // blocks)
    for mode in MODES:
        for _ in range(warmup):
            sessions[mode].call(TOOL, x=1)
    for _ in range(blocks):
        for mode in MODES:
            samples[mode] += sample_ns(functools.partial(sessions[mode].call, TOOL, x=1),
                                       per_block, 0, gap_s)
    return samples


def measure_overhead(isolation: Isolation, n: int, blocks: int = 10,
                     warmup: int = 20, prespawn: int = 2, gap_s: float = 0.0) -> list[Row]:
    """Call latency with kernel confinement and without (no trace; back to back, or with
    ``gap_s`` between calls). A fresh call back to back waits for the pool to replace
    workers (each lock-down pays the kernel layers); with gaps the pool keeps up and the
    call meets a worker confined ahead of it: that is the call's own path."""
    kind = "warm" if isolation == "tool" else "fresh"
    if prespawn == 0:
        kind = "cold"
    elif gap_s:
        kind += "_sparse"
    with _pair(isolation, prespawn) as sessions:
        samples = _interleaved(sessions, n, blocks, warmup, gap_s)
    what = {"warm": "warm (isolation=tool)", "fresh": "fresh (isolation=call), back to back",
            "fresh_sparse": f"fresh (isolation=call), {gap_s * 1000:g} ms gaps",
            "cold": "fresh (isolation=call), prespawn=0: fork + lock-down + call"}[kind]
    on, off = (statistics.median(samples[m]) for m in MODES)
    return [
        latency_row(f"kernel_{kind}_on", f"FailCore {what}, kernel confinement (auto)",
                    samples["auto"], note=f"{on / off:.3f}x the same call with confinement=off"),
        latency_row(f"kernel_{kind}_off", f"FailCore {what}, confinement=off", samples["off"]),
    ]


def measure_leftover_check(n: int) -> Row:
    """The parent's /proc check after each warm call (``failcore._workers.leftovers``)."""
    with Session(prespawn=0) as s:
        s.register(TOOL, inc, ToolMetadata(isolation="tool"))
        s.call(TOOL, x=1)
        backend: Any = s._backend
        lease = backend.lease(s._tools[TOOL].spec)
        try:
            samples = sample_ns(lambda: leftovers(lease.handle), n, min(n, 50))
        finally:
            backend.release(lease, True)
    return latency_row("leftover_check", "warm worker leftover check (/proc: 5 stats and a read, parent)",
                       samples, note="on every warm call")


def measure_session_start(n: int) -> list[Row]:
    """``Session()`` until it can take calls, with and without the kernel layers; the
    zygote's own preparation (namespace, loader paths, self-test) as it reports it."""
    starts: dict[str, list[float]] = {m: [] for m in MODES}
    prepare: list[float] = []
    for _ in range(n):
        for mode in MODES:
            t = time.perf_counter_ns()
            s = Session(prespawn=0, confinement=mode)
            starts[mode].append(time.perf_counter_ns() - t)
            pool = getattr(s._backend, "_pool", None)
            if mode == "auto" and pool is not None:
                prepare.append(float(pool.zygote.report.get("prepare_ms", 0.0)) * 1e6)
            s.close()
    on, off = (statistics.median(starts[m]) for m in MODES)
    return [
        latency_row("start_on", "Session() start, kernel confinement (auto)", starts["auto"],
                    note=f"{(on - off) / 1e6:+.1f} ms vs confinement=off"),
        latency_row("start_off", "Session() start, confinement=off", starts["off"]),
        latency_row("start_prepare", "zygote kernel preparation: netns, loader paths, self-test",
                    prepare, note="inside Session() start"),
    ]
