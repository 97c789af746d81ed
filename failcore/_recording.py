"""Trace front-ends the session writes through: none at all, one that scrubs secrets,
one that also hands every record to observers (OpenTelemetry, a live dashboard), and the
call context (labels such as an MCP request id) that ``call.start`` records carry."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from failcore._scrub import scrubber_for

# Observers see (kind, call_id, body) of every record, after secrets are scrubbed.
Observer = Callable[[str, "str | None", dict[str, Any]], None]

_CONTEXT: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "failcore_call_context", default=None)


@contextlib.contextmanager
def call_context(**labels: str | int) -> Iterator[None]:
    """Label the calls made inside this block; each ``call.start`` record carries them.

    ``with failcore.call_context(mcp_request_id=7): session.call(...)``. Nested blocks
    add to the outer labels. Values are recorded as strings (at most 32 labels, 200
    characters each); ``acall`` carries the labels into its worker thread.
    """
    for key in labels:
        if not key.isidentifier():
            raise ValueError(f"call_context label {key!r} must be an identifier")
    merged = {**(_CONTEXT.get() or {}), **{k: str(v)[:200] for k, v in labels.items()}}
    if len(merged) > 32:
        raise ValueError("call_context takes at most 32 labels")
    token = _CONTEXT.set(merged)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_context() -> dict[str, str] | None:
    return _CONTEXT.get()


class NoTrace:
    def record(self, kind: str, call_id: str | None, body: dict[str, Any], *,
               plain: bool = False) -> None:
        return None

    def close(self) -> None:
        return None


def mask(value: Any, masks: Mapping[str, str]) -> Any:
    """``value`` with every key of ``masks`` (values the scanner found) replaced by its
    marker, wherever it occurs; an integer whose digits were found (a card number) becomes
    its marker. Structure is kept."""
    if isinstance(value, str):
        for found, mark in masks.items():
            if found in value:
                value = value.replace(found, mark)
        return value
    if isinstance(value, dict):
        return {mask(k, masks): mask(v, masks) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [mask(v, masks) for v in value]
    if isinstance(value, int) and not isinstance(value, bool):
        return masks.get(str(abs(value)), value)
    return value


def scrub(value: Any, hidden: Sequence[str], masks: Mapping[str, str] | None = None) -> Any:
    """``value`` with every ``hidden`` secret replaced by ``<secret>`` in every common
    encoding (``failcore._scrub``) and every scanner finding in ``masks`` by its marker.

    The trace's scrubber, and the integrations' too: an error's text shown to an agent
    (an MCP tool result, a framework's tool error) hides what the trace hides.
    """
    if hidden:
        value = scrubber_for(tuple(hidden)).value(value)
    return mask(value, masks) if masks else value


class ScrubbingTrace:
    """Writes through to the trace with every secret replaced by ``<secret>`` in every common
    encoding (``failcore._scrub``) and every scanner finding by ``<redacted:KIND>``, wherever
    it appears: arguments, error messages, guard events, pre-check findings, results.
    ``scrubber`` also cleans the errors the call raises."""

    def __init__(self, trace: Any, hidden: list[str], masks: Mapping[str, str] | None = None) -> None:
        self._trace = trace
        self.scrubber = scrubber_for(tuple(hidden))
        # Longest first, so a value containing another is masked whole.
        self._masks = dict(sorted((masks or {}).items(), key=lambda kv: -len(kv[0])))

    def record(self, kind: str, call_id: str | None, body: dict[str, Any], *,
               plain: bool = False) -> Any:
        if not plain:  # plain: the caller's promise that the body is JSON-native already
            from failcore._trace_encoding import to_jsonable

            body = to_jsonable(body)
        body = self.scrubber.value(body)
        if self._masks:
            body = mask(body, self._masks)
        return self._trace.record(kind, call_id, body, plain=plain)


class ObservedTrace:
    """Writes through to the trace (or nothing), then hands the record to each observer.

    An observer that raises is reported once on stderr and removed: observing must never
    fail a call or lose a record.
    """

    def __init__(self, trace: Any, observers: list[Observer]) -> None:
        self._trace = trace
        self._observers = observers

    def record(self, kind: str, call_id: str | None, body: dict[str, Any], *,
               plain: bool = False) -> Any:
        out = self._trace.record(kind, call_id, body, plain=plain)
        for observer in tuple(self._observers):
            try:
                observer(kind, call_id, body)
            except Exception as exc:  # noqa: BLE001 - an observer's bug is not the call's
                import sys

                print(f"failcore: observer {observer!r} raised {type(exc).__name__}: {exc}; "
                      "removed", file=sys.stderr)
                try:
                    self._observers.remove(observer)
                except ValueError:
                    pass
        return out

    def close(self) -> None:
        self._trace.close()
