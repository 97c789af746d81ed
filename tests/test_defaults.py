"""A declared side effect with no capability of its kind gets its conservative default.

NETWORK -> ``net:connect:public`` (any port), a grant like any other, marked as a default
in the trace and the token; FILESYSTEM -> the call's scratch directory only (recorded as
``fs:scratch``); PROCESS and ENVIRONMENT -> RegistrationError showing what to add.
Reaching a *public* address needs a network namespace: ``test_seed_example.py``.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from failcore import (
    DefaultPolicy,
    RegistrationError,
    RiskLevel,
    SecurityError,
    Session,
    SideEffect,
    ToolMetadata,
    presets,
)
from failcore._policy import Policy
from failcore._rejudge import rejudge
from failcore._trace import read_trace, verify_trace

NET = ToolMetadata(risk_level=RiskLevel.HIGH, side_effect=SideEffect.NETWORK,
                   default_policy=DefaultPolicy.BLOCK)


def connect(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=2):
        return "connected"


def write_here_and_there(there: str) -> str:
    with open("scratch.txt", "w") as f:
        f.write("mine")
    with open(there, "w") as f:
        f.write("not mine")
    return "both"


def _records(path: Path, kind: str) -> list[dict[str, Any]]:
    return [r["body"] for r in read_trace(path) if r["kind"] == kind]


@pytest.fixture
def listener() -> Iterator[tuple[int, list[int]]]:
    """A loopback listener counting the connections it accepts (it must get none)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    hits: list[int] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            hits.append(1)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1], hits
    stop.set()
    thread.join(2)
    server.close()


@pytest.mark.parametrize("validator", [None, presets.net_safe(strict=True)],
                         ids=["no-policy", "net_safe"])
def test_network_default_is_public_only_whatever_the_policy(
        tmp_path: Path, listener: tuple[int, list[int]], validator: Policy | None) -> None:
    port, hits = listener
    trace = tmp_path / "trace.jsonl"
    with Session(validator=validator, trace=trace) as s:
        s.register("connect", connect, NET)
        for host in ("127.0.0.1", "localhost", "::ffff:127.0.0.1"):
            with pytest.raises(SecurityError) as err:
                s.call("connect", host=host, port=port)
            message = str(err.value)
            assert "public" in message or "net_safe: internal name" in message, message
    assert hits == []
    register = _records(trace, "tool.register")[0]
    assert register["capabilities"] == ["net:connect:public"]
    assert register["defaults"] == ["net:connect:public"]
    grants = _records(trace, "policy.grants")[0]
    assert grants["granted"] == ["net:connect:public"]
    assert grants["grants"]["net"] == [{"host": "public", "port_lo": 0, "port_hi": 65535,
                                        "source": "net:connect:public (default)"}]
    assert verify_trace(trace).ok


def test_declared_capabilities_get_no_default(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    with Session(trace=trace) as s:
        s.register("named", connect, ToolMetadata(
            side_effect=SideEffect.NETWORK, capabilities=["net:connect:127.0.0.1:9"]))
    register = _records(trace, "tool.register")[0]
    assert register["capabilities"] == ["net:connect:127.0.0.1:9"] and "defaults" not in register


def test_filesystem_default_is_the_scratch_directory(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    there = tmp_path / "outside.txt"
    with Session(trace=trace) as s:
        s.register("write", write_here_and_there,
                   ToolMetadata(side_effect=SideEffect.FILESYSTEM))
        with pytest.raises(SecurityError, match="outside.txt"):
            s.call("write", there=str(there))
    assert not there.exists()
    register = _records(trace, "tool.register")[0]
    assert register["defaults"] == ["fs:scratch"] and register["capabilities"] == []
    assert _records(trace, "policy.grants")[0]["grants"]["fs"] == []
    guards = [g for g in _records(trace, "guard") if g["op"] == "fs.open"]
    assert guards and guards[-1]["action"] == "block"  # the scratch write was not even noted


def test_both_defaults_are_recorded_together(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    with Session(trace=trace) as s:
        s.register("both", connect, ToolMetadata(
            side_effect=[SideEffect.NETWORK, SideEffect.FILESYSTEM]))
    assert _records(trace, "tool.register")[0]["defaults"] == ["fs:scratch", "net:connect:public"]


@pytest.mark.parametrize("effect, shown", [
    (SideEffect.PROCESS, "capabilities=['proc:exec:/usr/bin/git']"),
    (SideEffect.ENVIRONMENT, "capabilities=['env:API_TOKEN']"),
])
def test_process_and_environment_have_no_default(effect: SideEffect, shown: str) -> None:
    with Session() as s, pytest.raises(RegistrationError) as err:
        s.register("t", connect, ToolMetadata(side_effect=effect))
    assert shown in str(err.value) and "no safe default" in str(err.value)


def test_an_allow_list_can_refuse_the_default(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    policy = Policy(name="only-github", allow=("net:connect:api.github.com:443",))
    with Session(validator=policy, trace=trace) as s:
        s.register("connect", connect, NET)
    grants = _records(trace, "policy.grants")[0]
    assert grants["granted"] == [] and grants["refused"][0]["capability"] == "net:connect:public"


def test_an_allow_list_narrows_the_default_to_its_public_part(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    policy = Policy(name="v4-https", allow=("net:connect:0.0.0.0/0:443",))
    with Session(validator=policy, trace=trace) as s:
        s.register("connect", connect, NET)
    grants = _records(trace, "policy.grants")[0]
    assert grants["granted"] == ["net:connect:public@0.0.0.0/0:443"]
    assert grants["grants"]["net"][0]["source"] == "net:connect:public@0.0.0.0/0:443 (default)"


def test_replay_recomputes_the_default_grant(tmp_path: Path,
                                             listener: tuple[int, list[int]]) -> None:
    port, _ = listener
    trace = tmp_path / "trace.jsonl"
    with Session(trace=trace) as s:
        s.register("connect", connect, NET)
        with pytest.raises(SecurityError):
            s.call("connect", host="127.0.0.1", port=port)
    findings = rejudge(read_trace(trace), presets.net_safe(strict=True))
    worker = [f for f in findings if f.layer == "worker" and "127.0.0.1" in f.what]
    assert worker and worker[0].verdict.action == "block"
    assert worker[0].verdict.rule.startswith("net_safe: 127.0.0.0/8"), worker[0].verdict
    assert os.path.exists(trace)


def test_show_and_report_mark_the_defaults(tmp_path: Path) -> None:
    from failcore._report import summarize

    trace = tmp_path / "trace.jsonl"
    with Session(trace=trace) as s:
        s.register("both", connect, ToolMetadata(
            side_effect=[SideEffect.NETWORK, SideEffect.FILESYSTEM]))
    (tool,) = summarize(read_trace(trace)).tools
    assert tool.capabilities == ["net:connect:public (default)", "fs:scratch (default)"]
