"""FailCore's own figures: warm and fresh latency, throughput, idle memory, trace size.

Each function opens its own ``Session`` and closes it before returning, so no worker,
zygote or trace outlives a measurement and figures do not disturb each other.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import psutil

from benchmarks._baselines import inc, inc_with_token
from benchmarks._timing import Row, latency_row, rate_row, sample_ns
from failcore import Session, ToolMetadata

_MB = 1024 * 1024
TOOL = "inc"
Isolation = Literal["tool", "call"]


@contextmanager
def _session(isolation: Isolation, traced: bool, prespawn: int = 2,
             max_workers_per_tool: int = 2) -> Iterator[tuple[Session, str | None]]:
    """A session with ``inc`` registered; yields it and its trace path (temp dir, removed after)."""
    with tempfile.TemporaryDirectory(prefix="failcore-bench-") as tmp:
        trace = os.path.join(tmp, "trace.jsonl") if traced else None
        with Session(trace=trace, prespawn=prespawn, max_workers_per_tool=max_workers_per_tool) as s:
            s.register(TOOL, inc, ToolMetadata(isolation=isolation))
            yield s, trace


def _label(isolation: str, traced: bool) -> str:
    kind = "warm (isolation=tool)" if isolation == "tool" else "fresh (isolation=call)"
    return f"FailCore {kind}, {'JSONL trace' if traced else 'no trace'}"


def measure_call(isolation: Isolation, traced: bool, n: int, warmup: int,
                 gap_s: float = 0.0) -> tuple[Row, Row | None]:
    """Latency of ``session.call("inc", x=1)``; with a trace, also the trace bytes per call.

    ``isolation="tool"`` reuses a warm worker; ``"call"`` takes a fresh prespawned worker
    per call (back to back, the pool's refill competes for the CPU: that is the steady
    state). ``gap_s`` sleeps between calls to measure sparse calls.
    """
    with _session(isolation, traced) as (s, trace):
        def call() -> None:
            s.call(TOOL, x=1)

        for _ in range(warmup):
            call()
        size_before = os.path.getsize(trace) if trace else 0
        samples = sample_ns(call, n, 0, gap_s)
        size_after = os.path.getsize(trace) if trace else 0
    mode = "steady state (back to back)" if not gap_s else f"sparse ({gap_s * 1000:g} ms gaps)"
    key = f"{'warm' if isolation == 'tool' else 'fresh'}{'_traced' if traced else ''}"
    key += "_sparse" if gap_s else ""
    row = latency_row(key, f"{_label(isolation, traced)}, {mode}", samples)
    size_row = None
    if trace and not gap_s:
        size_row = Row(key=f"{key}_trace_bytes", label=f"trace bytes per call ({_label(isolation, traced)})",
                       value=(size_after - size_before) / n, unit="B", n=n)
    return row, size_row


def measure_secret_call(n: int, warmup: int) -> Row:
    """Latency of a warm traced call with a secret argument: what scrubbing every encoding
    of a secret from the call's records costs (compare with the warm traced row)."""
    with tempfile.TemporaryDirectory(prefix="failcore-bench-") as tmp:
        with Session(trace=os.path.join(tmp, "trace.jsonl")) as s:
            s.register("inc_secret", inc_with_token, ToolMetadata(isolation="tool",
                                                                  secret=["token"]))

            def call() -> None:
                s.call("inc_secret", x=1, token="p@ss w0rd+=é")

            for _ in range(warmup):
                call()
            samples = sample_ns(call, n, 0, 0.0)
    return latency_row("warm_traced_secret", "FailCore warm (isolation=tool), JSONL trace, "
                       "a secret argument (scrubbed in every encoding)", samples)


def measure_throughput(isolation: Isolation, mode: str, calls: int, threads: int = 8,
                       traced: bool = True) -> Row:
    """Calls/s over ``calls`` calls from concurrent callers: ``mode`` "threads" or "asyncio".

    Threads: ``threads`` threads released together by a barrier, each making an equal share
    of the calls. Asyncio: one ``asyncio.gather`` of ``calls`` ``acall`` coroutines. The
    session has 2 warm workers per tool and 2 prespawned idle workers.
    """
    if mode not in ("threads", "asyncio"):
        raise ValueError(f"mode must be 'threads' or 'asyncio', got {mode!r}")
    with _session(isolation, traced) as (s, _trace):
        if mode == "threads":
            elapsed, done = _threads(s, calls, threads)
            how = f"{threads} threads"
        else:
            elapsed, done = asyncio.run(_gather(s, calls))
            how = f"asyncio.gather of {calls} acalls"
    kind = "warm" if isolation == "tool" else "fresh"
    return rate_row(f"{kind}_tput_{mode}", f"FailCore {kind} throughput, {how}"
                    f"{', JSONL trace' if traced else ''}", done, elapsed)


def _threads(s: Session, calls: int, threads: int) -> tuple[int, int]:
    per_thread = max(1, calls // threads)
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def worker() -> None:
        for _ in range(4):  # warm-up: every warm worker spawned and locked down
            s.call(TOOL, x=1)
        barrier.wait()
        try:
            for _ in range(per_thread):
                s.call(TOOL, x=1)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter_ns()
    for t in pool:
        t.join()
    elapsed = time.perf_counter_ns() - start
    if errors:
        raise errors[0]
    return elapsed, per_thread * threads


async def _gather(s: Session, calls: int) -> tuple[int, int]:
    await asyncio.gather(*(s.acall(TOOL, x=1) for _ in range(min(calls, 64))))  # warm-up
    start = time.perf_counter_ns()
    await asyncio.gather(*(s.acall(TOOL, x=1) for _ in range(calls)))
    return time.perf_counter_ns() - start, calls


def measure_idle_memory(prespawn: int = 2, settle_s: float = 0.3, timeout_s: float = 10.0) -> list[Row]:
    """RSS and USS of prespawned idle workers, and of the zygote they are forked from.

    USS (memory unique to a process) is the real cost of one more worker: forked from
    the zygote, a worker shares most of its pages copy-on-write, which RSS counts again.
    The zygote is found as the session's new direct child; its children are the workers.
    """
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    with Session(trace=None, prespawn=prespawn) as s:
        s.register(TOOL, inc, ToolMetadata(isolation="call"))
        new = [p for p in me.children() if p.pid not in before]
        if len(new) != 1:
            raise RuntimeError(f"expected one new child (the zygote), found {len(new)}")
        zygote = new[0]
        deadline = time.monotonic() + timeout_s
        while len(zygote.children()) < prespawn:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fewer than {prespawn} idle workers after {timeout_s:g} s")
            time.sleep(0.01)
        time.sleep(settle_s)  # each idle worker runs its warm-up before waiting for init
        infos = [w.memory_full_info() for w in zygote.children()]
        z = zygote.memory_full_info()
    rss = statistics.median(i.rss for i in infos) / _MB
    uss = statistics.median(i.uss for i in infos) / _MB
    n = len(infos)
    return [
        Row("idle_rss", f"idle prespawned worker RSS (median of {n})", rss, "MB", n=n),
        Row("idle_uss", f"idle prespawned worker USS (median of {n})", uss, "MB", n=n,
            note="pages unique to the worker: the cost of one more"),
        Row("zygote_rss", "zygote RSS / USS (shared by every worker)", z.rss / _MB, "MB", n=1,
            note=f"USS {z.uss / _MB:.1f} MB"),
    ]
