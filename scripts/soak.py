"""Soak FailCore: many calls through one Session, then how much the parent grew.

    .venv/bin/python scripts/soak.py --calls 10000 [--trace PATH] [--json]

A mix of calls runs through one traced Session: warm and fresh successes (each answer is
checked: it is a function of the input), tools that raise, invalid arguments, unknown
tools, workers that crash (``os._exit``) and calls that time out. The parent's open file
descriptors, OS threads, child processes and resident memory are measured after a
warm-up and again at the end, each time once the pool has settled (retired workers are
killed off the caller's path, so a snapshot taken mid-retirement would count them).
Growth is the difference. The trace is verified at the end.

tests/test_reliability_load.py runs the same soak at CI size and bounds the growth;
RELIABILITY.md records the figures of the full run.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
from typing import Any

import psutil

from failcore import (
    FailCoreError,
    InputValidationError,
    Limits,
    Session,
    ToolFailed,
    ToolMetadata,
    ToolTimeout,
    WorkerCrashed,
)
from failcore._trace import verify_trace

# How long the pool may take to settle (retire killed workers, refill prespawned ones).
SETTLE_S = 5.0
_STABLE_S = 0.25


@dataclasses.dataclass(frozen=True)
class Figures:
    """The parent process's resources at one moment."""

    fds: int
    threads: int
    children: int
    rss_kb: int

    def minus(self, other: Figures) -> Figures:
        return Figures(self.fds - other.fds, self.threads - other.threads,
                       self.children - other.children, self.rss_kb - other.rss_kb)


@dataclasses.dataclass
class SoakReport:
    calls: int
    seconds: float
    outcomes: dict[str, int]
    wrong_answers: int
    start: Figures
    end: Figures
    trace_ok: bool
    trace_records: int
    trace_errors: list[str]

    @property
    def growth(self) -> Figures:
        return self.end.minus(self.start)

    def lines(self) -> list[str]:
        g = self.growth
        return [
            f"calls: {self.calls} in {self.seconds:.1f} s ({self.calls / self.seconds:.0f} calls/s)",
            "outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items())),
            f"wrong answers: {self.wrong_answers}",
            f"after warm-up: fds={self.start.fds} threads={self.start.threads} "
            f"children={self.start.children} rss={self.start.rss_kb / 1024:.1f} MB",
            f"at the end:    fds={self.end.fds} threads={self.end.threads} "
            f"children={self.end.children} rss={self.end.rss_kb / 1024:.1f} MB",
            f"growth:        fds={g.fds:+d} threads={g.threads:+d} children={g.children:+d} "
            f"rss={g.rss_kb / 1024:+.1f} MB",
            f"trace: {self.trace_records} records, verify "
            + ("OK" if self.trace_ok else f"FAILED: {self.trace_errors[:3]}"),
        ]


def _children() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def settle() -> None:
    """Wait until the set of child processes holds still and none is a zombie."""
    deadline = time.monotonic() + SETTLE_S
    last: set[int] = set()
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        kids = _children()
        pids = {p.pid for p in kids}
        zombie = False
        for p in kids:
            try:
                zombie = zombie or p.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                zombie = True
        if pids != last or zombie:
            last, stable_since = pids, time.monotonic()
        elif time.monotonic() - stable_since >= _STABLE_S:
            return
        time.sleep(0.02)


def measure() -> Figures:
    settle()
    gc.collect()
    me = psutil.Process()
    return Figures(fds=me.num_fds(), threads=me.num_threads(), children=len(_children()),
                   rss_kb=me.memory_info().rss // 1024)


# --- the tools: each answer is a function of the input ---------------------------------


def square(x: int) -> int:
    return x * x


def square_plus_one(x: int) -> int:
    return x * x + 1


def refuse(x: int) -> int:
    raise ValueError(f"refused {x}")


def crash(x: int) -> int:
    import os

    os._exit(7)


def hang(x: int) -> int:
    import time

    time.sleep(60)
    return x


def register_tools(session: Session) -> None:
    session.register("square", square, ToolMetadata(isolation="tool"))
    session.register("square_fresh", square_plus_one, ToolMetadata(isolation="call"))
    session.register("refuse", refuse, ToolMetadata(isolation="tool"))
    session.register("crash", crash, ToolMetadata(isolation="tool"))
    session.register("hang", hang, ToolMetadata(isolation="tool", limits=Limits(timeout_s=0.2)))


def one_call(session: Session, i: int) -> tuple[str, bool]:
    """Run call number ``i`` of the mix; return (outcome, answer was right)."""
    slot = i % 100
    try:
        if slot < 70 or (slot == 99 and i % 500 != 99):
            return "ok", session.call("square", x=i) == i * i
        if slot < 85:
            return "ok", session.call("square_fresh", x=i) == i * i + 1
        if slot < 94:
            session.call("refuse", x=i)
            return "no error", False
        if slot < 97:
            session.call("square", x=f"not a number {i}")
            return "no error", False
        if slot == 97:
            session.call(f"no_such_tool_{i}", x=i)
            return "no error", False
        if slot == 98:
            session.call("crash", x=i)
            return "no error", False
        session.call("hang", x=i)
        return "no error", False
    except ToolFailed as exc:
        return "ToolFailed", slot in range(85, 94) and exc.remote_message == f"refused {i}"
    except InputValidationError:
        return "InputValidationError", slot in range(94, 98)
    except WorkerCrashed:
        return "WorkerCrashed", slot == 98
    except ToolTimeout:
        return "ToolTimeout", slot == 99
    except FailCoreError as exc:
        return type(exc).__name__, False


def run_soak(calls: int, trace: str | None = None, warmup: int | None = None) -> SoakReport:
    """Run ``calls`` calls (after ``warmup`` more) through one Session; measure growth."""
    warmup = min(200, max(20, calls // 10)) if warmup is None else warmup
    with tempfile.TemporaryDirectory(prefix="failcore-soak-") as tmp:
        path = trace or os.path.join(tmp, "trace.jsonl")
        outcomes: collections.Counter[str] = collections.Counter()
        wrong = 0
        with Session(trace=path) as session:
            register_tools(session)
            for i in range(warmup):
                one_call(session, i)
            start = measure()
            began = time.monotonic()
            for i in range(warmup, warmup + calls):
                outcome, right = one_call(session, i)
                outcomes[outcome] += 1
                wrong += not right
            seconds = time.monotonic() - began
            end = measure()
        report = verify_trace(path)
    return SoakReport(calls, seconds, dict(outcomes), wrong, start, end, report.ok,
                      report.records, report.errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10_000)
    parser.add_argument("--trace", help="keep the trace at this path (default: a temp file)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    report = run_soak(args.calls, args.trace)
    if args.json:
        data: dict[str, Any] = dataclasses.asdict(report)
        data["growth"] = dataclasses.asdict(report.growth)
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(report.lines()))
    healthy = report.trace_ok and report.wrong_answers == 0
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
