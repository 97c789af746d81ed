"""The report's timeline picture: every call as a bar on one time axis, coloured by its
outcome, with a mark where a policy blocked (or warned about) an operation.

An inline SVG, built from the records alone: no script, no external resource, every
string escaped (trace text is attacker-controlled). A bar starts at its ``call.start``
record's ``t`` and is ``duration_ms`` long (at least a few pixels, so an instant refusal
still shows); a mark sits at the ``t`` of the record that decided. A trace holding several
sessions, each with its own clock, is laid end to end. Bars, marks and the legend carry
``data-*`` attributes that say what they show, so tests can read the picture back.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from failcore._report import guard_target

# Outcome -> (colour, legend label); the report's badges use the same families.
STATUS_COLORS: dict[str, tuple[str, str]] = {
    "ok": ("#12b76a", "ok"),
    "blocked": ("#d92d20", "blocked"),
    "invalid_input": ("#f79009", "invalid input"),
    "invalid_output": ("#f79009", "invalid output"),
    "timeout": ("#b54708", "timeout"),
    "resource": ("#b54708", "resource limit"),
    "crashed": ("#7a2e0e", "crashed"),
    "failed": ("#dc6803", "tool raised"),
    "cancelled": ("#98a2b3", "cancelled"),
    "replayed": ("#2e90fa", "replayed"),
    "unfinished": ("#ffffff", "unfinished"),
}
_OTHER = ("#667085", "other")
BLOCK_COLOR, WARN_COLOR = "#b42318", "#a15c07"

MAX_ROWS = 400  # past this the picture stops being readable; the table has every call
_LABEL_W, _GAP, _PLOT_W, _RIGHT = 190, 12, 690, 108
_WIDTH = _LABEL_W + _GAP + _PLOT_W + _RIGHT
_ROW_H, _TOP, _MIN_BAR = 22, 30, 3.0


@dataclass
class Mark:
    t: float
    action: str  # "block" or "warn"
    rule: str
    what: str


@dataclass
class Bar:
    call_id: str
    tool: str
    status: str = "unfinished"
    start: float | None = None
    duration_s: float | None = None
    marks: list[Mark] = field(default_factory=list)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def collect(records: Sequence[dict[str, Any]]) -> list[Bar]:
    """The calls in order of their first record, with start, duration and decisions."""
    bars: dict[str, Bar] = {}
    offset = last = 0.0
    for rec in records:
        t = _num(rec.get("t"))
        if t is not None:
            if rec.get("kind") == "session.start" and t + offset < last:
                offset = last  # an appended session restarts its clock: lay it after
            t += offset
            last = max(last, t)
        cid = rec.get("call_id")
        body = rec.get("body") if isinstance(rec.get("body"), dict) else {}
        assert isinstance(body, dict)
        if not isinstance(cid, str):
            continue
        bar = bars.get(cid)
        if bar is None:
            bar = bars[cid] = Bar(cid, str(body.get("tool", "?")))
        kind = rec.get("kind")
        if kind == "call.start":
            bar.tool, bar.start = str(body.get("tool", bar.tool)), t
        elif kind == "call.end":
            bar.status = str(body.get("status", "?"))
            duration = _num(body.get("duration_ms"))
            if duration is not None:
                bar.duration_s = max(duration, 0.0) / 1000
            elif t is not None and bar.start is not None:
                bar.duration_s = max(t - bar.start, 0.0)
        elif kind == "policy.precheck" and t is not None:
            for f in body.get("findings") or []:
                if isinstance(f, dict) and f.get("action") in ("block", "warn"):
                    bar.marks.append(Mark(t, str(f["action"]), str(f.get("rule", "")),
                                          f"argument {f.get('arg', '?')}"))
        elif kind == "guard" and t is not None and body.get("action") in ("block", "warn"):
            bar.marks.append(Mark(t, str(body["action"]), str(body.get("rule", "")),
                                  f"{body.get('op', '?')} {guard_target(body)}"))
        if bar.start is None and t is not None:
            bar.start = t
    return list(bars.values())


def _nice_step(span: float) -> float:
    raw = span / 6
    magnitude = 10.0 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1.0, 2.0, 5.0, 10.0) if m * magnitude >= raw)


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s" if s < 100 else f"{s:.0f} s"
    ms = s * 1000
    if ms == 0:
        return "0"
    return f"{ms:.3g} ms" if ms >= 0.1 else f"{ms * 1000:.3g} µs"


def timeline_svg(records: Sequence[dict[str, Any]]) -> str:
    """The timeline as an ``<svg>`` element (an empty string when there are no calls)."""
    bars = [b for b in collect(records) if b.start is not None]
    if not bars:
        return ""
    shown, hidden = bars[:MAX_ROWS], len(bars) - MAX_ROWS
    t0 = min(b.start for b in shown if b.start is not None)
    ends = [(b.start or t0) + (b.duration_s or 0.0) for b in shown]
    ends += [m.t for b in shown for m in b.marks]
    span = max(max(ends) - t0, 1e-4)
    scale = _PLOT_W / span

    def x(t: float) -> float:
        return _LABEL_W + _GAP + (t - t0) * scale

    rows_h = len(shown) * _ROW_H
    legend_y = _TOP + rows_h + 22 + (18 if hidden > 0 else 0)
    height = legend_y + 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_WIDTH} {height}" '
             f'width="{_WIDTH}" height="{height}" role="img" id="timeline-svg" '
             f'data-calls="{len(bars)}" data-drawn="{len(shown)}" '
             f'font-family="system-ui,-apple-system,Segoe UI,sans-serif" font-size="12" '
             f'aria-label="{_e(_summary(bars))}">',
             f"<title>{_e(_summary(bars))}</title>"]
    # Axis: a gridline and a label per tick.
    step = _nice_step(span)
    tick = 0.0
    while tick <= span + step * 1e-9:
        gx = x(t0 + tick)
        parts.append(f'<line x1="{gx:.1f}" y1="{_TOP - 6}" x2="{gx:.1f}" y2="{_TOP + rows_h}" '
                     'stroke="#eceef2"/>'
                     f'<text x="{gx:.1f}" y="{_TOP - 10}" text-anchor="middle" fill="#5b6475">'
                     f"{_e(fmt_seconds(tick))}</text>")
        tick += step
    for i, bar in enumerate(shown):
        parts.append(_row(bar, _TOP + i * _ROW_H, x, scale))
    if hidden > 0:
        parts.append(f'<text x="{_LABEL_W + _GAP}" y="{_TOP + rows_h + 16}" fill="#5b6475" '
                     f'data-hidden="{hidden}">{hidden} more calls not drawn: the Calls table '
                     "below lists every call.</text>")
    parts.append(_legend(bars, legend_y))
    parts.append("</svg>")
    return "".join(parts)


def _summary(bars: list[Bar]) -> str:
    counts: dict[str, int] = {}
    for b in bars:
        counts[b.status] = counts.get(b.status, 0) + 1
    blocks = sum(m.action == "block" for b in bars for m in b.marks)
    outcome = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"Timeline of {len(bars)} calls ({outcome}); {blocks} blocked operations"


def _row(bar: Bar, y: float, x: Any, scale: float) -> str:
    color, label = STATUS_COLORS.get(bar.status, _OTHER)
    start = bar.start or 0.0
    width = max((bar.duration_s or 0.0) * scale, _MIN_BAR)
    duration = "" if bar.duration_s is None else fmt_seconds(bar.duration_s)
    blocks = [m for m in bar.marks if m.action == "block"]
    tip = f"{bar.call_id} {bar.tool}: {label}" + (f", {duration}" if duration else "")
    tip += "".join(f"\n{m.action}: {m.what} [rule: {m.rule}]" for m in bar.marks)
    name = f"{bar.call_id}  {bar.tool}"
    name = name if len(name) <= 30 else name[:29] + "…"
    outline = ' stroke="#667085" stroke-dasharray="3 2"' if bar.status == "unfinished" else ""
    out = [f'<g class="call" data-call="{_e(bar.call_id)}" data-status="{_e(bar.status)}" '
           f'data-start="{start:.6f}" data-duration="{bar.duration_s or 0:.6f}" '
           f'data-blocks="{len(blocks)}"><title>{_e(tip)}</title>',
           f'<text x="{_LABEL_W}" y="{y + 15}" text-anchor="end" fill="#1d2330">'
           f"{_e(name)}</text>",
           f'<rect x="{x(start):.1f}" y="{y + 4}" width="{width:.1f}" height="{_ROW_H - 8}" '
           f'rx="2" fill="{color}"{outline} data-width="{width:.1f}"/>']
    if duration:
        out.append(f'<text x="{x(start) + width + 5:.1f}" y="{y + 15}" fill="#5b6475">'
                   f"{_e(duration)}</text>")
    for m in bar.marks:
        out.append(_mark(m, x(m.t), y + _ROW_H / 2))
    out.append("</g>")
    return "".join(out)


def _mark(m: Mark, cx: float, cy: float, cls: str = "mark") -> str:
    if m.action == "block":  # a diamond with a white border, visible on any bar colour
        shape = (f'<path d="M{cx:.1f} {cy - 7:.1f}l6 7l-6 7l-6 -7z" fill="{BLOCK_COLOR}" '
                 'stroke="#fff" stroke-width="1.5"')
    else:  # a triangle
        shape = (f'<path d="M{cx:.1f} {cy - 6:.1f}l6 11h-12z" fill="{WARN_COLOR}" '
                 'stroke="#fff" stroke-width="1.5"')
    return f'{shape} class="{cls}" data-action="{_e(m.action)}" data-rule="{_e(m.rule)}"/>'


def _legend(bars: list[Bar], y: float) -> str:
    present = list(dict.fromkeys(b.status for b in bars))
    items = [(STATUS_COLORS.get(s, _OTHER), s) for s in present]
    out = [f'<g class="legend" transform="translate({_LABEL_W + _GAP} {y})">']
    lx = 0.0
    for (color, label), status in items:
        outline = ' stroke="#667085" stroke-dasharray="3 2"' if status == "unfinished" else ""
        out.append(f'<rect x="{lx:.0f}" y="-9" width="14" height="10" rx="2" fill="{color}"'
                   f'{outline} data-legend="{_e(status)}"/><text x="{lx + 18:.0f}" y="0" '
                   f'fill="#1d2330">{_e(label)}</text>')
        lx += 30 + 7 * len(label)
    for action, text in (("block", "blocked operation"), ("warn", "warning")):
        if any(m.action == action for b in bars for m in b.marks):
            out.append(_mark(Mark(0, action, "", ""), lx + 6, -4, "legend-mark")
                       + f'<text x="{lx + 16:.0f}" y="0" fill="#1d2330">{text}</text>')
            lx += 34 + 7 * len(text)
    out.append("</g>")
    return "".join(out)
