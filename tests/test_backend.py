"""The backend seam: Session-level behaviour with FakeBackend (no process started) and the
contract every backend keeps."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from failcore import (
    InputValidationError,
    RiskLevel,
    SecurityError,
    Session,
    SideEffect,
    ToolFailed,
    ToolMetadata,
    presets,
)
from failcore._backend import Backend
from failcore._local import LocalBackend
from failcore.testing import FakeBackend, FakeCall, FakeReply


def add(a: int, b: int) -> int:
    return a + b


def fetch(url: str) -> str:
    return "fetched " + url


def _kinds(path: Path) -> list[str]:
    return [json.loads(line)["kind"] for line in path.read_text().splitlines()]


def test_fake_backend_runs_the_whole_pipeline_without_a_process(tmp_path: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    fake = FakeBackend()
    trace = tmp_path / "t.jsonl"
    with Session(trace=trace, backend=fake) as session:
        session.register("add", add)
        assert session.call("add", a=2, b=3) == 5
        assert session.call("add", a=1, b=1) == 2
        with pytest.raises(InputValidationError, match="b"):
            session.call("add", a=1, b="2")
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before
    assert fake.closed
    assert [c.args for c in fake.calls] == [{"a": 2, "b": 3}, {"a": 1, "b": 1}]
    kinds = _kinds(trace)
    # A warm tool: one spawn for two calls; the refused call never reached the backend.
    assert kinds.count("worker.spawn") == 1 and kinds.count("call.end") == 3
    assert kinds.count("validate.input") == 1


def test_fake_backend_sees_the_tokens_grants_and_policy_blocks_before_it() -> None:
    fake = FakeBackend()
    with Session(presets.net_safe(strict=True), backend=fake) as session:
        session.register("fetch", fetch, ToolMetadata(
            risk_level=RiskLevel.HIGH, side_effect=SideEffect.NETWORK,
            capabilities=["net:connect:api.example.com:443"]))
        with pytest.raises(SecurityError) as info:
            session.call("fetch", url="http://169.254.169.254/latest/meta-data/")
        assert info.value.layer == "precheck"
        assert session.call("fetch", url="https://api.example.com/") == "fetched https://api.example.com/"
    (call,) = fake.calls
    assert [r.source for r in call.grants.net] == ["net:connect:api.example.com:443"]
    assert call.grants.block_ranges


def test_scripted_worker_blocks_and_failures_map_to_the_same_errors(tmp_path: Path) -> None:
    def worker(call: FakeCall) -> object:
        if call.args["url"].endswith("/deny"):
            return FakeReply(error="denied", events=[{
                "op": "net.connect", "target": "10.0.0.5:80", "host": "10.0.0.5", "port": 80,
                "action": "block", "rule": "net_safe: 10.0.0.0/8 (private)", "reason": "scripted"}])
        if call.args["url"].endswith("/raise"):
            raise KeyError("boom")
        return call.run()

    trace = tmp_path / "t.jsonl"
    with Session(trace=trace, backend=FakeBackend(worker)) as session:
        session.register("fetch", fetch, ToolMetadata(
            side_effect=SideEffect.NETWORK, capabilities=["net:connect:example.com"]))
        with pytest.raises(SecurityError) as denied:
            session.call("fetch", url="http://example.com/deny")
        assert denied.value.layer == "worker" and denied.value.rule.startswith("net_safe")
        with pytest.raises(ToolFailed) as failed:
            session.call("fetch", url="http://example.com/raise")
        assert failed.value.remote_type == "KeyError"
        assert session.call("fetch", url="http://example.com/ok") == "fetched http://example.com/ok"
    guards = [json.loads(line)["body"] for line in trace.read_text().splitlines()
              if json.loads(line)["kind"] == "guard"]
    assert [g["target"] for g in guards] == ["10.0.0.5:80"]


def test_replay_of_a_fake_run_needs_no_backend(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    with Session(trace=trace, backend=FakeBackend()) as session:
        session.register("add", add)
        assert session.call("add", a=20, b=22) == 42
    with Session(replay=trace) as replayed:
        replayed.register("add", add)
        assert replayed.call("add", a=20, b=22) == 42


def test_both_backends_implement_the_protocol() -> None:
    def implements(obj: object) -> bool:
        return all(callable(getattr(obj, m, None)) for m in
                   ("start", "lease", "exchange", "release", "abort", "close"))

    assert implements(FakeBackend()) and implements(LocalBackend(prespawn=0))
    backend: Backend = FakeBackend()  # mypy checks the structural type here
    backend.close()
