"""Budgets: exact call counts under concurrent threads and asyncio, the sliding minute,
CPU / wall / result-field sums that stop the next call, scopes, policy files, the trace."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import failcore
from failcore import (
    Budget,
    BudgetExceeded,
    FailCoreError,
    ReplayMismatch,
    Session,
    ToolFailed,
    ToolMetadata,
    load_policy,
)
from failcore._budgets import BudgetLedger, Charge, field_value
from failcore._policy import check_policy_file
from failcore._trace import read_trace, verify_trace

# --- pure: Budget ------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    {"calls": 0}, {"calls": 1.5}, {"calls": True}, {"calls_per_minute": -1},
    {"cpu_s": float("nan")}, {"wall_s": "10"}, {"sums": {"": 1}}, {"sums": {"a..b": 1}},
    {"sums": {"tokens": 0}}, {"sums": ["tokens"]},
])
def test_bad_budgets_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="Budget"):
        Budget(**bad)


def test_tighter_takes_the_smaller_limit() -> None:
    a = Budget(calls=10, cpu_s=5, sums={"usage.tokens": 100})
    b = Budget(calls=20, wall_s=3, sums={"usage.tokens": 50, "cost": 2})
    both = a.tighter(b)
    assert both == Budget(calls=10, cpu_s=5, wall_s=3, sums={"usage.tokens": 50, "cost": 2})
    assert a.tighter(None) is a


class Usage:
    def __init__(self, tokens: Any) -> None:
        self.tokens = tokens


@pytest.mark.parametrize(("value", "path", "expected"), [
    ({"usage": {"tokens": 7}}, "usage.tokens", 7.0),
    ({"usage": Usage(3.5)}, "usage.tokens", 3.5),
    ({"items": [{"n": 1}, {"n": 2}]}, "items.1.n", 2.0),
    ({"usage": {"tokens": True}}, "usage.tokens", None),
    ({"usage": {"tokens": "7"}}, "usage.tokens", None),
    ({"usage": {"tokens": -5}}, "usage.tokens", None),
    ({"usage": {}}, "usage.tokens", None),
    ({"items": []}, "items.0.n", None),
    (None, "usage.tokens", None),
])
def test_field_value(value: Any, path: str, expected: float | None) -> None:
    assert field_value(value, path) == expected


# --- pure: the ledger --------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_calls_are_exact_and_release_gives_back() -> None:
    ledger = BudgetLedger()
    ledger.add_scope("session", Budget(calls=2))
    first, _ = ledger.reserve(["session"])
    ledger.reserve(["session"])
    with pytest.raises(BudgetExceeded) as info:
        ledger.reserve(["session"])
    err = info.value
    assert (err.budget, err.limit, err.used) == ("session.calls", 2, 2)
    assert "[budget: session.calls]" in str(err) and "Budget(calls=...)" in str(err)
    ledger.release(first)
    ledger.release(first)  # twice is once
    ledger.reserve(["session"])


def test_calls_per_minute_is_a_sliding_window() -> None:
    clock = Clock()
    ledger = BudgetLedger(clock)
    ledger.add_scope("session", Budget(calls_per_minute=3))
    for step in (0, 20, 40):
        clock.now = 1000 + step
        ledger.reserve(["session"])
    clock.now = 1059.9
    with pytest.raises(BudgetExceeded, match="3 calls in the last 60 s"):
        ledger.reserve(["session"])
    clock.now = 1060.0  # the call at t=0 slid out; those at 20 and 40 still count
    ledger.reserve(["session"])
    with pytest.raises(BudgetExceeded):
        ledger.reserve(["session"])
    clock.now = 1080.0
    ledger.reserve(["session"])


def test_usage_budgets_stop_the_next_call() -> None:
    ledger = BudgetLedger()
    ledger.add_scope("session", Budget(cpu_s=1.0, wall_s=10, sums={"usage.tokens": 100}))
    r, _ = ledger.reserve(["session"])
    state = ledger.settle(r, Charge(cpu_s=0.6, wall_s=1, sums={"usage.tokens": 60}))
    assert {s["budget"]: s["used"] for s in state} == {"cpu_s": 0.6, "wall_s": 1,
                                                       "sum:usage.tokens": 60}
    r, _ = ledger.reserve(["session"])  # 0.6 < 1.0: admitted; this call crosses the limit
    ledger.settle(r, Charge(cpu_s=0.6, wall_s=1, sums={"usage.tokens": 10}))
    with pytest.raises(BudgetExceeded) as info:
        ledger.reserve(["session"])
    assert info.value.budget == "session.cpu_s" and info.value.used == pytest.approx(1.2)


def test_a_refused_call_changes_no_scope() -> None:
    ledger = BudgetLedger()
    ledger.add_scope("session", Budget(calls=5))
    ledger.add_scope("tool:a", Budget(calls=1))
    ledger.reserve(["session", "tool:a"])
    with pytest.raises(BudgetExceeded, match="tool 'a' budget calls"):
        ledger.reserve(["session", "tool:a"])
    _, state = ledger.reserve(["session"])
    assert state == [{"scope": "session", "budget": "calls", "used": 1, "limit": 5}]


def test_ledger_is_exact_under_threads() -> None:
    ledger = BudgetLedger()
    ledger.add_scope("session", Budget(calls=10, calls_per_minute=10))
    barrier = threading.Barrier(32)
    admitted: list[int] = []

    def worker() -> None:
        barrier.wait()
        for _ in range(5):
            try:
                ledger.reserve(["session"])
                admitted.append(1)
            except BudgetExceeded:
                pass

    threads = [threading.Thread(target=worker) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 10


# --- in a session ------------------------------------------------------------------------


def work(n: int = 0) -> dict[str, Any]:
    time.sleep(0.05)  # calls overlap
    return {"n": n, "usage": {"tokens": 40}}


def burn(seconds: float) -> float:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return seconds


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def fail() -> None:
    raise RuntimeError("boom")


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[tuple[Session, Path]]:
    trace = tmp_path / "trace.jsonl"
    with Session(trace=trace, budgets=Budget(calls=5), max_workers_per_tool=4) as s:
        s.register("work", work)
        yield s, trace


def test_threads_get_exactly_the_budgeted_calls(traced: tuple[Session, Path]) -> None:
    s, trace = traced
    results: list[str] = []
    barrier = threading.Barrier(16)

    def caller(i: int) -> None:
        barrier.wait()
        try:
            s.call("work", n=i)
            results.append("ok")
        except BudgetExceeded:
            results.append("budget")

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count("ok") == 5 and results.count("budget") == 11
    s.close()
    records = read_trace(trace)
    assert verify_trace(trace).ok
    ends = [r["body"] for r in records if r["kind"] == "call.end"]
    assert sum(e["status"] == "budget" for e in ends) == 11
    refused = next(e for e in ends if e["status"] == "budget")
    assert refused["error"]["type"] == "BudgetExceeded"
    assert refused["error"]["budget"] == "session.calls"
    checks = [r["body"] for r in records if r["kind"] == "budget.check"]
    assert sum(c["ok"] for c in checks) == 5 and all(
        c["exceeded"] == "session.calls" for c in checks if not c["ok"])
    charges = [r["body"] for r in records if r["kind"] == "budget.charge"]
    assert len(charges) == 5 and all(c["wall_s"] >= 0.04 for c in charges)


def test_asyncio_gets_exactly_the_budgeted_calls(traced: tuple[Session, Path]) -> None:
    s, _ = traced

    async def main() -> list[Any]:
        return await asyncio.gather(*(s.acall("work", n=i) for i in range(16)),
                                    return_exceptions=True)

    outcomes = asyncio.run(main())
    assert sum(isinstance(o, dict) for o in outcomes) == 5
    assert sum(isinstance(o, BudgetExceeded) for o in outcomes) == 11


def test_a_result_field_sum_stops_the_next_call() -> None:
    with Session(budgets=Budget(sums={"usage.tokens": 100})) as s:
        s.register("work", work)
        for _ in range(3):  # 0, 40, 80 used before each: admitted; the third reaches 120
            s.call("work")
        with pytest.raises(BudgetExceeded) as info:
            s.call("work")
    assert info.value.budget == "session.sum:usage.tokens"
    assert info.value.used == 120 and info.value.limit == 100
    assert "usage.tokens totals 120" in str(info.value)


def test_cpu_seconds_reported_by_the_worker_are_charged(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    with Session(trace=trace, budgets=Budget(cpu_s=0.5)) as s:
        s.register("burn", burn)
        s.call("burn", seconds=0.3)
        s.call("burn", seconds=0.3)
        with pytest.raises(BudgetExceeded, match="CPU seconds"):
            s.call("burn", seconds=0.3)
    charges = [r["body"] for r in read_trace(trace) if r["kind"] == "budget.charge"]
    assert [c["cpu_s"] >= 0.25 for c in charges] == [True, True]


def test_wall_seconds_are_charged() -> None:
    with Session(budgets=Budget(wall_s=0.3)) as s:
        s.register("nap", nap)
        s.call("nap", seconds=0.2)
        s.call("nap", seconds=0.2)
        with pytest.raises(BudgetExceeded, match="seconds of call time"):
            s.call("nap", seconds=0.01)


def test_failed_calls_count_invalid_ones_do_not() -> None:
    with Session(budgets=Budget(calls=2)) as s:
        s.register("fail", fail)
        with pytest.raises(FailCoreError):
            s.call("fail", unexpected=1)  # refused by validation: never dispatched
        for _ in range(2):
            with pytest.raises(ToolFailed):
                s.call("fail")
        with pytest.raises(BudgetExceeded):
            s.call("fail")


def test_per_tool_budgets_are_separate() -> None:
    with Session() as s:
        s.register("once", work, ToolMetadata(budget=Budget(calls=1)))
        s.register("free", work)
        s.call("once")
        with pytest.raises(BudgetExceeded, match="tool 'once' budget calls"):
            s.call("once")
        s.call("free")
        s.call("free")


def test_the_session_is_usable_after_a_budget_stop() -> None:
    with Session(budgets=Budget(calls=1)) as s:
        s.register("work", work)
        s.register("other", work, ToolMetadata(budget=Budget(calls=5)))
        s.call("work")
        for _ in range(3):
            with pytest.raises(BudgetExceeded):
                s.call("other")  # the session budget covers every tool


def test_exported_and_in_the_hierarchy() -> None:
    assert failcore.BudgetExceeded is BudgetExceeded and issubclass(BudgetExceeded, FailCoreError)
    assert failcore.Budget is Budget


def test_replay_raises_the_recorded_budget_stop(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    with Session(trace=trace, budgets=Budget(calls=1)) as s:
        s.register("work", work)
        s.call("work")
        with pytest.raises(BudgetExceeded):
            s.call("work")
    with Session(replay=trace) as r:
        r.register("work", work)
        assert r.call("work")["n"] == 0
        with pytest.raises(BudgetExceeded) as info:
            r.call("work")
        assert info.value.budget == "session.calls"
        with pytest.raises(ReplayMismatch):
            r.call("work")


# --- policy files ------------------------------------------------------------------------

POLICY = """
[policy]
name = "metered"

[budget]
calls = 3
sums = { "usage.tokens" = 1000 }

[tools.work]
budget = { calls_per_minute = 2 }
"""


def test_policy_file_budgets(tmp_path: Path) -> None:
    path = tmp_path / "metered.toml"
    path.write_text(POLICY)
    assert check_policy_file(path) == []
    policy = load_policy(path)
    assert policy.budget == Budget(calls=3, sums={"usage.tokens": 1000})
    assert policy.tool_budget("work") == Budget(calls_per_minute=2)
    with Session(validator=policy, budgets=Budget(calls=10)) as s:
        s.register("work", work)
        s.register("other", work)
        s.call("work")
        s.call("work")
        with pytest.raises(BudgetExceeded, match="tool 'work' budget calls_per_minute"):
            s.call("work")
        s.call("other")
        with pytest.raises(BudgetExceeded, match="session budget calls"):  # 3 = min(3, 10)
            s.call("other")


def test_policy_file_budget_problems_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[policy]\nname = "x"\n[budget]\ncalls = -1\ncpu_s = "1"\nhours = 2\n'
                    'sums = { "usage.tokens" = 0 }\n[tools.a]\napprove = "yes"\nbudget = 5\n'
                    'colour = 1\n')
    text = "\n".join(check_policy_file(path))
    for needle in ("budget.calls", "budget.cpu_s", "budget.hours", 'budget.sums."usage.tokens"',
                   "tools.a.approve", "'tools.a.budget' must be a table", "tools.a.colour"):
        assert needle in text, needle


def test_included_budgets_compose(tmp_path: Path) -> None:
    (tmp_path / "base.toml").write_text('[policy]\nname = "base"\n[budget]\ncalls = 5\ncpu_s = 9\n')
    (tmp_path / "top.toml").write_text('[policy]\nname = "top"\ninclude = ["base.toml"]\n'
                                       '[budget]\ncalls = 7\nwall_s = 3\n')
    assert load_policy(tmp_path / "top.toml").budget == Budget(calls=5, cpu_s=9, wall_s=3)
