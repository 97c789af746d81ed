"""Reliability when the parent itself dies: SIGKILL gives it no chance to clean up, so
the zygote (its control channel closes) and the workers (PR_SET_PDEATHSIG) must go on
their own, within a bound, and the trace left behind must be a valid prefix that
``verify`` accepts (at worst a truncated final line, reported as a warning).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from test_reliability_support import (
    alive,
    kill_marked_sleeps,
    marked_sleeps,
    sleep_marker,
    wait_gone,
)

from failcore._trace import read_trace, verify_trace

CLEANUP_BOUND_S = 5.0

PARENT = textwrap.dedent("""
    import sys, threading, time
    from failcore import Limits, Session, SideEffect, ToolMetadata

    trace, marker, new_session = sys.argv[1], sys.argv[2], sys.argv[3] == "setsid"

    def hang(marker: str, new_session: bool) -> None:
        import subprocess, time
        subprocess.Popen(["/bin/sleep", marker], start_new_session=new_session)
        time.sleep(60)

    session = Session(trace=trace)
    for name, isolation in (("hang_warm", "tool"), ("hang_fresh", "call")):
        session.register(name, hang, ToolMetadata(
            side_effect=SideEffect.PROCESS, capabilities=["proc:exec:/bin/sleep"],
            isolation=isolation, limits=Limits(timeout_s=60)))
    session.register("square", lambda x: x * x)
    assert session.call("square", x=3) == 9
    for name in ("hang_warm", "hang_fresh"):
        threading.Thread(target=session.call, args=(name,),
                         kwargs={"marker": marker, "new_session": new_session},
                         daemon=True).start()
    print("ready", flush=True)
    time.sleep(60)
""")

BUSY = textwrap.dedent("""
    import sys, threading, time
    from failcore import Session, ToolMetadata

    session = Session(trace=sys.argv[1])
    session.register("warm", lambda x: "w" * (x % 500), ToolMetadata(isolation="tool"))
    session.register("fresh", lambda x: x, ToolMetadata(isolation="call"))

    def client(t: int) -> None:
        i = 0
        while True:
            session.call("fresh" if i % 5 == 0 else "warm", x=i)
            i += 1

    for t in range(4):
        threading.Thread(target=client, args=(t,), daemon=True).start()
    print("ready", flush=True)
    time.sleep(60)
""")


@pytest.fixture
def marker() -> Iterator[str]:
    mark = sleep_marker()
    yield mark
    kill_marked_sleeps(mark)


def _start(tmp_path: Path, source: str, *args: str) -> subprocess.Popen[str]:
    script = tmp_path / "parent.py"
    script.write_text(source)
    proc = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", f"the parent script did not start: {line!r}"
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stdout is not None:
        proc.stdout.close()


def _kill_parent_and_time_cleanup(tmp_path: Path, marker: str,
                                  new_session: bool) -> tuple[float, list[int]]:
    """Start a traced session with two calls in flight, SIGKILL it, and return how long its
    zygote, workers and the tools' grandchildren took to go, and any that did not."""
    trace = tmp_path / "trace.jsonl"
    proc = _start(tmp_path, PARENT, str(trace), marker, "setsid" if new_session else "group")
    try:
        deadline = time.monotonic() + 10
        while len(marked_sleeps(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(marked_sleeps(marker)) == 2, "both calls should be running their tools"
        tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        tree.extend(marked_sleeps(marker))
        assert len(set(tree)) >= 6  # zygote, 2 prespawned, 2 busy workers, 2 grandchildren
        killed_at = time.monotonic()
        proc.kill()
        proc.wait(10)
        left = wait_gone(set(tree), timeout=CLEANUP_BOUND_S)
        took = time.monotonic() - killed_at
    finally:
        _stop(proc)
    return took, left


def _check_prefix(trace: Path) -> None:
    report = verify_trace(trace)
    assert report.ok, report.errors
    assert any("no session.end" in w for w in report.warnings)
    records = read_trace(trace)
    started = {r["call_id"]: r["body"]["tool"] for r in records if r["kind"] == "call.start"}
    ended = {r["call_id"] for r in records if r["kind"] == "call.end"}
    in_flight = sorted(tool for call, tool in started.items() if call not in ended)
    assert in_flight == ["hang_fresh", "hang_warm"]


def test_parent_sigkill_mid_call_leaves_no_process_and_a_valid_trace(
    tmp_path: Path, marker: str
) -> None:
    took, left = _kill_parent_and_time_cleanup(tmp_path, marker, new_session=False)
    print(f"\ncleanup after parent SIGKILL: {took:.3f} s")  # RELIABILITY.md quotes it
    assert not left, f"outlived the parent: {[(p, alive(p)) for p in left]}"
    assert took <= CLEANUP_BOUND_S
    _check_prefix(tmp_path / "trace.jsonl")


def test_parent_sigkill_mid_call_setsid_grandchild(tmp_path: Path, marker: str) -> None:
    """F5 (fixed in 9149c0b): the zygote's shutdown now kills its whole tree."""
    took, left = _kill_parent_and_time_cleanup(tmp_path, marker, new_session=True)
    assert not left, f"outlived the parent: {left}"
    assert took <= CLEANUP_BOUND_S


@pytest.mark.parametrize("delay_s", [0.3, 0.9])
def test_parent_sigkill_while_tracing_busily_leaves_a_valid_prefix(
    tmp_path: Path, delay_s: float
) -> None:
    """Four threads writing records as fast as calls complete, killed at an arbitrary
    moment: the chain verifies up to the last complete line."""
    trace = tmp_path / "trace.jsonl"
    proc = _start(tmp_path, BUSY, str(trace))
    try:
        time.sleep(delay_s)
        tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        proc.kill()
        proc.wait(10)
    finally:
        _stop(proc)
    report = verify_trace(trace)
    assert report.ok, report.errors
    assert report.records > 10
    assert all("truncated final line" in w or "no session.end" in w for w in report.warnings)
    assert not wait_gone(tree, timeout=CLEANUP_BOUND_S)
