"""Baselines measured in the same run: direct call, bare Pipe, stdlib pools, interpreter start.

All child processes use the ``fork`` start method explicitly (the Linux default up to
3.13) so that the figures do not shift when the default changes; every child started
here is joined before the function returns.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import subprocess
import sys
import time
from multiprocessing.connection import Connection

from benchmarks._timing import Row, batch_ns, latency_row, rate_row, sample_ns

_FORK = multiprocessing.get_context("fork")
# What a small call looks like on the wire: a kind and a dict of arguments.
_MESSAGE = ("call", {"x": 1})


def inc(x: int) -> int:
    """The trivial tool every figure uses."""
    return x + 1


def inc_with_token(x: int, token: str) -> int:
    """``inc`` with a secret argument: the call's records are scrubbed in every encoding."""
    return x + 1


def measure_direct(batches: int, per_batch: int) -> Row:
    """An in-process call of ``inc``: the floor, timed in batches (it is below clock cost)."""
    return latency_row("direct", "direct in-process call inc(1)", batch_ns(lambda: inc(1), batches, per_batch))


def _echo(conn: Connection) -> None:
    while True:
        message = conn.recv()
        if message is None:
            return
        conn.send(message)


def measure_pipe(n: int, warmup: int) -> Row:
    """Round trip of a small pickled message to a forked child echoing it (warm target's baseline)."""
    parent, child = _FORK.Pipe()
    proc = _FORK.Process(target=_echo, args=(child,), daemon=True)
    proc.start()
    child.close()

    def round_trip() -> None:
        parent.send(_MESSAGE)
        parent.recv()

    try:
        samples = sample_ns(round_trip, n, warmup)
    finally:
        parent.send(None)
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        parent.close()
    return latency_row("pipe", "bare multiprocessing.Pipe round trip (pickle, echo child)", samples)


def measure_process_pool_executor(n: int, warmup: int) -> Row:
    """``ProcessPoolExecutor(1).submit(inc, 1).result()`` with a warm worker."""
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=_FORK) as ex:
        samples = sample_ns(lambda: ex.submit(inc, 1).result(), n, warmup)
    return latency_row("ppe", "ProcessPoolExecutor(1).submit().result()", samples)


def measure_mp_pool(n: int, warmup: int) -> Row:
    """``multiprocessing.Pool(1).apply(inc, (1,))`` with a warm worker."""
    pool = _FORK.Pool(1)
    try:
        samples = sample_ns(lambda: pool.apply(inc, (1,)), n, warmup)
    finally:
        pool.close()
        pool.join()
    return latency_row("mp_pool", "multiprocessing.Pool(1).apply()", samples)


def measure_python_start(n: int, warmup: int = 1) -> Row:
    """``sys.executable -c pass`` via ``subprocess.run``: what a cold process per call costs."""
    cmd = [sys.executable, "-c", "pass"]
    samples = sample_ns(lambda: subprocess.run(cmd, check=True), n, warmup)
    return latency_row("python_start", "python -c pass (subprocess.run)", samples,
                       note=sys.executable)


def measure_ppe_throughput(calls: int, workers: int = 2) -> Row:
    """ProcessPoolExecutor(workers) with all ``calls`` submitted at once (context for throughput)."""
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=_FORK) as ex:
        for f in [ex.submit(inc, 1) for _ in range(workers * 4)]:
            f.result()
        start = time.perf_counter_ns()
        futures = [ex.submit(inc, 1) for _ in range(calls)]
        for f in futures:
            f.result()
        elapsed = time.perf_counter_ns() - start
    return rate_row("ppe_tput", f"ProcessPoolExecutor({workers}), {calls} calls in flight",
                    calls, elapsed)
