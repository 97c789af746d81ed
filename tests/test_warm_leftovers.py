"""Warm workers carry nothing across calls (issue 16 item 5).

After a call in an ``isolation="tool"`` worker the parent reads /proc (not the worker's
word): a thread, a child process or a descriptor the call left behind retires the worker,
its tree is killed, and the trace's ``worker.kill`` record says what was left. A call that
leaves nothing keeps its worker.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from failcore import Session, SideEffect, ToolMetadata
from failcore._trace import read_trace

WARM = ToolMetadata(isolation="tool")
_KEPT: list[Any] = []  # in the worker: what a tool keeps alive between calls


def pid() -> int:
    return os.getpid()


def leave_thread() -> int:
    threading.Thread(target=threading.Event().wait, args=(30,), daemon=True).start()
    return os.getpid()


def leave_file() -> int:
    _KEPT.append(open("kept.txt", "w"))  # noqa: SIM115 - kept open on purpose
    return os.getpid()


def leave_socket() -> int:
    import socket

    _KEPT.append(socket.socket(socket.AF_UNIX))
    return os.getpid()


def socket_over_stdout() -> int:
    """Keeps the descriptor count: only what descriptor 1 now is gives it away."""
    import socket

    s = socket.socket(socket.AF_UNIX)
    os.dup2(s.fileno(), 1)
    s.close()
    return os.getpid()


def leave_child() -> int:
    import subprocess

    subprocess.Popen(["/bin/sleep", "30"])
    return os.getpid()


def swap_next_scratch(plant: bool, secret: list[str]) -> tuple[int, str]:
    """The issue's warm-worker attack. With ``plant``, start a thread that turns the next
    call's scratch directory into a link to a directory no grant names, and return; the
    next call (same tool: the same warm worker, were it reused) reads ``key.txt`` from its
    scratch directory."""
    import glob
    import time

    if not plant:
        try:
            with open("key.txt") as f:
                return os.getpid(), f.read()
        except OSError as exc:
            return os.getpid(), type(exc).__name__
    target = "/" + "/".join(secret)
    base, here = os.path.dirname(os.getcwd()), os.getcwd()

    def swap() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for nxt in glob.glob(os.path.join(base, "call-*")):
                if nxt != here and not nxt.endswith(".old") and not os.path.islink(nxt):
                    try:
                        os.rename(nxt, nxt + ".old")
                        os.symlink(target, nxt)
                    except OSError:
                        pass
            time.sleep(0.001)

    threading.Thread(target=swap, daemon=True).start()
    time.sleep(0.05)  # let it swap the directory already made for the next call
    return os.getpid(), "planted"


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    return tmp_path / "trace.jsonl"


@pytest.fixture
def session(trace: Path) -> Iterator[Session]:
    with Session(trace=trace, max_workers_per_tool=1) as s:
        yield s


def kills(trace: Path) -> list[dict[str, Any]]:
    return [r["body"] for r in read_trace(trace) if r["kind"] == "worker.kill"]


def test_a_clean_call_keeps_its_worker(session: Session, trace: Path) -> None:
    session.register("pid", pid, WARM)
    assert len({session.call("pid") for _ in range(4)}) == 1
    assert kills(trace) == []


@pytest.mark.parametrize(("fn", "what", "meta"), [
    (leave_thread, "1 thread(s) still running", WARM),
    (leave_file, "kept.txt", WARM),
    (leave_socket, "socket:[", WARM),
    (socket_over_stdout, "descriptor 1 (socket:[", WARM),
    (leave_child, "child process", ToolMetadata(isolation="tool", side_effect=SideEffect.PROCESS,
                                                capabilities=["proc:exec:/bin/sleep"])),
], ids=["thread", "file", "socket", "dup2-over-stdout", "child"])
def test_a_leftover_retires_the_worker(session: Session, trace: Path, fn: Any, what: str,
                                       meta: ToolMetadata) -> None:
    session.register("leak", fn, meta)
    first = session.call("leak")
    second = session.call("leak")
    assert first != second, "the second call ran in a new worker"
    reasons = [k["reason"] for k in kills(trace)]
    assert reasons and reasons[0].startswith("carried over: ") and what in reasons[0], reasons


def test_a_planted_thread_never_sees_the_next_call(session: Session, tmp_path: Path,
                                                   trace: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.txt").write_text("TOP-SECRET")
    where = [p for p in str(secret).split("/") if p]
    session.register("attack", swap_next_scratch, ToolMetadata(isolation="tool"))
    planter, said = session.call("attack", plant=True, secret=where)
    assert said == "planted"
    worker, content = session.call("attack", plant=False, secret=where)
    assert worker != planter and content == "FileNotFoundError"
    assert any("thread" in k["reason"] for k in kills(trace))
