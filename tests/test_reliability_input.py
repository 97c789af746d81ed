"""Reliability: bad input from the agent. Unknown tools, garbage arguments, huge and
deeply nested values, undecodable bytes and lone surrogates, arguments that cannot be
sent to a worker. Each gives one clear FailCoreError (or a correct answer), the trace
keeps every call (call.start and call.end, ``verify`` passes), and the next call works.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_reliability_support import (
    TracedSession,
    call_end,
    call_within,
    children,
    settled_children,
)

from failcore import (
    FailCoreError,
    InputValidationError,
    SecurityError,
    ToolMetadata,
)
from failcore._trace import read_trace


@pytest.fixture
def run(tmp_path: Path) -> Iterator[TracedSession]:
    traced = TracedSession(tmp_path / "trace.jsonl")
    traced.session.register("add", add)
    traced.session.register("echo", echo)
    traced.session.register("length", length)
    yield traced
    traced.session.close()


def add(a: int, b: int) -> int:
    return a + b


def echo(x: Any) -> Any:
    return x


def length(text: str) -> int:
    return len(text)


def next_call_works(run: TracedSession) -> None:
    assert run.session.call("add", a=20, b=22) == 42


def nested_list(depth: int) -> list[Any]:
    root: list[Any] = []
    cur = root
    for _ in range(depth):
        nxt: list[Any] = []
        cur.append(nxt)
        cur = nxt
    return root


def nested_dict(depth: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    cur = root
    for _ in range(depth):
        cur["k"] = {}
        cur = cur["k"]
    return root


@pytest.mark.parametrize("name", ["nope", "", "x" * 10_000, "a\ud800b", "add\x00", "../add",
                                  "add "])
def test_unknown_tool_is_input_error_and_traced(run: TracedSession, name: str) -> None:
    with pytest.raises(InputValidationError, match="unknown tool"):
        run.session.call(name, a=1, b=2)
    end = call_end(run.path)
    assert end["status"] == "invalid_input" and len(end["tool"]) <= 200
    next_call_works(run)
    run.finish()


GARBAGE = [
    {"a": "one", "b": 2},                 # wrong type
    {"a": 1.5, "b": 2},                   # lossy float for int
    {"a": [1], "b": {"x": 1}},            # containers for scalars
    {"a": None, "b": None},
    {"a": 1, "b": 2, "c": 3},             # extra argument
    {"a": 1},                             # missing argument
    {},
    {"a": 1, "b": 2, "not an identifier": 3},
    {"a": 10**400, "b": 1},               # too big to be anything but a Python int
    {"a": float("nan"), "b": 1},
    {"a": object(), "b": 1},
]


@pytest.mark.parametrize("kwargs", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_arguments_are_one_clear_error(run: TracedSession, kwargs: dict[str, Any]) -> None:
    try:
        result = run.session.call("add", **kwargs)
    except InputValidationError as exc:
        assert str(exc).startswith("add: "), exc  # names the tool and the argument
        assert call_end(run.path)["status"] == "invalid_input"
    else:  # pydantic's lax mode may coerce (e.g. a huge int is still an int): then it is right
        assert result == kwargs["a"] + kwargs["b"]
    next_call_works(run)
    run.finish()


def test_ten_megabyte_string_argument(run: TracedSession) -> None:
    """Works (the worker gets it whole); the trace records it (10 MB line) and verifies."""
    text = "é" + "x" * (10 * 1024 * 1024)
    assert run.session.call("length", text=text) == len(text)
    next_call_works(run)
    run.finish()


@pytest.mark.parametrize("value", [nested_list(100_000), nested_dict(100_000)],
                         ids=["list", "dict"])
def test_deeply_nested_argument_is_refused_not_a_crash(run: TracedSession, value: Any) -> None:
    """100k levels: the parent neither recurses to death nor passes it on unchecked."""
    with pytest.raises((InputValidationError, SecurityError)) as info:
        run.session.call("echo", x=value)
    if isinstance(info.value, SecurityError):
        assert info.value.rule == "precheck: arguments nested too deeply"
    next_call_works(run)
    run.finish()


def test_moderately_nested_argument_hits_the_precheck_bound(run: TracedSession) -> None:
    assert run.session.call("echo", x=nested_list(30)) == nested_list(30)
    with pytest.raises(SecurityError) as info:
        run.session.call("echo", x=nested_list(100))
    assert info.value.rule == "precheck: arguments nested too deeply"
    assert call_end(run.path)["status"] == "blocked"
    run.finish()


def test_very_wide_argument_hits_the_precheck_bound(run: TracedSession) -> None:
    with pytest.raises(SecurityError) as info:
        run.session.call("echo", x=list(range(20_000)))
    assert info.value.rule == "precheck: arguments too large to inspect"
    assert run.session.call("echo", x=list(range(1000))) == list(range(1000))
    run.finish()


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"ok\x00\x80"])
def test_non_utf8_bytes_for_a_str_argument_is_input_error(run: TracedSession, raw: bytes) -> None:
    with pytest.raises(InputValidationError, match="text"):
        run.session.call("length", text=raw)
    assert run.session.call("echo", x=raw) == raw  # where bytes are accepted they pass intact
    next_call_works(run)
    run.finish()


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\ud83d\ude00", "x\x00y\udcff"])
def test_lone_surrogates_do_not_break_the_trace(run: TracedSession, text: str) -> None:
    """F4 (fixed in 3d6ca52): one lone surrogate once turned the traced args into a string."""
    assert run.session.call("length", text=text) == len(text)
    assert run.session.call("echo", x={text: [text]}) == {text: [text]}
    starts = [r for r in read_trace(run.path) if r["kind"] == "call.start"]
    assert all(isinstance(r["body"]["args"], dict) for r in starts)
    next_call_works(run)
    run.finish()


UNSENDABLE = [threading.Lock(), (i for i in range(3)), lambda: 1]


@pytest.mark.parametrize("isolation", ["tool", "call"])
@pytest.mark.parametrize("value", UNSENDABLE, ids=["lock", "generator", "lambda"])
def test_unpicklable_args_are_refused_and_never_hold_a_worker(
    run: TracedSession, isolation: str, value: Any
) -> None:
    """F2 (fixed in 3d6ca52): each refusal once leaked a worker slot; the third deadlocked."""
    run.session.register("echo2", echo, ToolMetadata(isolation=isolation))  # type: ignore[arg-type]
    assert run.session.call("echo2", x=1) == 1
    settled = len(settled_children())
    for _ in range(4):  # more than max_workers_per_tool
        try:
            call_within(run.session, "echo2", 10, x=value)
        except InputValidationError:
            pass
        except FailCoreError as exc:
            pytest.fail(f"unclear error for an unsendable argument: {exc!r}")
    assert call_within(run.session, "echo2", 10, x=2) == 2
    assert len(settled_children()) <= settled, children()
    run.finish()


def test_an_open_file_argument_is_refused(run: TracedSession, tmp_path: Path) -> None:
    with open(tmp_path / "f.txt", "w") as handle, pytest.raises(InputValidationError):
        call_within(run.session, "echo", 10, x=handle)
    next_call_works(run)
    run.finish()
