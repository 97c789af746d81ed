"""Run every measurement once, print the table and the target checks, write RESULTS.md.

Order matters: the baselines that fork (Pipe, pools) run before any Session exists, so
no fork happens while a session's threads hold locks; the pairs a target compares
(Pipe / warm, warm / ProcessPoolExecutor) run close together in time because the load
on this machine drifts. A measurement that fails is reported as unavailable, and the
run goes on.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import (
    _anchor,
    _baselines,
    _broker_bench,
    _failcore_bench,
    _kernel_bench,
    _mcp_bench,
    _mcp_guard_bench,
    _scan_bench,
)
from benchmarks._report import bounds_section, checks, checks_table, profile_notes, table
from benchmarks._timing import Row, Unavailable

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SPARSE_GAP_S = 0.020


@dataclass(frozen=True)
class Sizes:
    """Repetitions per measurement. ``FULL`` takes ~70 s on 2 idle cores, ``QUICK`` ~10 s."""

    direct_batches: int
    direct_per_batch: int
    pipe: int
    pools: int
    python_start: int
    warm: int
    warm_sparse: int
    fresh: int
    fresh_sparse: int
    warm_tput: int
    fresh_tput: int
    anchor: int
    broker: int = 300
    mcp: int = 0  # 0: not measured (the MCP server needs the mcp extra)
    scan: int = 2000  # scans of the small result (the per-KB rows take n // 50)
    kernel_warm: int = 20
    kernel_fresh: int = 10
    kernel_fresh_sparse: int = 4
    kernel_cold: int = 4
    leftover: int = 100
    starts: int = 2

    @property
    def warmup(self) -> int:
        return max(10, self.warm // 10)


FULL = Sizes(direct_batches=300, direct_per_batch=10_000, pipe=20_000, pools=5000,
             python_start=60, warm=10_000, warm_sparse=300, fresh=2000, fresh_sparse=500,
             warm_tput=20_000, fresh_tput=1000, anchor=5000, broker=3000, mcp=2000,
             kernel_warm=10_000, kernel_fresh=1000, kernel_fresh_sparse=500, kernel_cold=300,
             leftover=10_000, starts=10)
QUICK = Sizes(direct_batches=30, direct_per_batch=2000, pipe=800, pools=400, python_start=10,
              warm=800, warm_sparse=30, fresh=150, fresh_sparse=60, warm_tput=1600,
              fresh_tput=120, anchor=400, broker=300, mcp=200, scan=200, kernel_warm=800,
              kernel_fresh=100, kernel_fresh_sparse=60, kernel_cold=40, leftover=1000, starts=3)


def _machine() -> dict[str, str]:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return {
        "cores": f"{os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable ({model})",
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "kernel": f"{platform.system()} {platform.release()}",
    }


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min)"


class _Collector:
    """Runs measurements in order; a failure becomes an Unavailable row, never a crash."""

    def __init__(self, progress: Callable[[str], None]) -> None:
        self.rows: list[Row | Unavailable] = []
        self._progress = progress

    def run(self, key: str, label: str,
            fn: Callable[[], Row | Unavailable | list[Row] | list[Row | Unavailable]
                         | tuple[Row, Row | None]]) -> None:
        self._progress(f"  {label} ...")
        start = time.monotonic()
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - reported in the table
            out = Unavailable(key, label, f"{type(exc).__name__}: {exc}")
        items = list(out) if isinstance(out, list | tuple) else [out]
        self.rows.extend(r for r in items if r is not None)
        self._progress(f"    done in {time.monotonic() - start:.1f} s")

    @property
    def measured(self) -> dict[str, Row]:
        return {r.key: r for r in self.rows if isinstance(r, Row)}


def measure_all(sizes: Sizes, anchor: str | None, progress: Callable[[str], None]) -> list[Row | Unavailable]:
    """Every figure of the report, in a fixed order. ``anchor``: "auto", a python path, or None."""
    c = _Collector(progress)
    w = sizes.warmup
    c.run("direct", "direct call", lambda: _baselines.measure_direct(sizes.direct_batches, sizes.direct_per_batch))
    c.run("pipe", "bare Pipe", lambda: _baselines.measure_pipe(sizes.pipe, w))
    c.run("warm", "warm, no trace", lambda: _failcore_bench.measure_call("tool", False, sizes.warm, w))
    c.run("warm_traced", "warm, traced", lambda: _failcore_bench.measure_call("tool", True, sizes.warm, w))
    c.run("warm_traced_secret", "warm, traced, secret argument",
          lambda: _failcore_bench.measure_secret_call(sizes.warm, w))
    c.run("ppe", "ProcessPoolExecutor", lambda: _baselines.measure_process_pool_executor(sizes.pools, w))
    c.run("mp_pool", "multiprocessing.Pool", lambda: _baselines.measure_mp_pool(sizes.pools, w))
    c.run("ppe_tput", "ProcessPoolExecutor(2) throughput",
          lambda: _baselines.measure_ppe_throughput(sizes.warm_tput))
    c.run("python_start", "python -c pass", lambda: _baselines.measure_python_start(sizes.python_start))
    c.run("warm_traced_sparse", "warm, traced, sparse", lambda: _failcore_bench.measure_call(
        "tool", True, sizes.warm_sparse, 10, gap_s=SPARSE_GAP_S))
    c.run("fresh", "fresh, no trace", lambda: _failcore_bench.measure_call("call", False, sizes.fresh, 20))
    c.run("fresh_traced", "fresh, traced", lambda: _failcore_bench.measure_call("call", True, sizes.fresh, 20))
    c.run("fresh_traced_sparse", "fresh, traced, sparse", lambda: _failcore_bench.measure_call(
        "call", True, sizes.fresh_sparse, 10, gap_s=SPARSE_GAP_S))
    c.run("kernel_warm", "warm, kernel confinement vs off",
          lambda: _kernel_bench.measure_overhead("tool", sizes.kernel_warm, warmup=w))
    c.run("kernel_fresh", "fresh, kernel confinement vs off",
          lambda: _kernel_bench.measure_overhead("call", sizes.kernel_fresh))
    c.run("kernel_fresh_sparse", "fresh, sparse, kernel confinement vs off",
          lambda: _kernel_bench.measure_overhead("call", sizes.kernel_fresh_sparse,
                                                 gap_s=SPARSE_GAP_S))
    c.run("kernel_cold", "cold worker (fork + lock-down), kernel confinement vs off",
          lambda: _kernel_bench.measure_overhead("call", sizes.kernel_cold, blocks=5, warmup=2,
                                                 prespawn=0))
    c.run("leftover_check", "warm worker leftover check",
          lambda: _kernel_bench.measure_leftover_check(sizes.leftover))
    c.run("start", "Session() start, kernel confinement vs off",
          lambda: _kernel_bench.measure_session_start(sizes.starts))
    tput: tuple[tuple[_failcore_bench.Isolation, int], ...] = (
        ("tool", sizes.warm_tput), ("call", sizes.fresh_tput))
    for isolation, calls in tput:
        kind = "warm" if isolation == "tool" else "fresh"
        for mode in ("threads", "asyncio"):
            c.run(f"{kind}_tput_{mode}", f"{kind} throughput, {mode}",
                  functools.partial(_failcore_bench.measure_throughput, isolation, mode, calls))
    c.run("idle_memory", "idle worker memory", _failcore_bench.measure_idle_memory)
    c.run("connect_brokered", "brokered vs direct loopback connect",
          lambda: _broker_bench.measure_connect(sizes.broker, max(10, sizes.broker // 10)))
    c.run("scan", "secret/PII scan", lambda: _scan_bench.measure_scan(sizes.scan))
    c.run("warm_small_scan", "warm call with a small dict, scan on/off",
          lambda: _scan_bench.measure_call_with_scan(sizes.warm, w))
    if anchor is not None:
        c.run("anchor_traced", f"anchor failcore=={_anchor.ANCHOR_VERSION}",
              lambda: _measure_anchor(anchor, sizes.anchor, max(10, sizes.anchor // 10)))
    if sizes.mcp:
        c.run("mcp_stdio", "MCP over stdio vs direct call",
              lambda: _mcp_bench.measure_mcp(sizes.mcp, max(10, sizes.mcp // 10)))
        # The guard's per-call cost vs the same server called directly (same run).
        c.run("mcp_guard", "MCP guard vs the server directly",
              lambda: _mcp_guard_bench.measure_guard(sizes.mcp, max(10, sizes.mcp // 10)))
    return c.rows


def _measure_anchor(anchor: str, n: int, warmup: int) -> Row | Unavailable:
    python = _anchor.ensure_anchor() if anchor == "auto" else Path(anchor)
    if isinstance(python, Unavailable):
        return python
    return _anchor.measure_anchor(python, n, warmup)


def _order(rows: list[Row | Unavailable]) -> list[Row | Unavailable]:
    """Latency rows first (fastest first), then throughput, memory and trace size."""
    rank = {"µs": 0, "µs/KB": 1, "calls/s": 2, "MB": 3, "B": 4}

    def key(r: Row | Unavailable) -> tuple[int, float]:
        if isinstance(r, Unavailable):
            return (0, float("inf"))
        return (rank.get(r.unit, 4), r.value if r.unit == "µs" else 0.0)

    return sorted(rows, key=key)


def render(rows: list[Row | Unavailable], meta: dict[str, str]) -> tuple[str, str]:
    """(the stdout text, the RESULTS.md text) for one run."""
    measured = {r.key: r for r in rows if isinstance(r, Row)}
    results = checks(measured)
    body = table(_order(rows), measured.get("pipe"))
    anchor = next((r for r in rows if isinstance(r, Unavailable) and r.key == "anchor_traced"), None)
    anchor_line = f"\nanchor: unavailable ({anchor.reason})\n" if anchor else ""
    targets = checks_table(results)
    stdout = f"{body}\n{anchor_line}\n{targets}\n"
    md = "\n".join([
        "# FailCore benchmark results",
        "",
        "Written by `python -m benchmarks` (benchmarks/_runner.py); do not edit by hand. Medians of one",
        "run; compare figures only within this file (the machine is shared and noisy).",
        "",
        f"- date: {meta['date']}",
        f"- machine: {meta['cores']}; {meta['kernel']}",
        f"- python: {meta['python']}",
        f"- command: `{meta['command']}` (from the repository root), {meta['duration']}",
        f"- load average before / after the run: {meta['load_before']} -> {meta['load_after']};"
        " other engineers run tests on this machine concurrently, so expect noise",
        "",
        "## Results",
        "",
        "Latencies are per call (median and p90 of per-call samples; the direct call is timed",
        "in batches). `x Pipe` is the ratio to the bare Pipe round trip measured in this run.",
        f"Sparse rows sleep {SPARSE_GAP_S * 1000:g} ms between calls (CPU wake-up from idle), steady-state rows",
        "call back to back. Throughput rows use the JSONL trace and Session(prespawn=2,",
        "max_workers_per_tool=2).",
        "",
        body,
        anchor_line,
        "## MCP server",
        "",
        _mcp_bench.summary(measured),
        "",
        "## MCP guard (a third-party server, confined)",
        "",
        _mcp_guard_bench.summary(measured),
        "",
        "## Targets",
        "",
        targets,
        "",
        "## What bounds it",
        "",
        "For every MISS, the matching section of benchmarks/PROFILE-NOTES.md: written by hand from",
        "py-spy profiles and step timings (benchmarks/_profile.py) in earlier sessions on this machine,",
        "so its figures are ranges from those sessions, not from the run above.",
        "",
        bounds_section(results, profile_notes()),
        "",
    ])
    return stdout, md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=(
        "Measure FailCore's call latency, throughput and memory against baselines from the "
        "same run, check the issue-7 targets, and write benchmarks/RESULTS.md."))
    parser.add_argument("--quick", action="store_true",
                        help="about 10-30 s with fewer repetitions; does not write RESULTS.md "
                             "unless --results is given")
    parser.add_argument("--results", type=Path, default=None,
                        help=f"where to write the Markdown report (default: {RESULTS} for a full run)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--no-anchor", action="store_true", help="skip failcore==0.1.3")
    group.add_argument("--anchor-python", default=None,
                       help="an interpreter that already has failcore==0.1.3 (default: "
                            "benchmarks/.anchor-venv, created on first use)")
    args = parser.parse_args(argv)
    raw = list(sys.argv[1:] if argv is None else argv)
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    anchor = None if args.no_anchor else (args.anchor_python or "auto")

    def progress(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    load_before = _load()
    start = time.monotonic()
    progress(f"benchmarks ({'quick' if args.quick else 'full'}), load {load_before}")
    rows = measure_all(QUICK if args.quick else FULL, anchor, progress)
    meta = dict(_machine(), date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                command=" ".join([exe, "-m", "benchmarks", *raw]),
                duration=f"{time.monotonic() - start:.0f} s", load_before=load_before,
                load_after=_load())
    stdout, md = render(rows, meta)
    print(stdout)
    target = args.results if args.results is not None else (None if args.quick else RESULTS)
    if target is not None:
        target.write_text(md, encoding="utf-8")
        progress(f"wrote {target}")
    return 0
