"""Trace front-ends the session writes through: none at all, or one that scrubs secrets."""

from __future__ import annotations

from typing import Any


class NoTrace:
    def record(self, kind: str, call_id: str | None, body: dict[str, Any], *,
               plain: bool = False) -> None:
        return None

    def close(self) -> None:
        return None


class ScrubbingTrace:
    """Writes through to the trace with every secret value replaced by ``<secret>``,
    wherever it appears: error messages, guard events, pre-check findings, results."""

    def __init__(self, trace: Any, hidden: list[str]) -> None:
        self._trace = trace
        self._hidden = hidden

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._hidden:
                if secret in value:
                    value = value.replace(secret, "<secret>")
            return value
        if isinstance(value, dict):
            return {self._scrub(k): self._scrub(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._scrub(v) for v in value]
        return value

    def record(self, kind: str, call_id: str | None, body: dict[str, Any], *,
               plain: bool = False) -> Any:
        from failcore._validation import to_jsonable

        return self._trace.record(kind, call_id, self._scrub(to_jsonable(body)))
