"""The trace a real Session writes: deterministic, secret-free, replayable, verifiable.

(a) two runs of the same calls give equal traces but for time fields; (b) secret values
never reach the trace file; (c) ``Session(replay=...)`` answers from the record with no
worker and no side effect, and refuses calls that diverge; (d) ``failcore verify``
accepts a session trace and rejects it after one flipped byte; (e) ``failcore report``
counts what the trace holds.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import psutil
import pytest

from failcore import (
    FailCoreError,
    InputValidationError,
    ReplayMismatch,
    Secret,
    SecurityError,
    Session,
    SideEffect,
    ToolFailed,
    ToolMetadata,
    presets,
)
from failcore._cli import main as cli
from failcore._trace import read_trace, strip_volatile

NET = ToolMetadata(side_effect=SideEffect.NETWORK, capabilities=["net:connect:api.example.com:443"])


# --- tools --------------------------------------------------------------------------------------


def add(a: int, b: int) -> int:
    return a + b


def stats(values: list[float]) -> dict[str, float]:
    return {"n": float(len(values)), "total": float(sum(values))}


def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


def fetch(url: str) -> str:
    return url  # never runs for the URLs used here: the pre-check refuses them


def dial(port: int) -> str:
    import socket

    socket.create_connection(("127.0.0.1", port), timeout=1).close()
    return "connected"


def save(path: str, text: str) -> int:
    with open(path, "w") as f:
        return f.write(text)


# One call of every outcome: (tool, kwargs, the error it raises or None).
CALLS: list[tuple[str, dict[str, Any], type[FailCoreError] | None]] = [
    ("add", {"a": 1, "b": 2}, None),
    ("stats", {"values": [1.5, 2.5]}, None),
    ("boom", {"x": 3}, ToolFailed),
    ("fetch", {"url": "http://169.254.169.254/latest/meta-data/"}, SecurityError),
    ("dial", {"port": 9}, SecurityError),
    ("add", {"a": "not a number", "b": 2}, InputValidationError),
    ("nope", {}, InputValidationError),
    ("add", {"a": 5, "b": 6}, None),
]


def register_all(session: Session) -> None:
    session.register("add", add)
    session.register("stats", stats)
    session.register("boom", boom)
    session.register("fetch", fetch, NET)
    session.register("dial", dial, NET)


def run_calls(session: Session) -> list[Any]:
    """Make every call in CALLS; returns results, checking each error's type."""
    results = []
    for tool, kwargs, error in CALLS:
        if error is None:
            results.append(session.call(tool, **kwargs))
        else:
            with pytest.raises(error):
                session.call(tool, **kwargs)
    return results


def record_session(path: Path) -> list[Any]:
    with Session(validator=presets.net_safe(strict=True), trace=path) as session:
        register_all(session)
        return run_calls(session)


@pytest.fixture
def recorded(tmp_path: Path) -> Path:
    path = tmp_path / "recorded.jsonl"
    assert record_session(path) == [3, {"n": 2.0, "total": 4.0}, 11]
    return path


# --- (a) determinism ------------------------------------------------------------------------------

# Known to differ between runs for reasons other than time: G5 in /work/briefs/G-bugs.md.
_G5_KEYS = frozenset({"worker", "bytes"})


def _without(value: Any, keys: frozenset[str]) -> Any:
    if isinstance(value, dict):
        return {k: _without(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [_without(v, keys) for v in value]
    return value


def test_two_runs_equal_but_for_worker_names_and_frame_sizes(tmp_path: Path) -> None:
    record_session(tmp_path / "one.jsonl")
    record_session(tmp_path / "two.jsonl")
    one = [_without(strip_volatile(r), _G5_KEYS) for r in read_trace(tmp_path / "one.jsonl")]
    two = [_without(strip_volatile(r), _G5_KEYS) for r in read_trace(tmp_path / "two.jsonl")]
    assert len(one) == len(two)
    for a, b in zip(one, two, strict=True):
        assert a == b
    statuses = [r["body"]["status"] for r in one if r["kind"] == "call.end"]
    assert statuses == ["ok", "ok", "failed", "blocked", "blocked", "invalid_input",
                        "invalid_input", "ok"]


def test_two_runs_give_equal_traces(tmp_path: Path) -> None:
    for _ in range(3):
        record_session(tmp_path / "one.jsonl")
        record_session(tmp_path / "two.jsonl")
        one = [strip_volatile(r) for r in read_trace(tmp_path / "one.jsonl")]
        two = [strip_volatile(r) for r in read_trace(tmp_path / "two.jsonl")]
        assert one == two
        os.unlink(tmp_path / "one.jsonl")
        os.unlink(tmp_path / "two.jsonl")


# --- (b) secrets --------------------------------------------------------------------------------


def use_env_secret() -> int:
    return len(os.environ["FC_SECRET"])


def use_secret_arg(key: str, n: int) -> int:
    return len(key) + n


@pytest.fixture
def env_secret(monkeypatch: pytest.MonkeyPatch) -> str:
    value = "fcsecret-" + secrets.token_hex(16)
    monkeypatch.setenv("FC_SECRET", value)
    return value


def test_secret_values_used_normally_stay_out_of_the_trace(tmp_path: Path, env_secret: str) -> None:
    arg = "fcarg-" + secrets.token_hex(16)
    path = tmp_path / "trace.jsonl"
    with Session(trace=path) as session:
        session.register("env", use_env_secret, ToolMetadata(
            side_effect=SideEffect.ENVIRONMENT, capabilities=["env:FC_SECRET"]))
        session.register("arg", use_secret_arg, ToolMetadata(secret=["key"]))
        assert session.call("env") == len(env_secret)
        assert session.call("arg", key=arg, n=1) == len(arg) + 1
        with pytest.raises(InputValidationError) as info:
            session.call("arg", key=arg, n="not a number")
        assert arg not in str(info.value)
        with pytest.raises(InputValidationError):
            session.call("arg", key=[arg], n=1)  # the wrong type, holding the secret
    data = path.read_bytes()
    assert env_secret.encode() not in data
    assert arg.encode() not in data
    starts = [r["body"] for r in read_trace(path) if r["kind"] == "call.start"]
    assert [s["args"].get("key") for s in starts[1:]] == ["<secret>"] * 3


def raise_env_secret() -> None:
    raise ValueError("bad token " + os.environ["FC_SECRET"])


def raise_secret_arg(key: str) -> None:
    raise ValueError("bad key " + key)


def open_secret_arg(key: str) -> str:
    with open("/nonexistent-dir/" + key) as f:
        return f.read()


def test_secrets_never_enter_the_trace_even_in_errors(tmp_path: Path, env_secret: str) -> None:
    arg = "fcarg-" + secrets.token_hex(16)
    path = tmp_path / "trace.jsonl"
    secret = ToolMetadata(secret=["key"])
    with Session(trace=path) as session:
        session.register("raise_env", raise_env_secret, ToolMetadata(
            side_effect=SideEffect.ENVIRONMENT, capabilities=["env:FC_SECRET"]))
        session.register("raise_arg", raise_secret_arg, secret)
        session.register("open_arg", open_secret_arg, secret)
        session.register("use_arg", use_secret_arg, secret)
        for tool, kwargs, error in (
                ("raise_env", {}, ToolFailed), ("raise_arg", {"key": arg}, ToolFailed),
                ("open_arg", {"key": arg}, SecurityError),
                ("use_arg", {"key": "../" + arg, "n": 1}, SecurityError)):
            with pytest.raises(error):
                session.call(tool, **kwargs)
    data = path.read_bytes()
    leaks = [r["kind"] for r in read_trace(path)
             if env_secret in json.dumps(r) or arg in json.dumps(r)]
    assert env_secret.encode() not in data and arg.encode() not in data, leaks


def annotated_secret(key: Annotated[str, Secret]) -> int:
    return len(key)


# As without ``from __future__ import annotations``: the annotation objects themselves.
annotated_secret.__annotations__ = {"key": Annotated[str, Secret], "return": int}


def test_secret_annotated_tool_runs(tmp_path: Path) -> None:
    arg = "fcarg-" + secrets.token_hex(16)
    with Session(trace=tmp_path / "trace.jsonl") as session:
        session.register("annotated", annotated_secret)
        assert session.call("annotated", key=arg) == len(arg)
    assert arg.encode() not in (tmp_path / "trace.jsonl").read_bytes()


# --- (c) replay ---------------------------------------------------------------------------------


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture
def replay_session(recorded: Path, tmp_path: Path) -> Iterator[Session]:
    with Session(validator=presets.net_safe(strict=True), replay=recorded,
                 trace=tmp_path / "replayed.jsonl") as session:
        register_all(session)
        yield session


def test_replay_answers_from_the_record_without_workers(recorded: Path, tmp_path: Path) -> None:
    before = _children()
    with Session(validator=presets.net_safe(strict=True), replay=recorded,
                 trace=tmp_path / "replayed.jsonl") as session:
        register_all(session)
        assert _children() == before, "a replay session starts no zygote and no worker"
        assert run_calls(session) == [3, {"n": 2.0, "total": 4.0}, 11]
        assert _children() == before
        with pytest.raises(ReplayMismatch):
            session.call("add", a=1, b=2)  # one call more than was recorded
    kinds = Counter(r["kind"] for r in read_trace(tmp_path / "replayed.jsonl"))
    assert kinds["worker.spawn"] == kinds["ipc.send"] == kinds["token.mint"] == 0


def test_replay_has_no_side_effects(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = out / "written.txt"
    meta = ToolMetadata(side_effect=SideEffect.FILESYSTEM, capabilities=[f"fs:write:{out}"])
    with Session(trace=tmp_path / "t.jsonl") as session:
        session.register("save", save, meta)
        assert session.call("save", path=str(target), text="hello") == 5
    assert target.read_text() == "hello"
    target.unlink()
    with Session(replay=tmp_path / "t.jsonl") as session:
        session.register("save", save, meta)
        assert session.call("save", path=str(target), text="hello") == 5
    assert not target.exists(), "replay must not touch the world"


@pytest.mark.parametrize(("tool", "kwargs"), [
    ("stats", {"values": [1.0]}),  # a different tool
    ("add", {"a": 1, "b": 3}),     # different arguments
    ("add", {"a": 1}),             # missing arguments
])
def test_replay_refuses_a_diverging_call(replay_session: Session, tool: str,
                                         kwargs: dict[str, Any]) -> None:
    with pytest.raises(ReplayMismatch, match="diverged"):
        replay_session.call(tool, **kwargs)


def test_replayed_errors_keep_their_fields(replay_session: Session) -> None:
    live = {}
    with Session(validator=presets.net_safe(strict=True)) as session:
        register_all(session)
        for tool, kwargs in (("boom", {"x": 3}), ("fetch", CALLS[3][1])):
            try:
                session.call(tool, **kwargs)
            except FailCoreError as err:
                live[tool] = err
    for tool, kwargs, _ in CALLS[:4]:
        try:
            replay_session.call(tool, **kwargs)
        except (ToolFailed, SecurityError) as err:
            fields = ("remote_type",) if tool == "boom" else ("rule", "layer", "target")
            for name in fields:
                assert getattr(err, name) == getattr(live[tool], name), (tool, name)


def test_replay_of_a_missing_trace_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FailCoreError, match="does not exist"):
        Session(replay=tmp_path / "missing.jsonl")


# --- (d) verify -----------------------------------------------------------------------------------


def test_verify_accepts_a_session_trace_and_rejects_any_flipped_byte(
        recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["verify", str(recorded)]) == 0
    assert "OK" in capsys.readouterr().out
    data = recorded.read_bytes()
    lines = data.split(b"\n")
    last_start = len(data) - len(lines[-2]) - 1  # the final line: nothing after it vouches for it
    first_end = len(lines[0]) + 1
    positions = sorted({first_end + 5, len(data) // 3, len(data) // 2, last_start - 10,
                        *(first_end + i * 997 % (last_start - first_end) for i in range(8))})
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        recorded.write_bytes(bytes(flipped))
        code = cli(["verify", str(recorded)])
        out = capsys.readouterr().out
        assert code == 1, f"flipping byte {pos} ({data[pos:pos + 1]!r}) went unnoticed: {out}"
        assert "FAILED" in out
    recorded.write_bytes(data)
    assert cli(["verify", str(recorded)]) == 0


def test_verify_pins_the_last_line_through_its_head_hash(
        recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The last line has no successor; the head hash verify prints is what pins it."""
    assert cli(["verify", "--json", str(recorded)]) == 0
    head = json.loads(capsys.readouterr().out)["head"]
    data = bytearray(recorded.read_bytes())
    data[data.rindex(b'"calls":') + len(b'"calls":')] ^= 0x01  # 8 -> 9
    recorded.write_bytes(bytes(data))
    assert cli(["verify", "--json", str(recorded)]) == 0
    assert json.loads(capsys.readouterr().out)["head"] != head


# --- (e) report -----------------------------------------------------------------------------------


def test_report_counts_match_the_trace(recorded: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.html"
    assert cli(["report", str(recorded), "-o", str(out)]) == 0
    capsys.readouterr()
    page = out.read_text()
    records = read_trace(recorded)
    ends = [r["body"] for r in records if r["kind"] == "call.end"]
    findings = [f for r in records if r["kind"] == "policy.precheck" for f in r["body"]["findings"]]
    guards = [r["body"] for r in records if r["kind"] == "guard"]
    status = Counter(e["status"] for e in ends)
    assert status == {"ok": 3, "failed": 1, "blocked": 2, "invalid_input": 2}
    expected = {
        "calls": len(ends),
        "ok": status["ok"],
        "blocked": sum(f["action"] == "block" for f in findings)
        + sum(g["action"] == "block" for g in guards),
        "warnings": sum(f["action"] == "warn" for f in findings)
        + sum(g["action"] == "warn" for g in guards),
        "tools": len([r for r in records if r["kind"] == "tool.register"]),
        "records": len(records),
    }
    tiles = {k: int(v) for k, v in re.findall(r'data-count="([a-z_]+)" data-value="(\d+)"', page)}
    assert tiles == expected
    summary = re.search(r'<script type="application/json" id="failcore-summary">(.*?)</script>',
                        page, re.DOTALL)
    assert summary is not None
    counts = json.loads(summary.group(1))["counts"]
    assert counts["status"] == dict(status)
    assert counts["blocked"] == expected["blocked"] == 2
    assert counts["blocked_precheck"] == 1 and counts["blocked_worker"] == 1


def test_large_results_are_recorded_by_size_and_not_replayed(tmp_path: Path) -> None:
    from failcore import ReplayMismatch

    path = tmp_path / "trace.jsonl"
    with Session(trace=path, trace_result_bytes=10_000) as session:
        session.register("big", lambda: "x" * 50_000, ToolMetadata())
        session.register("small", lambda: "y", ToolMetadata())
        assert session.call("big") == "x" * 50_000
        assert session.call("small") == "y"
    assert path.stat().st_size < 20_000, "the big result is not in the trace"
    ends = [r["body"] for r in read_trace(path) if r["kind"] == "call.end"]
    assert ends[0]["result"]["$omitted"] and ends[0]["result"]["reply_bytes"] > 50_000
    assert ends[1]["result"] == "y"
    with Session(replay=path) as replay:
        with pytest.raises(ReplayMismatch, match="trace_result_bytes"):
            replay.call("big")


def _inc(x: int) -> int:
    return x + 1


def test_fresh_worker_traces_do_not_depend_on_pool_timing(tmp_path: Path) -> None:
    """Fresh calls take a worker prepared ahead or one initialised on the spot, depending on
    how fast the caller is; the trace must not show which."""
    import time

    from failcore._trace import strip_volatile

    runs = []
    for pause in (0.0, 0.05):
        path = tmp_path / f"trace-{pause}.jsonl"
        with Session(trace=path) as session:
            session.register("inc", _inc, ToolMetadata(isolation="call"))
            for i in range(6):
                assert session.call("inc", x=i) == i + 1
                time.sleep(pause)
        runs.append([strip_volatile(r) for r in read_trace(path)])
    assert runs[0] == runs[1]
    sends = [r["body"]["type"] for r in runs[0] if r["kind"] == "ipc.send"]
    assert sends == ["init", "call"] * 6, "every message across the boundary is recorded"


def test_bytes_arguments_and_untyped_bytes_results_replay(tmp_path: Path) -> None:
    """One JSON encoding for the trace (bytes as ``{"$bytes": ...}``): a call with bytes
    in and out replays, even without a return annotation."""

    def flip(data: bytes):  # type: ignore[no-untyped-def]  # no annotation: plain data
        return data[::-1]

    trace = tmp_path / "t.jsonl"
    with Session(trace=trace) as s:
        s.register("flip", flip)
        assert s.call("flip", data=b"\x00\xffab") == b"ba\xff\x00"
    with Session(replay=trace) as r:
        r.register("flip", flip)
        assert r.call("flip", data=b"\x00\xffab") == b"ba\xff\x00"
