"""The report's timeline picture: one bar per call, its outcome, its length, its blocks."""

from __future__ import annotations

import importlib.util
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from integration_support import screenshot

from failcore._report import render_report, summarize
from failcore._timeline import MAX_ROWS, STATUS_COLORS, fmt_seconds, timeline_svg
from failcore._trace import TraceWriter, read_trace, verify_trace

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "failcore_sample_traces", ROOT / "tests" / "fixtures" / "sample_traces.py")
assert _spec is not None and _spec.loader is not None
samples: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(samples)


class Svg(HTMLParser):
    """The timeline's calls (data-* of each bar group), rects, marks and texts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.svg: dict[str, str | None] = {}
        self.calls: list[dict[str, Any]] = []
        self.legend: list[str] = []
        self.texts: list[str] = []
        self._in_legend = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "svg":
            self.svg = a
        elif tag == "g" and a.get("class") == "call":
            self.calls.append({**a, "rects": [], "marks": []})
        elif tag == "g" and a.get("class") == "legend":
            self._in_legend = True
        elif tag == "rect" and a.get("data-legend"):
            self.legend.append(str(a["data-legend"]))
        elif tag == "rect" and self.calls and not self._in_legend:
            self.calls[-1]["rects"].append(a)
        elif tag == "path" and a.get("class") == "mark":
            self.calls[-1]["marks"].append(a)

    def handle_data(self, data: str) -> None:
        self.texts.append(data)


def parse(svg: str) -> Svg:
    page = Svg()
    page.feed(svg)
    page.close()
    return page


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    samples.write_sample_trace(str(path))
    return path


def test_one_bar_per_call_with_its_outcome_and_blocks(sample: Path) -> None:
    records = read_trace(sample)
    summary = summarize(records)
    page = parse(timeline_svg(records))
    assert page.svg["data-calls"] == page.svg["data-drawn"] == str(len(summary.calls))
    assert [c["data-call"] for c in page.calls] == [c.call_id for c in summary.calls]
    assert [c["data-status"] for c in page.calls] == [c.status for c in summary.calls]
    for drawn, call in zip(page.calls, summary.calls, strict=True):
        [rect] = drawn["rects"]
        assert rect["fill"] == STATUS_COLORS[call.status][0]
        blocked = [a for a in call.attempts if a.action == "block"]
        warned = [a for a in call.attempts if a.action == "warn"]
        assert int(drawn["data-blocks"]) == len(blocked)
        assert [m["data-rule"] for m in drawn["marks"] if m["data-action"] == "block"] == \
            [a.rule for a in blocked]
        assert [m["data-rule"] for m in drawn["marks"] if m["data-action"] == "warn"] == \
            [a.rule for a in warned]
    assert page.legend == list(dict.fromkeys(c.status for c in summary.calls))
    label = page.svg["aria-label"] or ""
    assert "Timeline of 6 calls" in label and "2 blocked operations" in label


def test_bar_lengths_follow_durations_on_one_axis(sample: Path) -> None:
    page = parse(timeline_svg(read_trace(sample)))
    bars = {c["data-call"]: (float(c["rects"][0]["x"]), float(c["rects"][0]["width"]),
                             float(c["data-duration"])) for c in page.calls}
    _, long_w, long_d = bars["c000006"]  # the 10 s timeout
    _, short_w, short_d = bars["c000002"]  # 41.5 ms
    assert long_d == pytest.approx(10.003) and short_d == pytest.approx(0.0415)
    assert long_w > 600  # the timeout dominates the picture, as it dominated the run
    assert short_w == pytest.approx(max(long_w * short_d / long_d, 3.0), abs=0.2)
    starts = [x for x, _, _ in bars.values()]
    assert starts == sorted(starts)  # calls left to right in the order they started
    assert "10 s" in page.texts and "41.5 ms" in page.texts and "0" in page.texts


def test_appended_sessions_are_laid_end_to_end(tmp_path: Path) -> None:
    records: list[dict[str, Any]] = []
    for session, base in ((1, 5.0), (2, 0.5)):  # the second session's clock starts again
        records.append({"kind": "session.start", "t": base, "call_id": None, "body": {}})
        records.append({"kind": "call.start", "t": base + 0.1, "call_id": f"s{session}",
                        "body": {"tool": "t", "args": {}}})
        records.append({"kind": "call.end", "t": base + 0.2, "call_id": f"s{session}",
                        "body": {"tool": "t", "status": "ok", "duration_ms": 100.0}})
    page = parse(timeline_svg(records))
    first, second = (float(c["data-start"]) for c in page.calls)
    assert second > first


def test_an_unfinished_call_and_no_calls() -> None:
    records = [{"kind": "call.start", "t": 0.5, "call_id": "c1", "body": {"tool": "t"}}]
    [call] = parse(timeline_svg(records)).calls
    assert call["data-status"] == "unfinished" and call["rects"][0]["stroke-dasharray"] == "3 2"
    assert timeline_svg([{"kind": "session.start", "t": 0.0, "call_id": None, "body": {}}]) == ""
    assert "Timeline" not in render_report([])


def test_many_calls_are_capped_and_said_so() -> None:
    records = []
    for i in range(MAX_ROWS + 25):
        records.append({"kind": "call.start", "t": i * 0.01, "call_id": f"c{i}",
                        "body": {"tool": "t", "args": {}}})
        records.append({"kind": "call.end", "t": i * 0.01 + 0.005, "call_id": f"c{i}",
                        "body": {"tool": "t", "status": "ok", "duration_ms": 5.0}})
    svg = timeline_svg(records)
    page = parse(svg)
    assert len(page.calls) == MAX_ROWS and page.svg["data-calls"] == str(MAX_ROWS + 25)
    assert "25 more calls not drawn" in svg


def test_trace_text_is_escaped_in_the_picture(tmp_path: Path) -> None:
    evil = '"><script>alert(1)</script><rect onload="x'
    path = tmp_path / "t.jsonl"
    with TraceWriter(path) as w:
        w.record("call.start", evil, {"tool": evil, "args": {}})
        w.record("guard", evil, {"op": evil, "action": "block", "rule": evil, "reason": evil})
        w.record("call.end", evil, {"tool": evil, "status": evil, "result": None,
                                    "error": None, "duration_ms": 1.0})
    svg = timeline_svg(read_trace(path))
    assert "<script" not in svg and 'onload="' not in svg
    page = parse(svg)
    [call] = page.calls
    assert call["data-call"] == evil and call["data-status"] == evil
    assert call["marks"][0]["data-rule"] == evil


def test_time_labels() -> None:
    assert [fmt_seconds(s) for s in (0, 0.00004, 0.0015, 0.25, 1.5, 250)] == \
        ["0", "40 µs", "1.5 ms", "250 ms", "1.5 s", "250 s"]


# --- in a real browser -------------------------------------------------------------------


def _png_rgb(data: bytes, max_rows: int) -> tuple[int, int, list[bytes]]:
    """Decode the first ``max_rows`` rows of an 8-bit, non-interlaced RGB/RGBA PNG into
    rows of RGB bytes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, chunk = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        header = chunk if kind == b"IHDR" else header
        idat += chunk if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and color in (2, 6) and interlace == 0, (depth, color, interlace)
    bpp = 3 if color == 2 else 4
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(min(height, max_rows)):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        if f == 2:  # "up", the common case: no per-byte Python loop
            line = bytearray((x + p) & 255 for x, p in zip(line, prev, strict=True))
            f = 0
        for i in range(stride if f else 0):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        prev = line
        rows.append(bytes(v for i, v in enumerate(line) if i % bpp < 3))
    return width, height, rows


def test_the_timeline_is_drawn_in_chromium(sample: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.html"
    report.write_text(render_report(read_trace(sample), trace_path=str(sample),
                                    verify=verify_trace(sample)), encoding="utf-8")
    png = screenshot(report, tmp_path / "report.png")
    _, _, rows = _png_rgb(png, max_rows=900)  # the timeline is near the top
    timeout = bytes.fromhex(STATUS_COLORS["timeout"][0][1:])
    ok = bytes.fromhex(STATUS_COLORS["ok"][0][1:])

    def longest_run(row: bytes, rgb: bytes) -> int:
        best = run = 0
        for i in range(0, len(row), 3):
            run = run + 1 if row[i:i + 3] == rgb else 0
            best = max(best, run)
        return best

    # The 10 s timeout bar: a wide band of its colour, about as many rows tall as drawn.
    wide = [longest_run(r, timeout) for r in rows]
    assert max(wide) > 600, max(wide)
    assert 10 <= sum(w > 600 for w in wide) <= 16
    # The two ok calls are thin (3 px, partly under a warning mark), but there.
    assert sum(longest_run(r, ok) > 0 for r in rows) >= 20  # legend swatch (10) + the bars
