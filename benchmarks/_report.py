"""Target checks (ratios within one run) and the table / RESULTS.md rendering.

Checks are pure functions of the measured rows so they can be tested without timing
anything. A target whose inputs are missing (the anchor could not run) is ``N/A``,
never a silent PASS.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from benchmarks._timing import Row, Unavailable

PROFILE_NOTES = Path(__file__).resolve().parent / "PROFILE-NOTES.md"


@dataclass(frozen=True)
class Check:
    key: str
    target: str
    measured: str
    status: str  # "PASS", "MISS" or "N/A"


def _ratio_check(key: str, target: str, rows: Mapping[str, Row], num: str, den: str,
                 ok: Callable[[float], bool], what: str, need: str) -> Check:
    a, b = rows.get(num), rows.get(den)
    if a is None or b is None or b.value <= 0:
        missing = ", ".join(k for k, r in ((num, a), (den, b)) if r is None) or den
        return Check(key, target, f"not measured ({missing})", "N/A")
    ratio = a.value / b.value
    measured = (f"{ratio:.2f}x {what} ({fmt(a.value, a.unit)} vs {fmt(b.value, b.unit)} {a.unit}; "
                f"needs {need})")
    return Check(key, target, measured, "PASS" if ok(ratio) else "MISS")


def _bound_check(key: str, target: str, rows: Mapping[str, Row], name: str,
                 ok: Callable[[float], bool]) -> Check:
    row = rows.get(name)
    if row is None:
        return Check(key, target, f"not measured ({name})", "N/A")
    return Check(key, target, f"{fmt(row.value, row.unit)} {row.unit}", "PASS" if ok(row.value) else "MISS")


def checks(rows: Mapping[str, Row]) -> list[Check]:
    """The issue-7 targets, computed from rows of the same run."""
    return [
        _ratio_check("warm_vs_pipe", "warm call (validation, token, trace) <= 2x bare Pipe round trip",
                     rows, "warm_traced", "pipe", lambda r: r <= 2.0, "the Pipe", "<= 2x"),
        _ratio_check("warm_vs_anchor", "warm traced call below failcore 0.1.3's traced call",
                     rows, "warm_traced", "anchor_traced", lambda r: r < 1.0, "the anchor", "< 1x"),
        _ratio_check("warm_vs_ppe", "warm traced call >= 2.5x faster than ProcessPoolExecutor",
                     rows, "ppe", "warm_traced", lambda r: r >= 2.5,
                     "ProcessPoolExecutor's time / ours", ">= 2.5x"),
        _bound_check("fresh_median", "fresh call median <= 1.5 ms (steady state)",
                     rows, "fresh_traced", lambda v: v <= 1500.0),
        _bound_check("fresh_tput", "fresh throughput >= 300 calls/s, 8 threads",
                     rows, "fresh_tput_threads", lambda v: v >= 300.0),
        _bound_check("fresh_tput_async", "fresh throughput >= 300 calls/s, asyncio",
                     rows, "fresh_tput_asyncio", lambda v: v >= 300.0),
        _bound_check("warm_tput", "warm throughput >= 20,000 calls/s with 2 workers, 8 threads",
                     rows, "warm_tput_threads", lambda v: v >= 20000.0),
        _bound_check("warm_tput_async", "warm throughput >= 20,000 calls/s with 2 workers, asyncio",
                     rows, "warm_tput_asyncio", lambda v: v >= 20000.0),
        _ratio_check("kernel_warm", "kernel confinement adds <= 10% to a warm call (issue 16)",
                     rows, "kernel_warm_on", "kernel_warm_off", lambda r: r <= 1.10,
                     "the call with confinement=off", "<= 1.10x"),
        _ratio_check("kernel_fresh", "kernel confinement adds <= 10% to a fresh call whose worker "
                     "was prepared ahead (20 ms gaps: the pool keeps up) (issue 16)",
                     rows, "kernel_fresh_sparse_on", "kernel_fresh_sparse_off",
                     lambda r: r <= 1.10, "the call with confinement=off", "<= 1.10x"),
    ]


def fmt(value: float, unit: str) -> str:
    if unit == "calls/s":
        return f"{value:,.0f}"
    if unit in ("MB",):
        return f"{value:.1f}"
    if unit == "B":
        return f"{value:.0f}"
    if value < 1:
        return f"{value:.3f}"
    return f"{value:.1f}" if value < 1000 else f"{value:,.0f}"


def table(rows: list[Row | Unavailable], baseline: Row | None) -> str:
    """A Markdown table; latency rows also show their ratio to ``baseline`` (the bare Pipe)."""
    out = ["| measurement | median / value | p90 | unit | n | x Pipe | note |",
           "|---|---:|---:|---|---:|---:|---|"]
    for row in rows:
        if isinstance(row, Unavailable):
            out.append(f"| {row.label} | unavailable | | | | | {row.reason} |")
            continue
        p90 = fmt(row.p90, row.unit) if row.p90 is not None else ""
        ratio = ""
        if baseline is not None and row.unit == "µs" and baseline.value > 0:
            ratio = f"{row.value / baseline.value:.2f}"
        note = row.note.replace("|", "/")
        out.append(f"| {row.label} | {fmt(row.value, row.unit)} | {p90} | {row.unit} | {row.n} "
                   f"| {ratio} | {note} |")
    return "\n".join(out)


def checks_table(results: list[Check]) -> str:
    out = ["| target | measured | result |", "|---|---|---|"]
    out += [f"| {c.target} | {c.measured} | **{c.status}** |" for c in results]
    return "\n".join(out)


def profile_notes(path: Path = PROFILE_NOTES) -> dict[str, str]:
    """Sections of PROFILE-NOTES.md by check key: what bounds each target, from profiles.

    A heading ``## key1 key2 (comment)`` applies its section to every key it lists
    (several targets often share one bound).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    sections: dict[str, str] = {}
    for match in re.finditer(r"^## ([^\n]*)\n(.*?)(?=^## |\Z)", text, re.S | re.M):
        keys = match.group(1).split("(", 1)[0].split()
        for key in keys:
            sections[key] = match.group(2).strip()
    return sections


def bounds_section(results: list[Check], notes: Mapping[str, str]) -> str:
    """For every MISS, the profile notes that say what bounds it (or how to get them).

    Misses that share a notes section are listed together above it, once.
    """
    misses = [c for c in results if c.status == "MISS"]
    if not misses:
        return "Every target met in this run."
    groups: dict[str, list[Check]] = {}
    for c in misses:
        body = notes.get(c.key) or (
            "No profile notes for this target yet: profile it (see benchmarks/_profile.py) "
            f"and add a `## {c.key}` section to benchmarks/PROFILE-NOTES.md.")
        groups.setdefault(body, []).append(c)
    parts = []
    for body, group in groups.items():
        head = "\n".join(f"- MISS: {c.target}: measured {c.measured}" for c in group)
        parts.append(f"### {group[0].key}\n\n{head}\n\n{body}")
    return "\n\n".join(parts)
