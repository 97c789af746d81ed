"""Guardrail records in the trace: strict schemas, and ``failcore show`` / ``report``
displaying scan findings, approvals and budget stops."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from failcore import (
    ApprovalDecision,
    ApprovalRequest,
    Budget,
    BudgetExceeded,
    RiskLevel,
    Scan,
    SecurityError,
    Session,
    ToolMetadata,
)
from failcore._cli import main
from failcore._errors import TraceError
from failcore._report import render_report, summarize
from failcore._trace import read_trace, verify_trace
from failcore._trace_schema import validate_record

AWS = "AKIA" + "IOSFODNN7EXAMPLE"
GUARDRAIL_KINDS = {"scan", "budget.check", "budget.charge", "approval"}


def echo(text: str) -> dict[str, Any]:
    return {"text": text, "usage": {"tokens": 10}}


def approver(req: ApprovalRequest) -> ApprovalDecision:
    return ApprovalDecision(req.args["text"] != "no", by="alice", reason="looked fine")


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("guardrails") / "trace.jsonl"
    scan = Scan(actions={"email": "redact", "aws_access_key": "block"})
    with Session(trace=path, scan=scan, approve=approver, budgets=Budget(calls=4)) as s:
        s.register("echo", echo, ToolMetadata(risk_level=RiskLevel.HIGH))
        s.call("echo", text="mail ann@example.com")            # scan redact, approved
        with pytest.raises(SecurityError):
            s.call("echo", text=f"key {AWS}")                   # scan block
        with pytest.raises(SecurityError):
            s.call("echo", text="no")                           # approval denied
        s.call("echo", text="card 4111 1111 1111 1111")         # scan warn (args + result)
        s.call("echo", text="plain")
        s.call("echo", text="plain")
        with pytest.raises(BudgetExceeded):
            s.call("echo", text="plain")                        # budget stop
    return path


def test_guardrail_records_round_trip_the_schema(trace: Path) -> None:
    report = verify_trace(trace)
    assert report.ok, report.errors
    records = read_trace(trace)
    assert GUARDRAIL_KINDS <= {r["kind"] for r in records}
    for rec in records:
        assert validate_record(rec).model_dump(mode="json", exclude_unset=True) == rec
    text = trace.read_text()
    assert AWS not in text and "ann@example.com" not in text and "4111 1111" not in text


@pytest.mark.parametrize("finding", [
    {"kind": "email", "where": "args.x", "action": "warn", "digest": "0123456789abcdef",
     "text": "ann@example.com"},                                       # a value smuggled in
    {"kind": "email", "where": "args.x", "action": "warn", "digest": "ann@example.com"},
    {"kind": "email", "where": "args.x", "action": "mask", "digest": None},
])
def test_scan_schema_refuses_values_and_unknown_actions(finding: dict[str, Any]) -> None:
    rec = {"seq": 1, "t": 0.0, "call_id": "c000001", "prev": "0" * 64, "kind": "scan",
           "body": {"direction": "arguments", "findings": [finding]}}
    with pytest.raises(TraceError):
        validate_record(rec)


def test_summary_counts_equal_the_records(trace: Path) -> None:
    records = read_trace(trace)
    findings = [f for r in records if r["kind"] == "scan" for f in r["body"]["findings"]]
    decisions = [r["body"]["decision"] for r in records if r["kind"] == "approval"]
    stops = [r for r in records if r["kind"] == "budget.check" and not r["body"]["ok"]]
    guard = summarize(records).guardrails()
    assert guard == {
        "scan_findings": len(findings),
        "scan_blocked": sum(f["action"] == "block" for f in findings),
        "scan_redacted": sum(f["action"] == "redact" for f in findings),
        "approvals": len(decisions),
        "approvals_refused": sum(d != "approved" for d in decisions),
        "budget_stops": len(stops),
    }
    assert guard["scan_blocked"] == 1 and guard["approvals_refused"] == 1
    assert guard["budget_stops"] == 1


def test_show_lists_findings_approvals_and_stops(trace: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "redact [scan] args.text: email" in out
    assert "block [scan] args.text: aws_access_key" in out
    assert "approved [approval] by alice (risk_level HIGH)" in out
    assert "block [approval] echo  rule: approval: denied" in out
    assert "block [budget] session.calls  rule: budget: session.calls" in out
    assert "guardrails: 4 scan findings (1 blocked, 1 redacted); 5 approvals (1 refused); " \
           "1 budget stops" in out
    assert AWS not in out
    assert main(["show", "--json", str(trace)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["guardrails"]["budget_stops"] == 1
    assert data["budgets"]["session.calls"] == {"used": 4, "limit": 4}


class _Tables(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, int] = {}
        self.tiles: dict[str, int] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("data-rows") is not None:
            self.rows[str(a["id"])] = int(str(a["data-rows"]))
        if a.get("data-count") is not None:
            self.tiles[str(a["data-count"])] = int(str(a["data-value"]))


def test_report_has_guardrail_sections(trace: Path) -> None:
    html_text = render_report(read_trace(trace), trace_path=str(trace), verify=verify_trace(trace))
    page = _Tables()
    page.feed(html_text)
    guard = summarize(read_trace(trace)).guardrails()
    assert page.rows["findings"] == guard["scan_findings"]
    assert page.rows["approvals"] == guard["approvals"]
    assert page.rows["budgets"] >= 1
    assert page.tiles["scan_findings"] == guard["scan_findings"]
    assert page.tiles["budget_stops"] == 1
    assert "Scan findings" in html_text and "alice" in html_text
    assert AWS not in html_text and "ann@example.com" not in html_text


def test_a_trace_without_guardrails_keeps_its_report(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    with Session(trace=path) as s:
        s.register("echo", echo)
        s.call("echo", text="plain")
    assert "Scan findings" not in render_report(read_trace(path))
