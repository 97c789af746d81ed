"""Support for the integration tests (MCP, LangChain, OpenAI Agents, Pydantic AI, OTel).

An integration's tests skip locally without its extra but fail in CI: ``.ci/run``
installs every extra, so there a missing library means a broken install and must fail
the run, not quietly skip the tests that would have caught it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent  # agent_tools (the session every integration wraps)


def need(module: str, extra: str) -> ModuleType:
    """Import ``module`` for an integration test module, or skip it (outside CI)."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(
        module, reason=f"the {extra} integration needs its extra: pip install -e '.[{extra}]' "
        "(CI installs every extra and fails instead of skipping)")


def chromium_or_skip() -> str:
    """The path of ``chromium`` for a screenshot test; skipped without it, except in CI.

    CI (CI=true) installs the browser in its own step of ``.ci/run`` and must not skip the
    screenshot tests silently: there a missing browser fails the test."""
    path = shutil.which("chromium")
    if path is not None:
        return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: .ci/run installs it (apt-get install -y chromium); "
                    "CI does not skip the screenshot tests")
    pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); "
                "the screenshot test needs a headless browser")


def screenshot(html: Path, png: Path) -> bytes:
    """``html`` rendered by headless Chromium (scripts/render_report.sh) as PNG bytes;
    skipped without a browser, except in CI. Bounded: a hung browser's whole process group
    is killed after 50 s."""
    chromium_or_skip()
    script = TESTS.parent / "scripts" / "render_report.sh"
    proc = subprocess.Popen([str(script), str(html), str(png)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=50)
    finally:
        if proc.returncode is None:  # timed out: take chromium's whole process group down
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, stderr
    return png.read_bytes()


def records(trace: Path) -> list[dict[str, Any]]:
    """The trace's complete records (a line still being written is left out)."""
    if not trace.exists():
        return []
    out = []
    for line in trace.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def bodies(trace: Path, kind: str) -> list[dict[str, Any]]:
    return [r["body"] for r in records(trace) if r["kind"] == kind]


def calls(trace: Path, tool: str) -> list[str]:
    """Call ids of ``tool``'s calls, in order."""
    return [r["call_id"] for r in records(trace)
            if r["kind"] == "call.start" and r["body"]["tool"] == tool]


async def in_flight(trace: Path, tool: str, nth: int = 0,
                    timeout: float = 20.0) -> tuple[str, int]:
    """Wait (bounded) until the ``nth`` call of ``tool`` was sent to a worker: (call id,
    worker pid)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recs = records(trace)
        for cid in calls(trace, tool)[nth:nth + 1]:
            pids = [r["body"]["pid"] for r in recs
                    if r["call_id"] == cid and r["kind"] == "worker.spawn"]
            sent = any(r["call_id"] == cid and r["kind"] == "ipc.send"
                       and r["body"]["type"] == "call" for r in recs)
            if pids and sent:
                return cid, pids[0]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no call of {tool} reached a worker within {timeout} s")


def ended(trace: Path, call_id: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The call's records once its ``call.end`` is written (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        mine = [r for r in records(trace) if r["call_id"] == call_id]
        if any(r["kind"] == "call.end" for r in mine) or time.monotonic() > deadline:
            return mine
        time.sleep(0.02)
