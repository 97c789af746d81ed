"""Approval: a person (or a program standing in for one) says yes before a risky call runs.

``Session(approve=callback)`` is asked before every call of a HIGH or CRITICAL tool and
of every tool a policy marks ``approve = true``. The callback gets an
``ApprovalRequest`` (tool, call id, risk, why approval is asked, the arguments with
secret arguments and scan findings masked, the capabilities granted) and returns
``True``/``False`` or an ``ApprovalDecision`` (approved, who decided, why).

Refusal is the default whenever anything is off: a ``False``, a decision that is not
one of those types, an exception in the callback, no answer within
``approval_timeout_s``. The call then raises ``SecurityError`` (layer ``approval``) and
never reaches a worker.

Sync and async callbacks both work. A sync callback runs on a helper thread, so the
timeout holds even when it blocks (the thread is left to finish on its own; it cannot be
killed). A coroutine function, or a callable that returns an awaitable, is awaited: on
the caller's event loop for ``acall`` (so it can use that loop's resources), on a
private loop thread of the session for ``call``. A timed-out coroutine is cancelled.

Without a callback, HIGH and CRITICAL tools run as they always have (nothing is asked
or recorded); a tool a policy marks ``approve = true`` cannot be registered in a
session that has no callback (``RegistrationError``), so a policy's demand for a human
is never silently dropped.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Decision = Literal["approved", "denied", "timeout", "error"]

# The event loop of the acall being served, so an async callback can run on it.
caller_loop: contextvars.ContextVar[asyncio.AbstractEventLoop | None] = contextvars.ContextVar(
    "failcore_caller_loop", default=None)


@dataclass(frozen=True)
class ApprovalRequest:
    """What the approver is shown. ``args`` never hold a secret: arguments declared secret
    read ``<secret>``, and every scanner finding reads ``<redacted:KIND>``."""

    tool: str
    call_id: str
    risk_level: str
    reasons: tuple[str, ...]
    args: dict[str, Any]
    grants: tuple[str, ...]
    context: dict[str, str] | None = None


@dataclass(frozen=True)
class ApprovalDecision:
    """An approver's answer: ``approved``, and optionally who decided and why."""

    approved: bool
    by: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class ApprovalOutcome:
    """What happened: the decision, who, why, and how long the approver took."""

    decision: Decision
    by: str | None = None
    reason: str | None = None
    waited_ms: float = 0.0

    @property
    def approved(self) -> bool:
        return self.decision == "approved"

    def to_json(self, reasons: tuple[str, ...]) -> dict[str, Any]:
        return {"decision": self.decision, "by": self.by, "reason": self.reason,
                "required_by": list(reasons), "waited_ms": round(self.waited_ms, 3)}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return str(value)[:200]


def _interpret(answer: Any) -> tuple[Decision, str | None, str | None]:
    if isinstance(answer, bool):
        return ("approved" if answer else "denied"), None, None
    if isinstance(answer, ApprovalDecision):
        if not isinstance(answer.approved, bool):
            return "error", None, "ApprovalDecision.approved must be True or False"
        return ("approved" if answer.approved else "denied"), _text(answer.by), _text(answer.reason)
    return "error", None, (f"the approve callback returned {type(answer).__name__}; return True, "
                           "False or ApprovalDecision(...)")


class Approver:
    """Asks one callback, with a timeout, from any thread; owns the private loop thread."""

    def __init__(self, callback: Callable[[ApprovalRequest], Any], timeout_s: float) -> None:
        if not callable(callback):
            raise TypeError(f"approve must be a callable, got {callback!r}")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, int | float) or timeout_s <= 0:
            raise ValueError(f"approval_timeout_s must be a positive number, got {timeout_s!r}")
        self.callback = callback
        self.timeout_s = float(timeout_s)
        # A coroutine function, or an object whose __call__ is one (type(...).__call__,
        # not getattr: the bound method of an instance).
        self._is_async = inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
            type(callback).__call__)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def decide(self, request: ApprovalRequest) -> ApprovalOutcome:
        """Ask, wait at most ``timeout_s``, and say what was decided; never raises."""
        started = time.monotonic()
        deadline = started + self.timeout_s
        try:
            if self._is_async:
                answer = self._await(self.callback(request), deadline)
            else:
                answer = self._run_sync(request, deadline)
                if inspect.isawaitable(answer):
                    answer = self._await(answer, deadline)
        except TimeoutError:
            return ApprovalOutcome("timeout", None, f"no decision within approval_timeout_s="
                                   f"{self.timeout_s:g}", _ms(started))
        except Exception as exc:  # noqa: BLE001 - a broken approver refuses, it does not crash the call
            return ApprovalOutcome("error", None, f"the approve callback raised "
                                   f"{type(exc).__name__}: {exc}"[:200], _ms(started))
        decision, by, reason = _interpret(answer)
        return ApprovalOutcome(decision, by, reason, _ms(started))

    def _run_sync(self, request: ApprovalRequest, deadline: float) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        ctx = contextvars.copy_context()

        def run() -> None:
            try:
                future.set_result(ctx.run(self.callback, request))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(exc)

        threading.Thread(target=run, name="failcore-approve", daemon=True).start()
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            raise TimeoutError from None

    def _await(self, awaitable: Any, deadline: float) -> Any:
        loop = caller_loop.get()
        if loop is None or loop.is_closed() or not loop.is_running():
            loop = self._private_loop()

        async def bounded() -> Any:
            return await asyncio.wait_for(awaitable, max(0.0, deadline - time.monotonic()))

        future = asyncio.run_coroutine_threadsafe(bounded(), loop)
        try:
            # A little past the deadline: wait_for inside the loop cancels the coroutine.
            return future.result(timeout=max(0.0, deadline - time.monotonic()) + 1.0)
        except TimeoutError:
            future.cancel()
            raise TimeoutError from None

    def _private_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="failcore-approve-loop",
                                          daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def close(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5.0)
            if not thread.is_alive():
                loop.close()


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000
