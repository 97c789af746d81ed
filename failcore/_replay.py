"""Replay: answer calls from a recorded trace, with no worker and no side effect."""

from __future__ import annotations

import json
import os
from typing import Any

from failcore._errors import (
    BudgetExceeded,
    CallCancelled,
    FailCoreError,
    InputValidationError,
    OutputValidationError,
    ReplayMismatch,
    ResourceLimitExceeded,
    SecurityError,
    ToolFailed,
    ToolTimeout,
    TraceError,
    WorkerCrashed,
)

_ERRORS: dict[str, type[FailCoreError]] = {
    "blocked": SecurityError, "invalid_input": InputValidationError,
    "invalid_output": OutputValidationError, "timeout": ToolTimeout, "crashed": WorkerCrashed,
    "resource": ResourceLimitExceeded, "failed": ToolFailed, "cancelled": CallCancelled,
    "budget": BudgetExceeded,
}


def _normal(value: Any) -> Any:
    """The JSON form a value takes in the trace, so recorded and live args compare equal."""
    from failcore._trace import to_jsonable

    return json.loads(json.dumps(to_jsonable(value), sort_keys=True))


class Replayer:
    """Recorded calls in order; each live call must match the next recorded one."""

    def __init__(self, path: str) -> None:
        from failcore._trace import read_trace

        if not os.path.exists(path):
            raise TraceError(f"replay trace {path!r} does not exist")
        records = read_trace(path)
        ends = {r["call_id"]: r["body"] for r in records if r["kind"] == "call.end"}
        self._calls = [(r["call_id"], r["body"], ends.get(r["call_id"]))
                       for r in records if r["kind"] == "call.start"]
        self._next = 0
        self.path = path

    def answer(self, trace: Any, call_id: str, name: str, tool: Any, kwargs: dict[str, Any]) -> Any:
        if self._next >= len(self._calls):
            raise ReplayMismatch(
                f"call {name!r} has no recorded counterpart: {self.path} holds only "
                f"{len(self._calls)} calls")
        rec_id, start, end = self._calls[self._next]
        self._next += 1
        args = tool.models.redact(kwargs) if tool is not None else kwargs
        if start["tool"] != name or _normal(args) != _normal(start["args"]):
            raise ReplayMismatch(
                f"replay diverged at recorded call {rec_id}: recorded {start['tool']}"
                f"({json.dumps(start['args'], sort_keys=True)[:300]}), got {name}"
                f"({json.dumps(_normal(args), sort_keys=True)[:300]})")
        if end is None:
            raise ReplayMismatch(f"recorded call {rec_id} has no result (the run was cut short)")
        trace.record("call.start", call_id, {"tool": name, "args": start["args"]})
        status = end["status"]
        body = {"tool": name, "status": "replayed", "result": end.get("result"),
                "error": end.get("error"), "duration_ms": 0.0}
        trace.record("call.end", call_id, body)
        if status in ("ok", "replayed") and end.get("error") is None:
            result = end.get("result")
            if isinstance(result, dict) and "$omitted" in result:
                raise ReplayMismatch(
                    f"recorded call {rec_id}: its result was not recorded ({result['$omitted']}, "
                    f"{result.get('reply_bytes')} bytes); record with a larger "
                    "Session(trace_result_bytes=...) to replay it")
            return tool.models.output_from_json(result) if tool is not None else result
        error = end.get("error") or {}
        cls = _ERRORS.get(status, FailCoreError)
        message = f"(replayed {rec_id}) {error.get('message', status)}"
        if cls is SecurityError:
            raise SecurityError(message, rule=error.get("rule", ""), target=error.get("target", ""),
                                layer=error.get("layer", ""))
        if cls is BudgetExceeded:
            raise BudgetExceeded(message, budget=error.get("budget", ""))
        if cls is ToolFailed:
            raise ToolFailed(message, remote_type=error.get("remote_type", ""),
                             remote_message=error.get("message", ""),
                             remote_traceback=error.get("traceback", ""))
        raise cls(message)
