"""Call budgets: how much a session, or one tool, may use before calls are refused.

A ``Budget`` bounds the number of calls, the calls in any 60-second window (sliding),
the total CPU seconds the workers report, the total wall time of the calls, and the
sum of numeric fields the tool returns (``sums={"usage.tokens": 100_000}``, a dotted
path into the result: dict keys, attributes, list indexes). Budgets are declared per
tool (``ToolMetadata(budget=...)``, a policy file's ``[tools.NAME] budget``) and per
session (``Session(budgets=...)``, a policy file's ``[budget]``); a call must fit all
that apply.

The ``BudgetLedger`` keeps the counters. Guarantees, under any mix of threads and
asyncio callers:

- **calls** and **calls_per_minute** are exact: ``reserve`` counts a call before it
  is dispatched, under one lock, so N concurrent callers against a limit of k get
  exactly k through; a reserved call that is not dispatched after all (approval
  refused) is ``release``d and does not count.
- **cpu_s**, **wall_s** and **sums** are known only after a call, so they are charged
  by ``settle`` and checked at the next ``reserve``: the call that crosses the limit
  completes, the next one is refused. Calls already in flight when the limit is
  crossed complete too (they were admitted under the old total).

A budget is spent when its used value reaches its limit. Refusals raise
``BudgetExceeded`` naming the budget, its limit and its current value.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from failcore._errors import BudgetExceeded

WINDOW_S = 60.0
_COUNTERS = ("calls", "calls_per_minute", "cpu_s", "wall_s")


def _number(name: str, value: Any, integer: bool) -> None:
    if value is None:
        return
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value <= 0:
        kind = "a positive int" if integer else "a positive number"
        raise ValueError(f"Budget.{name} must be {kind} or None, got {value!r}")


@dataclass(frozen=True)
class Budget:
    """Limits on use across calls. ``None`` means unlimited; every field is optional.

    ``calls``: calls in total. ``calls_per_minute``: calls in any 60-second window.
    ``cpu_s``: CPU seconds the tool's workers used (as they report it). ``wall_s``:
    seconds the calls took, dispatch to reply, summed (concurrent calls add up).
    ``sums``: ``{"usage.tokens": 100_000}``: the total of a numeric field of the results.
    """

    calls: int | None = None
    calls_per_minute: int | None = None
    cpu_s: float | None = None
    wall_s: float | None = None
    sums: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _number("calls", self.calls, True)
        _number("calls_per_minute", self.calls_per_minute, True)
        _number("cpu_s", self.cpu_s, False)
        _number("wall_s", self.wall_s, False)
        if not isinstance(self.sums, Mapping):
            raise ValueError(f"Budget.sums must be a mapping of field path -> limit, got {self.sums!r}")
        for path, limit in self.sums.items():
            if not isinstance(path, str) or not path or any(not p for p in path.split(".")):
                raise ValueError(f"Budget.sums key {path!r} must be a dotted field path, "
                                 "e.g. 'usage.tokens'")
            _number(f"sums[{path!r}]", limit, False)
        object.__setattr__(self, "sums", dict(self.sums))

    def __hash__(self) -> int:
        return hash((self.calls, self.calls_per_minute, self.cpu_s, self.wall_s,
                     tuple(sorted(self.sums.items()))))

    @property
    def empty(self) -> bool:
        return all(getattr(self, n) is None for n in _COUNTERS) and not self.sums

    def limits(self) -> dict[str, float]:
        """Every set limit by counter name (``"sum:usage.tokens"`` for a sum)."""
        out: dict[str, float] = {n: getattr(self, n) for n in _COUNTERS if getattr(self, n) is not None}
        out.update((f"sum:{path}", limit) for path, limit in sorted(self.sums.items()))
        return out

    def tighter(self, other: Budget | None) -> Budget:
        """Both budgets at once: the smaller limit of each counter."""
        if other is None:
            return self

        def low(a: Any, b: Any) -> Any:
            return b if a is None else a if b is None else min(a, b)

        sums = dict(self.sums)
        for path, limit in other.sums.items():
            sums[path] = low(sums.get(path), limit)
        return Budget(low(self.calls, other.calls),
                      low(self.calls_per_minute, other.calls_per_minute),
                      low(self.cpu_s, other.cpu_s), low(self.wall_s, other.wall_s), sums)


def field_value(value: Any, path: str) -> float | None:
    """The number at dotted ``path`` in a result (dict keys, attributes, list indexes), or None."""
    current = value
    for part in path.split("."):
        if isinstance(current, Mapping):
            if part not in current:
                return None
            current = current[part]
        elif isinstance(current, Sequence) and not isinstance(current, str | bytes) \
                and part.lstrip("-").isdigit():
            try:
                current = current[int(part)]
            except IndexError:
                return None
        else:
            current = getattr(current, part, None)
            if current is None:
                return None
    if isinstance(current, bool) or not isinstance(current, int | float):
        return None
    return float(current) if math.isfinite(current) and current >= 0 else None


class _Counter:
    """Use of one scope (the session, or one tool)."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.calls = 0
        self.window: deque[float] = deque()
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self.sums: dict[str, float] = dict.fromkeys(budget.sums, 0.0)

    def used(self, now: float) -> dict[str, float]:
        while self.window and self.window[0] <= now - WINDOW_S:
            self.window.popleft()
        out: dict[str, float] = {}
        b = self.budget
        if b.calls is not None:
            out["calls"] = self.calls
        if b.calls_per_minute is not None:
            out["calls_per_minute"] = len(self.window)
        if b.cpu_s is not None:
            out["cpu_s"] = round(self.cpu_s, 6)
        if b.wall_s is not None:
            out["wall_s"] = round(self.wall_s, 6)
        out.update((f"sum:{p}", round(v, 6)) for p, v in sorted(self.sums.items()))
        return out


@dataclass
class Reservation:
    """One admitted call: the scopes it counts against and when it was admitted."""

    scopes: tuple[str, ...]
    at: float
    settled: bool = False


@dataclass(frozen=True)
class Charge:
    """What one call used: charged to each of its scopes by ``settle``."""

    cpu_s: float = 0.0
    wall_s: float = 0.0
    sums: Mapping[str, float] = field(default_factory=dict)


def _scope_label(scope: str) -> str:
    return "session" if scope == "session" else f"tool {scope.split(':', 1)[1]!r}"


class BudgetLedger:
    """The counters of every scope with a budget. Thread-safe; ``clock`` is injectable."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._counters: dict[str, _Counter] = {}

    def add_scope(self, scope: str, budget: Budget) -> None:
        """Give ``scope`` ("session" or "tool:NAME") a budget (once, at registration)."""
        if not budget.empty:
            with self._lock:
                self._counters[scope] = _Counter(budget)

    def has(self, scope: str) -> bool:
        return scope in self._counters

    def reserve(self, scopes: Sequence[str]) -> tuple[Reservation, list[dict[str, Any]]]:
        """Admit one call against ``scopes`` or raise ``BudgetExceeded``; returns the
        reservation and the counters as they were (for the trace)."""
        with self._lock:
            now = self._clock()
            state: list[dict[str, Any]] = []
            exceeded: tuple[str, str, float, float] | None = None
            for scope in scopes:
                counter = self._counters.get(scope)
                if counter is None:
                    continue
                limits = counter.budget.limits()
                for name, used in counter.used(now).items():
                    state.append({"scope": scope, "budget": name, "used": used,
                                  "limit": limits[name]})
                    if exceeded is None and used >= limits[name]:
                        exceeded = (scope, name, limits[name], used)
            if exceeded is not None:
                scope, name, limit, used = exceeded
                raise BudgetExceeded(_message(scope, name, limit, used), budget=f"{scope}.{name}",
                                     limit=limit, used=used, state=state)
            for scope in scopes:
                counter = self._counters.get(scope)
                if counter is not None:
                    counter.calls += 1
                    counter.window.append(now)
            return Reservation(tuple(s for s in scopes if s in self._counters), now), state

    def release(self, reservation: Reservation) -> None:
        """Undo a reservation whose call was never dispatched."""
        with self._lock:
            if reservation.settled:
                return
            reservation.settled = True
            for scope in reservation.scopes:
                counter = self._counters[scope]
                counter.calls -= 1
                try:
                    counter.window.remove(reservation.at)
                except ValueError:
                    pass  # already slid out of the window

    def settle(self, reservation: Reservation, charge: Charge) -> list[dict[str, Any]]:
        """Charge what a dispatched call used; returns the counters after it."""
        with self._lock:
            state: list[dict[str, Any]] = []
            if reservation.settled:
                return state
            reservation.settled = True
            now = self._clock()
            for scope in reservation.scopes:
                counter = self._counters[scope]
                counter.cpu_s += charge.cpu_s
                counter.wall_s += charge.wall_s
                for path, amount in charge.sums.items():
                    if path in counter.sums:
                        counter.sums[path] += amount
                limits = counter.budget.limits()
                state.extend({"scope": scope, "budget": name, "used": used, "limit": limits[name]}
                             for name, used in counter.used(now).items())
            return state

    def sum_paths(self, scopes: Sequence[str]) -> tuple[str, ...]:
        """Every result field any of ``scopes`` sums."""
        paths: set[str] = set()
        for scope in scopes:
            counter = self._counters.get(scope)
            if counter is not None:
                paths.update(counter.budget.sums)
        return tuple(sorted(paths))


def _message(scope: str, name: str, limit: float, used: float) -> str:
    what = {"calls": f"{used:g} of {limit:g} calls made",
            "calls_per_minute": f"{used:g} calls in the last {WINDOW_S:g} s, the limit is {limit:g}",
            "cpu_s": f"{used:g} of {limit:g} CPU seconds used",
            "wall_s": f"{used:g} of {limit:g} seconds of call time used"}.get(
        name, f"{name.removeprefix('sum:')} totals {used:g}, the limit is {limit:g}")
    fix = ("wait for the window to slide" if name == "calls_per_minute" else
           "start a new session")
    field_name = name if not name.startswith("sum:") else f"sums[{name[4:]!r}]"
    where = ("Session(budgets=Budget(...)) or the policy's [budget]" if scope == "session"
             else "ToolMetadata(budget=Budget(...)) or the policy's [tools.NAME] budget")
    return (f"{_scope_label(scope)} budget {name} is spent: {what}; {fix}, or raise "
            f"Budget({field_name}=...) in {where} [budget: {scope}.{name}]")
