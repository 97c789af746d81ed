"""OpenTelemetry for a session: a span per call, events per decision, call and block metrics.

``instrument(session)`` (``pip install 'failcore[otel]'``; export with the OpenTelemetry
SDK you configure) adds a session observer that turns trace records into telemetry as
they are written, so it sees exactly what the trace sees, secrets already replaced by
``<secret>``. Nothing else is read: no arguments, no results.

Spans: one per call, ``execute_tool {tool}`` (the GenAI semantic conventions' tool span,
``gen_ai.operation.name=execute_tool``, ``gen_ai.tool.name``), a child of the span current
where ``call``/``acall`` was made. Attributes: ``failcore.tool``, ``failcore.call_id``,
``failcore.status``, ``failcore.isolation``, ``failcore.worker``, ``failcore.duration_ms``,
``error.type``, and for a refused call ``failcore.block.rule`` / ``failcore.block.layer``;
``call_context`` labels as ``failcore.context.<label>`` (an MCP request id, a tool call
id). Status ERROR for every outcome but ``ok``.

Span events: ``failcore.precheck`` (an argument judged before dispatch),
``failcore.guard`` (an operation the worker's guards judged), ``failcore.connect`` (a
connection the parent brokered, judged on the resolved address), each with its action,
rule, reason and target; ``failcore.worker.kill`` with its reason (``timeout``,
``cancelled``, a watchdog finding).

Metrics: ``failcore.calls`` (by tool and status), ``failcore.blocks`` (every refused
operation, by tool, rule and layer) and the ``failcore.call.duration`` histogram (ms, by
tool and status).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from failcore._report import guard_target
from failcore._tool_views import require, view

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider

    from failcore._session import Session

__all__ = ["instrument"]


@dataclass
class _Call:
    span: Span
    tool: str
    blocks: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)


def _decision(prefix: str, body: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{key}": str(body[key]) for key in ("action", "rule", "reason")
            if body.get(key) is not None}


class SessionTelemetry:
    """The observer :func:`instrument` adds: trace records in, spans and metrics out."""

    def __init__(self, session: Session, tracer_provider: TracerProvider | None,
                 meter_provider: MeterProvider | None) -> None:
        from opentelemetry import metrics, trace

        from failcore import __version__

        self._session = session
        self._trace = trace
        self._tracer = trace.get_tracer("failcore", __version__, tracer_provider)
        meter = metrics.get_meter("failcore", __version__, meter_provider)
        self._calls_counter = meter.create_counter(
            "failcore.calls", unit="{call}", description="Tool calls, by tool and outcome")
        self._blocks = meter.create_counter(
            "failcore.blocks", unit="{operation}",
            description="Operations a policy refused, by tool, rule and layer")
        self._duration = meter.create_histogram(
            "failcore.call.duration", unit="ms", description="Tool call duration, by outcome")
        self._lock = threading.Lock()
        self._open: dict[str, _Call] = {}

    def __call__(self, kind: str, call_id: str | None, body: dict[str, Any]) -> None:
        if call_id is None:
            if kind == "session.end":
                self._end_unfinished()
            return
        if kind == "call.start":
            self._start(call_id, body)
            return
        with self._lock:
            call = self._open.get(call_id)
        if call is None:
            return
        if kind == "worker.spawn":
            call.span.set_attribute("failcore.worker", str(body.get("worker", "")))
            call.span.set_attribute("failcore.isolation", str(body.get("isolation", "")))
        elif kind == "ipc.send" and body.get("type") == "call" and body.get("worker"):
            call.span.set_attribute("failcore.worker", str(body["worker"]))
        elif kind == "policy.precheck":
            for finding in body.get("findings") or []:
                attrs = _decision("failcore.precheck", finding)
                attrs["failcore.precheck.arg"] = str(finding.get("arg", ""))
                call.span.add_event("failcore.precheck", attrs)
                if finding.get("action") == "block":
                    self._block(call, str(finding.get("rule", "")), "precheck")
        elif kind == "guard":
            self._guard(call, body)
        elif kind == "worker.kill":
            call.span.add_event("failcore.worker.kill", {
                "failcore.worker": str(body.get("worker", "")),
                "failcore.kill.reason": str(body.get("reason", ""))})
        elif kind == "call.end":
            self._end(call_id, call, body)

    # -- per record ----------------------------------------------------------------------

    def _start(self, call_id: str, body: dict[str, Any]) -> None:
        tool = str(body.get("tool", "?"))
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": tool,
            "failcore.tool": tool, "failcore.call_id": call_id,
        }
        shown = view(self._session, tool)
        if shown is not None:
            attributes["failcore.isolation"] = shown.isolation
        for label, value in (body.get("context") or {}).items():
            attributes[f"failcore.context.{label}"] = str(value)
        span = self._tracer.start_span(f"execute_tool {tool}", attributes=attributes,
                                       kind=self._trace.SpanKind.INTERNAL)
        with self._lock:
            self._open[call_id] = _Call(span, tool)

    def _guard(self, call: _Call, body: dict[str, Any]) -> None:
        brokered = body.get("observed") == "parent"
        name = "failcore.connect" if brokered else "failcore.guard"
        attrs = _decision(name, body)
        attrs[f"{name}.op"] = str(body.get("op", ""))
        attrs[f"{name}.target"] = guard_target(body)
        for key in ("host", "port", "path", "program", "observed"):
            if body.get(key) is not None:
                attrs[f"{name}.{key}"] = body[key] if key == "port" else str(body[key])
        call.span.add_event(name, attrs)
        if body.get("action") == "block":
            self._block(call, str(body.get("rule", "")), "parent" if brokered else "worker")

    def _block(self, call: _Call, rule: str, layer: str) -> None:
        call.blocks += 1
        self._blocks.add(1, {"failcore.tool": call.tool, "failcore.rule": rule,
                             "failcore.layer": layer})

    def _end(self, call_id: str, call: _Call, body: dict[str, Any]) -> None:
        from opentelemetry.trace import Status, StatusCode

        with self._lock:
            self._open.pop(call_id, None)
        status = str(body.get("status", "?"))
        span = call.span
        span.set_attribute("failcore.status", status)
        duration = body.get("duration_ms")
        if isinstance(duration, int | float):
            span.set_attribute("failcore.duration_ms", float(duration))
        error = body.get("error") if isinstance(body.get("error"), dict) else None
        if error is not None:
            span.set_attribute("error.type", str(error.get("type", "")))
            if status == "blocked":
                rule, layer = str(error.get("rule", "")), str(error.get("layer", ""))
                span.set_attribute("failcore.block.rule", rule)
                span.set_attribute("failcore.block.layer", layer)
                if not call.blocks:  # refused where no decision record was written (token)
                    self._block(call, rule, layer)
        if status == "ok":
            span.set_status(Status(StatusCode.OK))
        else:
            text = f"{error.get('type')}: {error.get('message')}" if error else status
            span.set_status(Status(StatusCode.ERROR, text[:500]))
        span.end()
        metric = {"failcore.tool": call.tool, "failcore.status": status}
        self._calls_counter.add(1, metric)
        if isinstance(duration, int | float):
            self._duration.record(float(duration), metric)

    def _end_unfinished(self) -> None:
        from opentelemetry.trace import Status, StatusCode

        with self._lock:
            left, self._open = self._open, {}
        for call in left.values():
            call.span.set_attribute("failcore.status", "unfinished")
            call.span.set_status(Status(StatusCode.ERROR, "the session closed during the call"))
            call.span.end()


def instrument(session: Session, tracer_provider: TracerProvider | None = None,
               meter_provider: MeterProvider | None = None) -> SessionTelemetry:
    """Send ``session``'s calls to OpenTelemetry from now on; returns the observer.

    ``None`` providers mean the global ones (``opentelemetry.trace.set_tracer_provider``).
    """
    require("opentelemetry.trace", "otel", "failcore.otel")
    telemetry = SessionTelemetry(session, tracer_provider, meter_provider)
    session.add_observer(telemetry)
    return telemetry
