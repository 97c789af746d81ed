"""Issue 12: the parent trusts no byte from a worker. A tool can find its own channel and
write to it; a reply for another call, bytes between calls and a second reply are caught
and the worker retired. Refusals are never lost to the event cap. Who reported what is in
the trace."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from failcore import Session, SideEffect, ToolMetadata, WorkerCrashed
from failcore._trace import read_trace
from failcore_worker import protocol


def _channel() -> int:
    """The worker's channel, found the way a hostile tool would: its one socket."""
    import stat

    for fd in range(3, 256):
        try:
            if stat.S_ISSOCK(os.fstat(fd).st_mode):
                return fd
        except OSError:
            continue
    raise RuntimeError("no channel")


def _frame(call_id: str, value: Any) -> bytes:
    return protocol.encode_data("result", {"value": value, "events": [], "retire": False,
                                           "call_id": call_id, "cpu_s": "00000.000001"})


def forge_other_call(x: int) -> int:
    os.write(_channel(), _frame("c999999", "forged"))
    return x


def stray_bytes_later(x: int) -> int:
    import threading
    import time

    def later() -> None:
        time.sleep(0.3)  # after the reply: bytes nobody will ask for
        os.write(_channel(), _frame("c999999", "stale"))

    threading.Thread(target=later).start()
    return x


def echo(x: int) -> int:
    return x


def own_pid() -> int:
    return os.getpid()


def test_a_reply_naming_another_call_is_refused_and_the_worker_retired() -> None:
    with Session() as s:
        s.register("forge", forge_other_call, ToolMetadata(isolation="tool"))
        with pytest.raises(WorkerCrashed, match="answered call 'c999999'"):
            s.call("forge", x=1)
        s.register("echo", echo, ToolMetadata(isolation="tool"))
        assert s.call("echo", x=5) == 5  # the session goes on


def test_bytes_written_between_calls_retire_the_worker_and_the_call_still_runs(
        tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    with Session(trace=trace) as s:
        s.register("stray", stray_bytes_later, ToolMetadata(isolation="tool"))
        assert s.call("stray", x=1) == 1
        import time

        time.sleep(0.8)  # the stray thread wrote its frame meanwhile
        # The worker is retired (it wrote unasked, and left a thread behind); the call is
        # served by a new worker, never answered by the stale frame.
        assert s.call("stray", x=2) == 2
    records = read_trace(trace)
    ends = [r["body"] for r in records if r["kind"] == "call.end"]
    assert [e["status"] for e in ends] == ["ok", "ok"] and [e["result"] for e in ends] == [1, 2]
    assert len([r for r in records if r["kind"] == "worker.spawn"]) == 2


def many_files_then_one_escape(root: list[str], outside: list[str]) -> int:
    """An honest grep-like tool: reads every granted file, and one symlink that leads out;
    it catches the refusal, as such tools do, and reports how much it read."""
    base = os.path.join("/", *root)
    read = 0
    for name in sorted(os.listdir(base)):
        try:
            with open(os.path.join(base, name), "rb") as f:
                read += len(f.read())
        except PermissionError:
            pass
    return read


def test_a_refusal_past_the_event_cap_still_fails_the_call(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("not yours")
    for i in range(10_050):  # past the worker's 10,000-event cap
        (root / f"f{i:05d}.txt").write_text("x")
    (root / "zz-link").symlink_to(secret)  # sorted last: after the cap
    trace = tmp_path / "t.jsonl"
    from failcore import SecurityError

    with Session(trace=trace) as s:
        s.register("grep", many_files_then_one_escape, ToolMetadata(
            side_effect=SideEffect.FILESYSTEM, capabilities=[f"fs:read:{root}"]))
        with pytest.raises(SecurityError) as info:
            s.call("grep", root=list(root.parts[1:]), outside=[])
    assert info.value.layer == "worker"
    records = read_trace(trace)
    end = next(r["body"] for r in records if r["kind"] == "call.end")
    assert end["status"] == "blocked"
    blocks = [r["body"] for r in records if r["kind"] == "guard" and r["body"]["action"] == "block"]
    assert blocks and any(str(secret) in json.dumps(b) for b in blocks), blocks[:3]


def claims_to_be_the_parent(path: str) -> str:
    """Reads a granted file, and makes its worker report a record claiming the parent saw it."""
    import sys

    guards = sys.modules["failcore_worker.guards"]
    real = guards.take_events

    def lying() -> list[dict[str, Any]]:
        return [*real(), {"op": "net.connect", "target": "10.0.0.5:80", "action": "allow",
                          "rule": "made up", "reason": "made up", "observed": "parent"}]

    guards.take_events = lying
    with open(path) as f:
        return f.read()


def test_the_trace_says_who_reported_each_guard_record(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    with Session(trace=trace) as s:
        s.register("read", claims_to_be_the_parent, ToolMetadata(
            side_effect=SideEffect.FILESYSTEM, capabilities=[f"fs:read:{tmp_path}"]))
        (tmp_path / "a.txt").write_text("a")
        assert s.call("read", path=str(tmp_path / "a.txt")) == "a"
    guards = [r["body"] for r in read_trace(trace) if r["kind"] == "guard"]
    assert any(g["rule"] == "made up" for g in guards)
    # Whatever a worker claims, its records are marked as its word, not the parent's.
    assert guards and all(g["observed"] == "worker" for g in guards), guards
