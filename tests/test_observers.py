"""Session observers and call context: every record reaches observers, labels reach the trace."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import pytest

from failcore import Secret, Session, call_context


def echo(text: str) -> str:
    return text


def test_observer_sees_every_record_without_a_trace_file() -> None:
    seen: list[tuple[str, str | None]] = []
    with Session() as session:
        session.add_observer(lambda kind, cid, body: seen.append((kind, cid)))
        session.register("echo", echo)
        assert session.call("echo", text="hi") == "hi"
    kinds = [k for k, _ in seen]
    assert kinds[0] == "tool.register" and "call.start" in kinds and "call.end" in kinds
    assert kinds[-1] == "session.end"
    assert {cid for k, cid in seen if k.startswith("call.")} == {"c000001"}


def test_a_raising_observer_is_removed_and_the_call_still_works(
        capsys: pytest.CaptureFixture[str]) -> None:
    good: list[str] = []

    def bad(kind: str, cid: str | None, body: dict[str, Any]) -> None:
        raise RuntimeError("observer bug")

    with Session() as session:
        session.add_observer(bad)
        session.add_observer(lambda kind, cid, body: good.append(kind))
        session.register("echo", echo)
        assert session.call("echo", text="a") == "a"
        assert session.call("echo", text="b") == "b"
    assert good.count("call.end") == 2
    assert capsys.readouterr().err.count("observer bug") == 1


def test_observers_get_scrubbed_bodies() -> None:
    def login(token: Annotated[str, Secret]) -> str:
        raise ValueError(f"bad token {token}")

    bodies: list[str] = []
    with Session() as session:
        session.add_observer(lambda kind, cid, body: bodies.append(json.dumps(body, default=str)))
        session.register("login", login)
        with pytest.raises(Exception, match="bad token"):
            session.call("login", token="hunter2-very-secret")
    assert not any("hunter2-very-secret" in b for b in bodies)


def test_call_context_labels_reach_call_start(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    with Session(trace=trace) as session:
        session.register("echo", echo)
        with call_context(mcp_request_id=7, client="cli"):
            session.call("echo", text="x")
            with call_context(step="inner"):
                session.call("echo", text="y")

        async def run() -> None:
            with call_context(mcp_request_id="async-1"):
                await session.acall("echo", text="z")

        asyncio.run(run())
        session.call("echo", text="none")
    starts = [json.loads(line)["body"] for line in trace.read_text().splitlines()
              if json.loads(line)["kind"] == "call.start"]
    assert [s.get("context") for s in starts] == [
        {"mcp_request_id": "7", "client": "cli"},
        {"mcp_request_id": "7", "client": "cli", "step": "inner"},
        {"mcp_request_id": "async-1"},
        None,
    ]


def test_call_context_refuses_bad_labels() -> None:
    with pytest.raises(ValueError, match="identifier"), call_context(**{"not a name": "x"}):
        pass
