"""OpenTelemetry: spans, events and metrics from a session, read back through the SDK's
in-memory span exporter and metric reader."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from integration_support import need

need("opentelemetry.sdk", "otel")
import agent_tools  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode  # noqa: E402

from failcore import FailCoreError, Session  # noqa: E402
from failcore.otel import instrument  # noqa: E402

pytestmark = pytest.mark.integration


@dataclass
class Telemetry:
    session: Session
    spans: InMemorySpanExporter
    metrics: InMemoryMetricReader
    tracer_provider: TracerProvider

    def finished(self) -> dict[str, ReadableSpan]:
        return {s.attributes["failcore.call_id"]: s  # type: ignore[index]
                for s in self.spans.get_finished_spans()}

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        data = self.metrics.get_metrics_data()
        out = []
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for p in metric.data.data_points:
                            out.append((dict(p.attributes or {}),
                                        getattr(p, "value", None) or getattr(p, "count", None)))
        return out


@pytest.fixture
def telemetry(tmp_path: Path) -> Iterator[Telemetry]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    with agent_tools.make_session(str(tmp_path / "trace.jsonl")) as session:
        instrument(session, tracer_provider=tracer_provider,
                   meter_provider=MeterProvider(metric_readers=[reader]))
        yield Telemetry(session, spans, reader, tracer_provider)


def test_a_span_per_call_with_outcome_isolation_worker_and_duration(telemetry: Telemetry) -> None:
    session = telemetry.session
    assert session.call("add", a=1, b=2) == 3
    assert session.call("add", a=3, b=4) == 7
    with pytest.raises(FailCoreError):
        session.call("add", a="1", b=2)
    with pytest.raises(FailCoreError):
        session.call("slow", seconds=5)
    spans = telemetry.finished()
    assert list(spans) == ["c000001", "c000002", "c000003", "c000004"]
    first = spans["c000001"]
    assert first.name == "execute_tool add"
    attrs = dict(first.attributes or {})
    assert attrs["gen_ai.operation.name"] == "execute_tool" and attrs["gen_ai.tool.name"] == "add"
    assert attrs["failcore.status"] == "ok" and attrs["failcore.isolation"] == "tool"
    assert attrs["failcore.worker"] == "w1" and attrs["failcore.duration_ms"] > 0
    assert first.status.status_code == StatusCode.OK
    assert dict(spans["c000002"].attributes or {})["failcore.worker"] == "w1"  # warm reuse
    bad = spans["c000003"]
    assert bad.attributes["failcore.status"] == "invalid_input"  # type: ignore[index]
    assert bad.attributes["error.type"] == "InputValidationError"  # type: ignore[index]
    assert bad.status.status_code == StatusCode.ERROR
    late = spans["c000004"]
    assert late.attributes["failcore.status"] == "timeout"  # type: ignore[index]
    [kill] = late.events
    assert kill.name == "failcore.worker.kill"
    assert kill.attributes["failcore.kill.reason"] == "timeout"  # type: ignore[index]

    calls = {(a["failcore.tool"], a["failcore.status"]): v for a, v in telemetry.points("failcore.calls")}
    assert calls == {("add", "ok"): 2, ("add", "invalid_input"): 1, ("slow", "timeout"): 1}
    durations = {(a["failcore.tool"], a["failcore.status"]): n
                 for a, n in telemetry.points("failcore.call.duration")}
    assert durations == calls  # one histogram sample per call


def test_a_refusal_is_an_event_a_block_metric_and_span_attributes(telemetry: Telemetry) -> None:
    # Loopback: refused before dispatch; were that broken, nothing leaves the host.
    with pytest.raises(FailCoreError):
        telemetry.session.call("fetch", url="http://127.0.0.1:9/x")
    [span] = telemetry.finished().values()
    attrs = dict(span.attributes or {})
    assert attrs["failcore.status"] == "blocked"
    assert attrs["failcore.block.rule"] == "net_safe: 127.0.0.0/8 (loopback)"
    assert attrs["failcore.block.layer"] == "precheck"
    assert attrs["failcore.isolation"] == "call" and "failcore.worker" not in attrs  # never ran
    [event] = span.events
    assert event.name == "failcore.precheck"
    assert dict(event.attributes or {}) == {
        "failcore.precheck.action": "block", "failcore.precheck.arg": "url",
        "failcore.precheck.rule": "net_safe: 127.0.0.0/8 (loopback)",
        "failcore.precheck.reason": event.attributes["failcore.precheck.reason"],  # type: ignore[index]
    }
    assert telemetry.points("failcore.blocks") == [(
        {"failcore.tool": "fetch", "failcore.rule": "net_safe: 127.0.0.0/8 (loopback)",
         "failcore.layer": "precheck"}, 1)]


def test_guard_and_brokered_connect_records_become_events(telemetry: Telemetry) -> None:
    # The worker's guards and the parent's connect broker report through guard records;
    # feed the observer the records a session writes for them.
    [observer] = telemetry.session._observers
    observer("call.start", "c9", {"tool": "fetch", "args": {}})
    observer("guard", "c9", {"op": "open", "action": "warn", "rule": "fs: default warn",
                             "reason": "not granted", "path": "/etc/passwd", "write": False})
    observer("guard", "c9", {"op": "connect", "action": "block", "observed": "parent",
                             "rule": "net_safe: 10.0.0.0/8 (private)", "reason": "private",
                             "host": "10.1.2.3", "port": 443})
    observer("call.end", "c9", {"tool": "fetch", "status": "failed", "result": None,
                                "error": {"type": "ToolFailed", "message": "refused"},
                                "duration_ms": 3.5})
    [span] = [s for s in telemetry.spans.get_finished_spans()
              if s.attributes["failcore.call_id"] == "c9"]  # type: ignore[index]
    guard, connect = span.events
    assert guard.name == "failcore.guard"
    assert guard.attributes["failcore.guard.target"] == "/etc/passwd"  # type: ignore[index]
    assert guard.attributes["failcore.guard.action"] == "warn"  # type: ignore[index]
    assert connect.name == "failcore.connect"
    assert dict(connect.attributes or {}) == {
        "failcore.connect.op": "connect", "failcore.connect.action": "block",
        "failcore.connect.rule": "net_safe: 10.0.0.0/8 (private)",
        "failcore.connect.reason": "private", "failcore.connect.target": "10.1.2.3:443",
        "failcore.connect.host": "10.1.2.3", "failcore.connect.port": 443,
        "failcore.connect.observed": "parent"}
    assert telemetry.points("failcore.blocks") == [(
        {"failcore.tool": "fetch", "failcore.rule": "net_safe: 10.0.0.0/8 (private)",
         "failcore.layer": "parent"}, 1)]


def test_spans_nest_under_the_callers_span_and_carry_context_labels(
        telemetry: Telemetry) -> None:
    from failcore import call_context

    tracer = telemetry.tracer_provider.get_tracer("app")

    async def run() -> Any:
        with tracer.start_as_current_span("agent step"), call_context(mcp_request_id=41):
            return await telemetry.session.acall("add", a=1, b=1)

    assert asyncio.run(run()) == 2
    spans = {s.name: s for s in telemetry.spans.get_finished_spans()}
    child, parent = spans["execute_tool add"], spans["agent step"]
    assert child.parent is not None and child.parent.span_id == parent.context.span_id
    assert child.context.trace_id == parent.context.trace_id
    assert child.attributes["failcore.context.mcp_request_id"] == "41"  # type: ignore[index]


def test_secrets_never_reach_telemetry(telemetry: Telemetry) -> None:
    with pytest.raises(FailCoreError) as raised:
        telemetry.session.call("login", user="bob", password="hunter2-pass")
    # The tool put both in its error; the error the caller gets is scrubbed already.
    assert agent_tools.SECRET_VALUE not in str(raised.value)
    assert "hunter2-pass" not in str(raised.value) and "<secret>" in str(raised.value)
    dumped = []
    for span in telemetry.spans.get_finished_spans():
        dumped.append(span.to_json())
        assert "<secret>" in (span.status.description or "")
    data = telemetry.metrics.get_metrics_data()
    dumped.append(data.to_json() if data else "")
    text = json.dumps(dumped)
    assert agent_tools.SECRET_VALUE not in text and "hunter2-pass" not in text


def test_a_session_closed_mid_call_ends_its_span(tmp_path: Path) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    with Session() as session:
        observer = instrument(session, tracer_provider=provider)
        observer("call.start", "c1", {"tool": "x", "args": {}})
    [span] = spans.get_finished_spans()
    assert span.attributes["failcore.status"] == "unfinished"  # type: ignore[index]
