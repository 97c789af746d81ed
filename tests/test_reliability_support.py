"""Probes shared by the reliability tests (no tests here): process liveness, marked
grandchildren, trace checks, peak memory.

A process counts as gone once it is a zombie: it has exited and holds no resources, and
in a container whose pid 1 does not reap, orphans stay zombies forever.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from typing import Any

import psutil

from failcore import Session
from failcore._trace import VerifyReport, read_trace, verify_trace

SETTLE_S = 5.0


def alive(pid: int) -> bool:
    """True while ``pid`` exists and has not exited (zombies count as exited)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(pids: Iterable[int], timeout: float = SETTLE_S) -> list[int]:
    """Wait up to ``timeout`` for every pid to exit; return those still alive."""
    pending = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        pending = [pid for pid in pending if alive(pid)]
        if not pending or time.monotonic() > deadline:
            return pending
        time.sleep(0.02)


def sleep_marker() -> str:
    """A unique ``/bin/sleep`` duration: finds the sleeps one test started, and only them."""
    return f"{400 + os.getpid() % 500}.{time.monotonic_ns() % 10**9:09d}"


def marked_sleeps(marker: str) -> list[int]:
    """Live ``sleep`` processes whose command line carries ``marker``."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        try:
            if proc.info["name"] == "sleep" and marker in (proc.info["cmdline"] or ()):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def wait_no_marked_sleeps(marker: str, timeout: float = SETTLE_S) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = marked_sleeps(marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def kill_marked_sleeps(marker: str) -> None:
    """Clean up after a test that found survivors: kill them by pid (ours, by marker)."""
    for pid in marked_sleeps(marker):
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def process_group(pgid: int) -> list[int]:
    """Live processes in process group ``pgid`` (a worker's group is its pid)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return found


def children() -> list[int]:
    try:
        return [p.pid for p in psutil.Process().children(recursive=True) if alive(p.pid)]
    except psutil.Error:
        return []


def settled_children(timeout: float = SETTLE_S, stable_s: float = 0.25) -> list[int]:
    """This process's live descendants once the set has held still for ``stable_s``.

    The pool retires workers and refills its ready ones off the caller's path, so a count
    taken right after a call may catch it mid-way.
    """
    deadline = time.monotonic() + timeout
    last = sorted(children())
    since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = sorted(children())
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= stable_s:
            break
    return last


def assert_trace_intact(path: str | os.PathLike[str], *, ended: bool = True) -> VerifyReport:
    """``failcore verify``'s verdict: no error; every call that started has ended."""
    report = verify_trace(path)
    assert report.ok, report.errors
    if ended:
        assert not report.warnings, report.warnings
        records = read_trace(path)
        started = {r["call_id"] for r in records if r["kind"] == "call.start"}
        ended_ids = {r["call_id"] for r in records if r["kind"] == "call.end"}
        assert started == ended_ids, f"calls with no call.end: {sorted(started - ended_ids)}"
    return report


def worker_pids(path: str | os.PathLike[str]) -> list[int]:
    """Every worker pid the trace records (``worker.spawn``), in order."""
    return [int(r["body"]["pid"]) for r in read_trace(path) if r["kind"] == "worker.spawn"]


def call_end(path: str | os.PathLike[str], call_index: int = -1) -> dict[str, Any]:
    ends = [r for r in read_trace(path) if r["kind"] == "call.end"]
    return dict(ends[call_index]["body"])


def call_within(session: Session, name: str, timeout: float, **kwargs: Any) -> Any:
    """``session.call`` in a thread: a deadlocked call fails the test instead of hanging it."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = session.call(name, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"call {name!r} did not return within {timeout} s (deadlock?)")
    if "error" in box:
        raise box["error"]
    return box["value"]


class PeakRSS:
    """Samples this process's resident memory in a thread; ``peak`` is the highest seen."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self._me = psutil.Process()
        self.base = self._me.memory_info().rss
        self.peak = self.base
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._me.memory_info().rss)
            self._stop.wait(self._interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._me.memory_info().rss)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


class TracedSession:
    """A Session writing a trace under a test's tmp_path, and the checks every test ends with."""

    def __init__(self, path: str | os.PathLike[str], **options: Any) -> None:
        self.path = path
        self.session = Session(trace=path, **options)

    def finish(self) -> VerifyReport:
        """Close; the trace verifies with every call ended; every worker it used is gone."""
        self.session.close()
        report = assert_trace_intact(self.path)
        left = wait_gone(worker_pids(self.path))
        assert not left, f"workers outlived the session: {left}"
        return report


def wait_group_empty(pgid: int, timeout: float = SETTLE_S) -> list[int]:
    """Wait until no live process is left in group ``pgid``; return any that are."""
    deadline = time.monotonic() + timeout
    while True:
        left = process_group(pgid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)
