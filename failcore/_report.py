"""Summaries of a trace (for ``failcore show``) and the self-contained HTML audit report.

``summarize`` is a pure function of the records: the CLI's timeline, its ``--json``
output and the HTML report all read the same summary, so their counts cannot drift
apart. The report embeds that summary as ``<script type="application/json"
id="failcore-summary">`` (data, never executed) so a test or an auditor's tool can
check the visible numbers against it. Every value from the trace is escaped: tool
arguments are attacker-controlled.
"""

from __future__ import annotations

import dataclasses
import html
import json
from collections import Counter
from collections.abc import Sequence
from typing import Any

from failcore._trace import VerifyReport


@dataclasses.dataclass
class Attempt:
    """An operation a policy flagged: refused ("block") or let through with a warning."""

    call_id: str | None
    tool: str
    # "precheck" (layer 1, before dispatch), "worker" (layer 3 guards), or a guardrail:
    # "scan" (a finding; action block, warn or redact), "approval", "budget" (refusals)
    layer: str
    what: str
    action: str
    rule: str
    reason: str


@dataclasses.dataclass
class CallSummary:
    call_id: str
    tool: str
    status: str  # a call.end status, or "unfinished" when the trace has no call.end
    duration_ms: float | None = None
    args: Any = None
    error: dict[str, Any] | None = None
    granted: list[str] = dataclasses.field(default_factory=list)
    attempts: list[Attempt] = dataclasses.field(default_factory=list)
    findings: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    approval: dict[str, Any] | None = None
    budget_stop: str | None = None


@dataclasses.dataclass
class ToolSummary:
    tool: str
    risk_level: str
    side_effects: list[str]
    default_policy: str
    isolation: str
    capabilities: list[str]
    limits: dict[str, Any]
    granted: list[str] | None = None
    refused: list[dict[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TraceSummary:
    records: int
    sessions: int
    complete: bool  # the last record is session.end
    failcore_version: str | None
    policies: list[str | None]
    tools: list[ToolSummary]
    calls: list[CallSummary]
    budgets: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def attempts(self) -> list[Attempt]:
        return [a for c in self.calls for a in c.attempts]

    def counts(self) -> dict[str, Any]:
        """The numbers the report and ``show`` print; tests recompute them from the records."""
        attempts = self.attempts
        return {
            "records": self.records,
            "sessions": self.sessions,
            "tools": len(self.tools),
            "calls": len(self.calls),
            "status": dict(sorted(Counter(c.status for c in self.calls).items())),
            "blocked": sum(a.action == "block" for a in attempts),
            "blocked_precheck": sum(a.action == "block" and a.layer == "precheck" for a in attempts),
            "blocked_worker": sum(a.action == "block" and a.layer == "worker" for a in attempts),
            "blocked_proxy": sum(a.action == "block" and a.layer == "proxy" for a in attempts),
            "warnings": sum(a.action == "warn" for a in attempts),
        }

    def guardrails(self) -> dict[str, int]:
        """Scan findings, approvals and budget stops, counted (``show`` and the report)."""
        findings = [f for c in self.calls for f in c.findings]
        approvals = [c.approval for c in self.calls if c.approval is not None]
        return {
            "scan_findings": len(findings),
            "scan_blocked": sum(f.get("action") == "block" for f in findings),
            "scan_redacted": sum(f.get("action") == "redact" for f in findings),
            "approvals": len(approvals),
            "approvals_refused": sum(a.get("decision") != "approved" for a in approvals),
            "budget_stops": sum(c.budget_stop is not None for c in self.calls),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": self.counts(),
            "guardrails": self.guardrails(),
            "budgets": self.budgets,
            "complete": self.complete,
            "failcore_version": self.failcore_version,
            "policies": self.policies,
            "tools": [dataclasses.asdict(t) for t in self.tools],
            "calls": [dataclasses.asdict(c) for c in self.calls],
        }


def guard_target(body: dict[str, Any]) -> str:
    """What a guard event was about, as one short string."""
    if body.get("target"):
        return str(body["target"])
    if body.get("host") is not None:
        port = body.get("port")
        return f"{body['host']}:{port}" if port is not None else str(body["host"])
    for key in ("path", "program"):
        if body.get(key):
            return str(body[key])
    if body.get("names"):
        return ",".join(str(n) for n in body["names"])
    return str(body.get("op", "?"))


def summarize(records: Sequence[dict[str, Any]]) -> TraceSummary:
    """Fold the records into per-call and per-tool summaries. Tolerates unknown kinds
    and missing keys (a trace that fails verify can still be shown)."""
    tools: dict[str, ToolSummary] = {}
    calls: dict[str, CallSummary] = {}
    policies: list[str | None] = []
    version: str | None = None
    last_tool: str | None = None
    budgets: dict[str, dict[str, Any]] = {}
    for rec in records:
        kind = rec.get("kind")
        body = rec.get("body") if isinstance(rec.get("body"), dict) else {}
        assert isinstance(body, dict)
        cid = rec.get("call_id")
        if kind == "session.start":
            policies.append(body.get("policy"))
            version = body.get("failcore_version", version)
        elif kind == "tool.register":
            name = str(body.get("tool", "?"))
            last_tool = name
            # Side effects' defaults are shown as such, so an audit tells them from grants
            # the tool asked for ("fs:scratch" names no capability, only the default).
            defaults = [str(d) for d in body.get("defaults") or []]
            caps = [str(c) for c in body.get("capabilities") or []]
            shown = [f"{c} (default)" if c in defaults else c for c in caps]
            shown += [f"{d} (default)" for d in defaults if d not in caps]
            tools[name] = ToolSummary(
                name, str(body.get("risk_level", "?")), list(body.get("side_effects") or []),
                str(body.get("default_policy", "?")), str(body.get("isolation", "?")),
                shown, dict(body.get("limits") or {}),
            )
            continue
        if not isinstance(cid, str):
            if kind == "policy.grants":
                name = str(body.get("tool", last_tool))
                if name in tools:
                    tools[name].granted = list(body.get("granted") or [])
                    tools[name].refused = list(body.get("refused") or [])
            continue
        call = calls.get(cid)
        if call is None:
            call = calls[cid] = CallSummary(cid, str(body.get("tool", "?")), "unfinished")
        if kind == "call.start":
            call.tool = str(body.get("tool", call.tool))
            call.args = body.get("args")
            tool = tools.get(call.tool)
            if tool is not None and tool.granted is not None:
                call.granted = list(tool.granted)
        elif kind == "policy.grants":
            call.granted = list(body.get("granted") or [])
        elif kind == "policy.precheck":
            for f in body.get("findings") or []:
                call.attempts.append(Attempt(
                    cid, call.tool, "precheck", str(f.get("arg", "?")), str(f.get("action", "?")),
                    str(f.get("rule", "")), str(f.get("reason", "")),
                ))
        elif kind == "guard" and body.get("action") in ("block", "warn"):
            # observed "parent": the guard's egress proxy saw it (failcore mcp guard)
            layer = "proxy" if body.get("observed") == "parent" else "worker"
            call.attempts.append(Attempt(
                cid, call.tool, layer, f"{body.get('op', '?')} {guard_target(body)}",
                str(body["action"]), str(body.get("rule", "")), str(body.get("reason", "")),
            ))
        elif kind in ("scan", "approval", "budget.check", "budget.charge"):
            _guardrail(call, str(kind), body, budgets)
        elif kind == "mcp.request":  # a tools/call to a guarded third-party server
            call.tool = str(body.get("tool", call.tool))
            call.args = body.get("arguments")
        elif kind == "mcp.refuse":
            call.status = "blocked"
            call.error = {"type": "refused", "message": str(body.get("reason", "")),
                          "rule": str(body.get("rule", ""))}
            if body.get("stage") != "precheck":  # the pre-check's findings are attempts already
                call.attempts.append(Attempt(
                    cid, call.tool, "precheck", str(body.get("stage", "?")), "block",
                    str(body.get("rule", "")), str(body.get("reason", ""))))
        elif kind == "mcp.response":
            if call.status != "blocked":
                call.status = "failed" if body.get("is_error") else "ok"
            duration = body.get("duration_ms")
            call.duration_ms = duration if isinstance(duration, int | float) else None
        elif kind == "call.end":
            call.tool = str(body.get("tool", call.tool))
            call.status = str(body.get("status", "?"))
            duration = body.get("duration_ms")
            call.duration_ms = duration if isinstance(duration, int | float) else None
            call.error = body.get("error") if isinstance(body.get("error"), dict) else None
    return TraceSummary(
        records=len(records),
        sessions=len(policies),
        complete=bool(records) and records[-1].get("kind") == "session.end",
        failcore_version=version,
        policies=policies,
        tools=list(tools.values()),
        calls=list(calls.values()),
        budgets=budgets,
    )


def _guardrail(call: CallSummary, kind: str, body: dict[str, Any],
               budgets: dict[str, dict[str, Any]]) -> None:
    """Fold one scan / approval / budget record into its call (and the budget totals)."""
    if kind == "scan":
        direction = str(body.get("direction", "?"))
        for f in body.get("findings") or []:
            if not isinstance(f, dict):
                continue
            finding = dict(f, direction=direction)
            call.findings.append(finding)
            action = str(f.get("action", "?"))
            if action in ("block", "warn", "redact"):
                call.attempts.append(Attempt(
                    call.call_id, call.tool, "scan", f"{f.get('where', '?')}: {f.get('kind', '?')}",
                    action, f"scan: {f.get('kind', '?')}",
                    f"{direction} scan found {f.get('kind', '?')} (digest {f.get('digest')}); "
                    f"{_SCAN_EFFECT.get(action, action)}"))
    elif kind == "approval":
        call.approval = dict(body)
        decision = str(body.get("decision", "?"))
        if decision != "approved":
            who = f" by {body['by']}" if body.get("by") else ""
            call.attempts.append(Attempt(
                call.call_id, call.tool, "approval", call.tool, "block", f"approval: {decision}",
                f"approval {decision}{who}: {body.get('reason') or 'no reason given'}"))
    else:
        for counter in body.get("counters") or []:
            if isinstance(counter, dict):
                key = f"{counter.get('scope', '?')}.{counter.get('budget', '?')}"
                budgets[key] = {"used": counter.get("used"), "limit": counter.get("limit")}
        if kind == "budget.check" and body.get("ok") is False:
            exceeded = str(body.get("exceeded", "?"))
            call.budget_stop = exceeded
            state = budgets.get(exceeded, {})
            call.attempts.append(Attempt(
                call.call_id, call.tool, "budget", exceeded, "block", f"budget: {exceeded}",
                f"spent: {state.get('used')} of {state.get('limit')}"))


_SCAN_EFFECT = {"block": "the call was refused", "redact": "masked for the caller",
                "warn": "let through"}


# --- HTML ------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde1e8;padding-bottom:4px}
.sub{color:#5b6475;margin-bottom:16px}
.tiles{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.tile{border:1px solid #dde1e8;border-radius:8px;padding:10px 16px;min-width:110px}
.tile b{display:block;font-size:24px}.tile span{color:#5b6475;font-size:12px;text-transform:uppercase}
.tile.bad b{color:#b42318}.tile.warn b{color:#a15c07}.tile.good b{color:#067647}
table{border-collapse:collapse;width:100%;margin:6px 0}
th,td{text-align:left;vertical-align:top;padding:5px 8px;border-bottom:1px solid #eceef2}
th{background:#f6f7f9;font-weight:600;font-size:12px;text-transform:uppercase;color:#5b6475}
td.num{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12.5px;overflow-wrap:anywhere}
td.id,td.num{white-space:nowrap}
.badge{display:inline-block;border-radius:10px;padding:1px 8px;font-size:12px;font-weight:600;background:#eceef2}
.s-ok,.v-ok{background:#dcfae6;color:#067647}.s-blocked,.a-block,.v-bad{background:#fee4e2;color:#b42318}
.a-warn,.a-redact,.s-unfinished,.s-budget{background:#fef0c7;color:#a15c07}
.s-timeout,.s-crashed,.s-resource,.s-failed,.s-invalid_input,.s-invalid_output{background:#fde8d7;color:#93370d}
ul.plain{margin:0;padding-left:16px}.muted{color:#8a93a3}
details summary{cursor:pointer;color:#3b5bdb}
.timeline{overflow-x:auto}.timeline svg{max-width:100%;height:auto}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _badge(text: str, cls: str) -> str:
    return f'<span class="badge {_e(cls)}">{_e(text)}</span>'


def _short(value: Any, limit: int = 400) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} chars)"


_LIMIT_UNITS = (("timeout_s", "timeout", "s"), ("memory_mb", "memory", "MB"), ("cpu_s", "CPU", "s"),
                ("file_size_mb", "file size", "MB"), ("open_files", "open files", ""),
                ("output_bytes", "output", "bytes"))


def _limits(limits: dict[str, Any]) -> str:
    known = [f"{label} {_e(limits[key])}{' ' + unit if unit else ''}"
             for key, label, unit in _LIMIT_UNITS if key in limits]
    other = [f"{_e(k)} {_e(v)}" for k, v in sorted(limits.items())
             if k not in {key for key, _, _ in _LIMIT_UNITS}]
    return "<br>".join(known + other) or '<span class="muted">none</span>'


def _list(items: Sequence[Any]) -> str:
    if not items:
        return '<span class="muted">none</span>'
    return '<ul class="plain">' + "".join(f"<li><code>{_e(i)}</code></li>" for i in items) + "</ul>"


def _table(headers: Sequence[str], rows: list[str], empty: str, table_id: str) -> str:
    if not rows:
        return f'<p class="muted" id="{table_id}" data-rows="0">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return (f'<table id="{table_id}" data-rows="{len(rows)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>')


def _attempt_rows(attempts: list[Attempt]) -> list[str]:
    return [
        f'<tr><td class="mono id">{_e(a.call_id)}</td><td>{_e(a.tool)}</td><td>{_e(a.layer)}</td>'
        f'<td><code>{_e(a.what)}</code></td><td><code>{_e(a.rule)}</code></td><td>{_e(a.reason)}</td></tr>'
        for a in attempts
    ]


def _guardrails_html(summary: TraceSummary) -> str:
    """Scan findings, approvals and budgets: only for traces that have them."""
    finding_rows = [
        f'<tr><td class="mono id">{_e(c.call_id)}</td><td>{_e(c.tool)}</td>'
        f'<td>{_e(f.get("direction"))}</td><td><code>{_e(f.get("where"))}</code></td>'
        f'<td>{_e(f.get("kind"))}{" (" + _e(f.get("encoding")) + ")" if f.get("encoding") else ""}</td>'
        f'<td>{_badge(str(f.get("action")), "a-" + str(f.get("action")))}</td>'
        f'<td><code>{_e(f.get("digest"))}</code></td></tr>'
        for c in summary.calls for f in c.findings]
    approval_rows = [
        f'<tr><td class="mono id">{_e(c.call_id)}</td><td>{_e(c.tool)}</td>'
        f'<td>{_badge(str(a.get("decision")), "v-ok" if a.get("decision") == "approved" else "v-bad")}</td>'
        f'<td>{_e(a.get("by") or "")}</td><td>{_e(a.get("reason") or "")}</td>'
        f'<td>{_e(", ".join(str(r) for r in a.get("required_by") or []))}</td>'
        f'<td class="num">{_e(a.get("waited_ms"))} ms</td></tr>'
        for c in summary.calls if (a := c.approval) is not None]
    stops = {c.budget_stop for c in summary.calls if c.budget_stop}
    budget_rows = [
        f'<tr><td><code>{_e(key)}</code></td><td class="num">{_e(v.get("used"))}</td>'
        f'<td class="num">{_e(v.get("limit"))}</td>'
        f'<td>{_badge("spent", "v-bad") if key in stops else ""}</td></tr>'
        for key, v in sorted(summary.budgets.items())]
    return (
        "<h2>Scan findings</h2>"
        '<p class="muted">Kind, where and a salted hash of each match; the trace never holds '
        "the matched value.</p>"
        + _table(("call", "tool", "direction", "where", "kind", "action", "digest"), finding_rows,
                 "No secrets or personal data found.", "findings")
        + "<h2>Approvals</h2>"
        + _table(("call", "tool", "decision", "by", "reason", "asked because", "waited"),
                 approval_rows, "No call needed approval.", "approvals")
        + "<h2>Budgets</h2>"
        + _table(("budget", "used", "limit", ""), budget_rows, "No budgets.", "budgets"))


def _summary_json(summary: TraceSummary, extra: dict[str, Any]) -> str:
    data = dict(summary.to_json(), **extra)
    text = json.dumps(data, sort_keys=True, ensure_ascii=False, default=repr)
    # Inside <script> only "</" could end the element; escape every markup character.
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def _timeline_section(records: Sequence[dict[str, Any]]) -> str:
    from failcore._timeline import timeline_svg

    svg = timeline_svg(records)
    return f'<h2>Timeline</h2><div class="timeline" id="timeline">{svg}</div>' if svg else ""


def render_report(
    records: Sequence[dict[str, Any]],
    *,
    trace_path: str | None = None,
    verify: VerifyReport | None = None,
) -> str:
    """One self-contained HTML page (inline CSS, no scripts to run, no external URLs)."""
    summary = summarize(records)
    counts = summary.counts()
    attempts = summary.attempts
    blocked = [a for a in attempts if a.action == "block"]
    warned = [a for a in attempts if a.action == "warn"]
    policies = sorted({str(p) for p in summary.policies}) or ["(none recorded)"]
    if verify is None:
        verify_html = _badge("not checked", "")
    elif verify.ok:
        verify_html = _badge("chain and schema OK", "v-ok") + f' <code class="muted">head {_e(verify.head)}</code>'
    else:
        verify_html = _badge(f"FAILED: {len(verify.errors)} problem(s)", "v-bad")

    def tile(key: str, label: str, value: int, tone: str) -> str:
        return (f'<div class="tile {tone}" data-count="{_e(key)}" data-value="{value}">'
                f"<b>{value}</b><span>{_e(label)}</span></div>")

    ok_calls = counts["status"].get("ok", 0)
    guard = summary.guardrails()
    guarded = any(guard.values()) or bool(summary.budgets)
    tiles = "".join((
        tile("calls", "calls", counts["calls"], ""),
        tile("ok", "ok", ok_calls, "good"),
        tile("blocked", "blocked attempts", counts["blocked"], "bad" if counts["blocked"] else ""),
        tile("warnings", "warnings", counts["warnings"], "warn" if counts["warnings"] else ""),
        tile("tools", "tools", counts["tools"], ""),
        tile("records", "records", counts["records"], ""),
    ))
    if guarded:  # traces without guardrail records keep the page they always had
        tiles += "".join((
            tile("scan_findings", "scan findings", guard["scan_findings"],
                 "warn" if guard["scan_findings"] else ""),
            tile("approvals", "approvals", guard["approvals"],
                 "bad" if guard["approvals_refused"] else ""),
            tile("budget_stops", "budget stops", guard["budget_stops"],
                 "bad" if guard["budget_stops"] else ""),
        ))
    status_line = ", ".join(f"{n} {_e(s)}" for s, n in counts["status"].items()) or "no calls"
    header_rows = [
        ("Trace file", f"<code>{_e(trace_path or '(in memory)')}</code>"),
        ("Verify", verify_html),
        ("Policy", ", ".join(f"<code>{_e(p)}</code>" for p in policies)),
        ("FailCore", _e(summary.failcore_version or "?")),
        ("Sessions", f"{summary.sessions}" + ("" if summary.complete else
                                               ' <span class="badge a-warn">did not end cleanly</span>')),
        ("Call outcomes", status_line),
    ]
    header = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in header_rows)

    call_rows = []
    for c in summary.calls:
        duration = "" if c.duration_ms is None else f"{c.duration_ms:.1f} ms"
        n_block = sum(a.action == "block" for a in c.attempts)
        error = f'<div class="muted">{_e(c.error.get("type"))}: {_e(c.error.get("message"))}</div>' if c.error else ""
        call_rows.append(
            f'<tr data-status="{_e(c.status)}"><td class="mono id">{_e(c.call_id)}</td><td>{_e(c.tool)}</td>'
            f'<td>{_badge(c.status, "s-" + c.status)}{error}</td><td class="num">{_e(duration)}</td>'
            f"<td>{_list(c.granted)}</td><td class=\"num\">{n_block}</td>"
            f"<td><details><summary>args</summary><code>{_e(_short(c.args))}</code></details></td></tr>"
        )
    tool_rows = [
        f"<tr><td>{_e(t.tool)}</td><td>{_e(t.risk_level)}</td><td>{_e(', '.join(t.side_effects) or 'NONE')}</td>"
        f"<td>{_e(t.default_policy)}</td><td>{_e(t.isolation)}</td><td>{_list(t.capabilities)}</td>"
        f"<td>{_list(t.granted if t.granted is not None else [])}"
        + "".join(f'<div class="muted">refused <code>{_e(r.get("capability"))}</code>: {_e(r.get("rule"))}</div>'
                  for r in t.refused)
        + f"</td><td>{_limits(t.limits)}</td></tr>"
        for t in summary.tools
    ]
    verify_section = ""
    if verify is not None and (verify.errors or verify.warnings):
        verify_section = (
            "<h2>Verification</h2>"
            + "".join(f'<p>{_badge("error", "v-bad")} {_e(m)}</p>' for m in verify.errors)
            + "".join(f'<p>{_badge("warning", "a-warn")} {_e(m)}</p>' for m in verify.warnings)
        )
    attempt_headers = ("call", "tool", "layer", "what", "rule", "reason")
    guardrails_section = _guardrails_html(summary) if guarded else ""
    extra = {
        "trace": trace_path,
        "verify": None if verify is None else {"ok": verify.ok, "errors": verify.errors,
                                               "warnings": verify.warnings, "head": verify.head},
    }
    title = f"FailCore trace report: {trace_path}" if trace_path else "FailCore trace report"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{_CSS}</style></head>
<body>
<h1>FailCore trace report</h1>
<div class="sub">Every call, every decision, from a hash-chained trace.</div>
<table id="header">{header}</table>
<div class="tiles">{tiles}</div>
{verify_section}
{_timeline_section(records)}
<h2>Calls</h2>
{_table(("call", "tool", "status", "duration", "grants", "blocked", "args"), call_rows,
        "No calls in this trace.", "calls")}
<h2>Blocked attempts</h2>
{_table(attempt_headers, _attempt_rows(blocked), "Nothing was blocked.", "blocked")}
<h2>Warnings</h2>
{_table(attempt_headers, _attempt_rows(warned), "No warnings.", "warnings")}
{guardrails_section}
<h2>Tools registered</h2>
{_table(("tool", "risk", "side effects", "default", "isolation", "capabilities", "granted", "limits"),
        tool_rows, "No tools registered in this trace.", "tools")}
<script type="application/json" id="failcore-summary">{_summary_json(summary, extra)}</script>
</body></html>
"""
