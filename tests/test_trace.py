"""The trace writer, reader and verifier, and the record schema."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pydantic
import pytest

from failcore._errors import TraceError
from failcore._trace import (
    GENESIS,
    TraceWriter,
    read_trace,
    strip_volatile,
    to_jsonable,
    verify_trace,
)
from failcore._trace_schema import KINDS, json_schema_text, validate_record

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "failcore_sample_traces", ROOT / "tests" / "fixtures" / "sample_traces.py")
assert _spec is not None and _spec.loader is not None
samples: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(samples)


def canonical(rec: dict[str, Any]) -> bytes:
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    samples.write_sample_trace(str(path))
    return path


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


# --- format -------------------------------------------------------------------------------


def test_lines_are_canonical_and_chained(sample: Path) -> None:
    lines = lines_of(sample)
    prev = GENESIS
    for seq, line in enumerate(lines):
        rec = json.loads(line)
        assert canonical(rec) == line
        assert list(rec) == ["body", "call_id", "kind", "prev", "seq", "t"]
        assert rec["seq"] == seq and rec["prev"] == prev
        prev = hashlib.sha256(line).hexdigest()
    assert verify_trace(sample).head == prev


def test_record_returns_what_was_written(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dirs" / "t.jsonl"  # parents are created
    with TraceWriter(path, clock=samples.FakeClock()) as w:
        first = w.record("session.start", None, {"failcore_version": "1", "policy": None, "format": 1})
        second = w.record("session.end", None, {"calls": 0})
    assert read_trace(path) == [first, second]
    assert first["prev"] == GENESIS and first["t"] == 0.0015 and second["t"] == 0.003
    assert second["prev"] == hashlib.sha256(lines_of(path)[0]).hexdigest()


def test_shipped_fixture_is_regenerated_byte_for_byte(tmp_path: Path) -> None:
    """The encoding is deterministic: same records, same clock -> same bytes."""
    path = tmp_path / "again.jsonl"
    samples.write_sample_trace(str(path))
    assert path.read_bytes() == Path(samples.SAMPLE).read_bytes()
    assert verify_trace(samples.SAMPLE).ok


def test_two_runs_differ_only_in_volatile_fields(tmp_path: Path) -> None:
    def run(path: Path, pid: int, ms: float) -> list[dict[str, Any]]:
        with TraceWriter(path) as w:  # the real monotonic clock
            w.record("worker.spawn", "c000001", {"worker": "w", "isolation": "call", "pid": pid})
            w.record("call.end", "c000001", {"tool": "x", "status": "ok", "result": [1],
                                             "error": None, "duration_ms": ms})
            w.record("worker.kill", "c000001", {"worker": "w", "reason": "retired", "pid": pid})
        return read_trace(path)

    a = run(tmp_path / "a.jsonl", 101, 1.5)
    b = run(tmp_path / "b.jsonl", 202, 9.25)
    assert a != b
    assert [strip_volatile(r) for r in a] == [strip_volatile(r) for r in b]
    assert "pid" not in strip_volatile(a[0])["body"] and "t" not in strip_volatile(a[0])


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    y: bytes


class Model(pydantic.BaseModel):
    when: datetime.date
    tags: tuple[str, ...]


def test_non_json_values_are_converted_never_raised(tmp_path: Path) -> None:
    cycle: list[Any] = []
    cycle.append(cycle)
    nasty = {
        "bytes": b"\x00\xff", "set": {"b", "a", "c"}, "tuple": (1, 2), "nan": math.nan,
        "inf": -math.inf, "point": Point(1, b"hi"), "model": Model(when=datetime.date(2024, 1, 2),
                                                                    tags=("t",)),
        "dt": datetime.datetime(2024, 1, 2, 3, 4, 5), "enum": Color.RED, 7: "int key",
        "obj": object(), "surrogate": "a\ud800b", "cycle": cycle, "huge": 10**5000,
    }
    path = tmp_path / "t.jsonl"
    with TraceWriter(path) as w:
        rec = w.record("call.end", "c000001", {"tool": "x", "status": "ok", "result": nasty,
                                               "error": None, "duration_ms": 1.0})
    result = rec["body"]["result"]
    assert read_trace(path)[0] == rec
    assert result["bytes"] == {"$bytes": "AP8="}
    assert result["set"] == ["a", "b", "c"]
    assert result["tuple"] == [1, 2]
    assert result["nan"] == "NaN" and result["inf"] == "-Infinity"
    assert result["point"] == {"x": 1, "y": {"$bytes": "aGk="}}
    assert result["model"] == {"when": "2024-01-02", "tags": ["t"]}
    assert result["dt"] == "2024-01-02T03:04:05"
    assert result["enum"] == "red" and result["7"] == "int key"
    assert result["obj"] == "<object object>"  # no memory address: same in every run
    assert result["surrogate"] == "a\ufffdb"
    assert "<too deep>" in json.dumps(result["cycle"])
    assert result["huge"]["$int"].startswith("0x")
    assert verify_trace(path).ok


def test_int_keys_sort_canonically(tmp_path: Path) -> None:
    """{9:..,10:..} would sort numerically in json.dumps; as strings "10" < "9"."""
    path = tmp_path / "t.jsonl"
    with TraceWriter(path) as w:
        w.record("call.start", "c000001", {"tool": "x", "args": {"m": {9: "a", 10: "b"}}})
    assert verify_trace(path).errors == []


def test_to_jsonable_is_independent_of_set_order() -> None:
    assert to_jsonable({"zeta", "alpha", "mid"}) == ["alpha", "mid", "zeta"]
    assert to_jsonable(frozenset({3, 1, 2})) == [1, 2, 3]


def test_strip_volatile_is_recursive() -> None:
    rec = {"seq": 1, "t": 2.0, "prev": "x", "kind": "k", "call_id": None,
           "body": {"pid": 1, "a": {"duration_ms": 3, "b": [{"exitcode": 0, "c": 1}]}}}
    assert strip_volatile(rec) == {"seq": 1, "kind": "k", "call_id": None,
                                   "body": {"a": {"b": [{"c": 1}]}}}


# --- tampering ----------------------------------------------------------------------------


def test_intact_trace_verifies(sample: Path) -> None:
    report = verify_trace(sample)
    assert report.ok and report.errors == [] and report.warnings == []
    assert report.records == samples.SAMPLE_COUNTS["records"]


def test_edited_byte_breaks_the_next_link(sample: Path) -> None:
    lines = lines_of(sample)
    assert b'"action":"block"' in lines[9]
    lines[9] = lines[9].replace(b'"action":"block"', b'"action":"allow"', 1)  # hide a block
    write_lines(sample, lines)
    report = verify_trace(sample)
    assert not report.ok
    assert report.errors == [
        "line 11: prev is not the SHA-256 of line 10 (line 10 was altered, or lines were "
        "removed, inserted or reordered here)"
    ]


def test_deleted_line_is_named(sample: Path) -> None:
    lines = lines_of(sample)
    del lines[5]
    write_lines(sample, lines)
    errors = verify_trace(sample).errors
    assert errors[0] == "line 6: seq is 6, expected 5 (1 record missing before it)"
    assert errors[1].startswith("line 6: prev is not the SHA-256 of line 5")
    assert len(errors) == 2  # the chain resynchronises after the gap


def test_reordered_lines_are_named(sample: Path) -> None:
    lines = lines_of(sample)
    lines[7], lines[8] = lines[8], lines[7]
    write_lines(sample, lines)
    errors = verify_trace(sample).errors
    assert "line 8: seq is 8, expected 7 (1 record missing before it)" in errors
    assert "line 9: seq is 7, expected 9 (records reordered or duplicated)" in errors
    assert any(e.startswith("line 8: prev is not") for e in errors)


def test_non_canonical_edit_is_named(sample: Path) -> None:
    lines = lines_of(sample)
    lines[-1] = lines[-1].replace(b'"calls":6', b'"calls": 6')  # the last line: no successor
    write_lines(sample, lines)
    errors = verify_trace(sample).errors
    assert errors == [f"line {len(lines)}: not in canonical encoding (re-encoding it gives "
                      "different bytes: the line was edited)"]


def test_schema_violation_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TraceWriter(path) as w:
        w.record("session.start", None, {"failcore_version": "1", "policy": None, "format": 1})
        w.record("call.end", "c1", {"tool": "x", "status": "exploded", "result": None,
                                    "error": None, "duration_ms": 1.0})
        w.record("mystery", None, {})
    errors = verify_trace(path).errors
    assert errors[0].startswith("line 2: schema: call.end: body.status: Input should be 'ok'")
    assert errors[1].startswith("line 3: schema: unknown kind 'mystery'")


def test_truncated_final_line_is_a_warning_not_tampering(sample: Path) -> None:
    data = sample.read_bytes()
    cut = data[: len(data) - 20]  # into the middle of the last line
    sample.write_bytes(cut)
    report = verify_trace(sample)
    assert report.ok, report.errors
    assert report.records == samples.SAMPLE_COUNTS["records"] - 1
    assert report.warnings[0].startswith("truncated final line:")
    assert "no session.end" in report.warnings[1]
    assert len(read_trace(sample)) == report.records


def test_garbage_line_in_the_middle_is_an_error(sample: Path) -> None:
    lines = lines_of(sample)
    lines[3] = b"\xff\xfe garbage"
    write_lines(sample, lines)
    errors = verify_trace(sample).errors
    assert errors[0] == "line 4: not valid UTF-8 (the line was altered)"
    with pytest.raises(TraceError, match="line 4: not valid UTF-8"):
        read_trace(sample)


@pytest.mark.parametrize("content", [None, b"", b"\x89PNG\r\n\x1a\n\x00\x00garbage\n", b"[1,2]\n",
                                     b'{"a": 1}\n', b"no newline at all"])
def test_not_a_trace_raises(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "x.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TraceError):
        verify_trace(path)


def test_directory_raises(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="is a directory"):
        verify_trace(tmp_path)
    with pytest.raises(TraceError, match="is a directory"):
        read_trace(tmp_path)
    with pytest.raises(TraceError, match="is a directory"):
        TraceWriter(tmp_path)


# --- appending, locking, closing ----------------------------------------------------------


def test_reopening_continues_the_chain(sample: Path) -> None:
    with TraceWriter(sample) as w:
        assert w.seq == samples.SAMPLE_COUNTS["records"]
        w.record("session.start", None, {"failcore_version": "1", "policy": None, "format": 1})
    report = verify_trace(sample)
    assert report.ok and report.records == samples.SAMPLE_COUNTS["records"] + 1


def test_reopening_cuts_a_partial_line(sample: Path) -> None:
    with open(sample, "ab") as f:
        f.write(b'{"body":{"calls":')
    with TraceWriter(sample) as w:
        w.record("session.end", None, {"calls": 0})
    report = verify_trace(sample)
    assert report.ok and report.warnings == []


def test_reopening_a_tampered_trace_is_refused(sample: Path) -> None:
    lines = lines_of(sample)
    del lines[3]
    write_lines(sample, lines)
    before = sample.read_bytes()
    with pytest.raises(TraceError, match="refusing to append.*line 4: seq is 4, expected 3"):
        TraceWriter(sample)
    assert sample.read_bytes() == before


def test_second_writer_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with TraceWriter(path):
        with pytest.raises(TraceError, match="another writer"):
            TraceWriter(path)
    TraceWriter(path).close()  # released on close


def test_closed_writer_refuses_records(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path / "t.jsonl")
    w.close()
    w.close()  # idempotent
    with pytest.raises(TraceError, match="closed"):
        w.record("session.end", None, {"calls": 0})


def test_failed_write_leaves_no_partial_line(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import failcore._trace as trace_module

    path = tmp_path / "t.jsonl"
    real_write = os.write
    calls: list[int] = []

    def half_then_full_disk(fd: int, data: Any) -> int:
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))  # a short write ...
        raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full

    with TraceWriter(path) as w:
        w.record("session.start", None, {"failcore_version": "1", "policy": None, "format": 1})
        monkeypatch.setattr(trace_module, "_os_write", half_then_full_disk)
        with pytest.raises(TraceError, match="write failed: No space left on device"):
            w.record("session.end", None, {"calls": 0})
        monkeypatch.setattr(trace_module, "_os_write", real_write)
        w.record("session.end", None, {"calls": 0})
    report = verify_trace(path)
    assert report.ok and report.warnings == [] and report.records == 2


def test_eight_threads_keep_the_chain_dense(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    per_thread = 400
    with TraceWriter(path) as w:
        def work(n: int) -> None:
            for i in range(per_thread):
                w.record("ipc.send", f"c{n:06d}", {"type": "call", "bytes": i})

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    report = verify_trace(path)
    assert report.errors == [] and report.records == 8 * per_thread
    records = read_trace(path)
    assert [r["seq"] for r in records] == list(range(8 * per_thread))
    for n in range(8):  # each thread's records in its own order
        mine = [r["body"]["bytes"] for r in records if r["call_id"] == f"c{n:06d}"]
        assert mine == list(range(per_thread))


KILLED_WRITER = """
import sys
from failcore._trace import TraceWriter
w = TraceWriter(sys.argv[1])
w.record("session.start", None, {"failcore_version": "1", "policy": None, "format": 1})
i = 0
while True:
    w.record("call.start", "c%06d" % i, {"tool": "t", "args": {"blob": "x" * (i % 5000)}})
    i += 1
"""


def test_killed_writer_leaves_a_valid_prefix(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if path.exists() and path.stat().st_size > 2_000_000:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    report = verify_trace(path)
    assert report.ok, report.errors
    assert report.records > 10
    assert all(w.startswith(("truncated final line", "no session.end")) for w in report.warnings)
    with TraceWriter(path) as w:  # and the next session can continue it
        w.record("session.end", None, {"calls": 0})
    assert verify_trace(path).ok


# --- schema -------------------------------------------------------------------------------


def test_schema_round_trip(sample: Path) -> None:
    records = read_trace(sample)
    # The guardrail kinds (scan, budget.*, approval) round-trip in tests/test_guardrails_trace.py;
    # mcp.* kinds are written by ``failcore mcp guard``, not a Session: their round trip is
    # checked on a real guard trace in tests/test_mcp_guard.py.
    guardrail_kinds = {"scan", "budget.check", "budget.charge", "approval"}
    guard_kinds = {k for k in KINDS if k.startswith("mcp.")}
    assert {r["kind"] for r in records} == KINDS - {"validate.output"} - guardrail_kinds - guard_kinds
    for rec in records:
        model = validate_record(rec)
        assert model.model_dump(mode="json", exclude_unset=True) == rec


def test_validate_output_and_optional_keys() -> None:
    base = {"seq": 0, "t": 0.0, "call_id": "c000001", "prev": GENESIS}
    validate_record(dict(base, kind="validate.output", body={"ok": False, "errors": [
        {"loc": "result", "msg": "Input should be a valid integer", "type": "int_type"}]}))
    validate_record(dict(base, kind="call.end", body={
        "tool": "x", "status": "failed", "result": None, "duration_ms": 2,
        "error": {"type": "ToolFailed", "message": "boom", "traceback": "Traceback ..."}}))
    validate_record(dict(base, kind="ipc.recv", body={"type": "result", "bytes": 3, "extra": 1}))


@pytest.mark.parametrize("change", [
    {"seq": "1"}, {"seq": True}, {"seq": -1}, {"prev": "abc"}, {"t": "0"}, {"call_id": ""},
    {"extra": 1}, {"body": {"calls": 1, "more": 2}}, {"body": {"calls": "1"}}, {"kind": "nope"},
])
def test_schema_refuses(change: dict[str, Any]) -> None:
    rec = {"seq": 0, "t": 0.0, "call_id": None, "prev": GENESIS, "kind": "session.end",
           "body": {"calls": 1}}
    validate_record(rec)
    with pytest.raises(TraceError):
        validate_record(dict(rec, **change))


def test_shipped_schema_is_generated() -> None:
    shipped = (ROOT / "failcore" / "trace_schema.json").read_text(encoding="utf-8")
    assert shipped == json_schema_text(), (
        "regenerate: python -m failcore._trace_schema > failcore/trace_schema.json")
    schema = json.loads(shipped)
    assert set(schema["discriminator"]["mapping"]) == KINDS


def test_schema_module_prints_the_schema() -> None:
    out = subprocess.run([sys.executable, "-m", "failcore._trace_schema"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out == json_schema_text()
