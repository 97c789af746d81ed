"""The HTML audit report: escaping, self-containment, counts equal the trace's."""

from __future__ import annotations

import importlib.util
import json
import struct
import zlib
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from integration_support import screenshot

from failcore._report import render_report, summarize
from failcore._trace import TraceWriter, read_trace, verify_trace

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "failcore_sample_traces", ROOT / "tests" / "fixtures" / "sample_traces.py")
assert _spec is not None and _spec.loader is not None
samples: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(samples)


class Page(HTMLParser):
    """Collects tags, attributes, the summary JSON and the data-count tiles."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.tiles: dict[str, int] = {}
        self.rows: dict[str, int] = {}
        self.text: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "script":
            self._in_script = True
            self.scripts.append("")
        if a.get("data-count") is not None:
            self.tiles[str(a["data-count"])] = int(str(a["data-value"]))
        if a.get("data-rows") is not None:
            self.rows[str(a["id"])] = int(str(a["data-rows"]))

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts[-1] += data
        else:
            self.text.append(data)


def parse(html_text: str) -> Page:
    page = Page()
    page.feed(html_text)
    page.close()
    return page


def counts_from_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's numbers, recomputed straight from the records (independent of summarize)."""
    ends = [r for r in records if r["kind"] == "call.end"]
    pre = [f for r in records if r["kind"] == "policy.precheck" for f in r["body"]["findings"]]
    guards = [r["body"] for r in records if r["kind"] == "guard"]
    blocked_pre = sum(f["action"] == "block" for f in pre)
    blocked_worker = sum(g["action"] == "block" and g.get("observed") != "parent" for g in guards)
    blocked_proxy = sum(g["action"] == "block" and g.get("observed") == "parent" for g in guards)
    return {
        "records": len(records),
        "calls": len({r["call_id"] for r in records if r["call_id"] is not None}),
        "tools": len({r["body"]["tool"] for r in records if r["kind"] == "tool.register"}),
        "status": dict(sorted(Counter(r["body"]["status"] for r in ends).items())),
        "blocked": blocked_pre + blocked_worker + blocked_proxy,
        "blocked_precheck": blocked_pre,
        "blocked_worker": blocked_worker,
        "blocked_proxy": blocked_proxy,
        "warnings": sum(f["action"] == "warn" for f in pre) + sum(g["action"] == "warn" for g in guards),
    }


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    samples.write_sample_trace(str(path))
    return path


def test_counts_in_the_report_equal_the_trace(sample: Path) -> None:
    records = read_trace(sample)
    expected = counts_from_records(records)
    assert expected == samples.SAMPLE_COUNTS  # and both equal what was counted by hand
    page = parse(render_report(records, trace_path=str(sample), verify=verify_trace(sample)))
    [summary_text] = page.scripts
    summary = json.loads(summary_text)
    counts = summary["counts"]
    for key, value in expected.items():
        assert counts[key] == value, key
    assert page.tiles == {
        "calls": expected["calls"], "ok": expected["status"]["ok"], "blocked": expected["blocked"],
        "warnings": expected["warnings"], "tools": expected["tools"], "records": expected["records"],
    }
    assert page.rows == {"calls": expected["calls"], "blocked": expected["blocked"],
                         "warnings": expected["warnings"], "tools": expected["tools"]}
    assert summary["verify"]["ok"] is True


def test_report_is_self_contained(sample: Path) -> None:
    page = parse(render_report(read_trace(sample)))
    for tag, attrs in page.tags:
        assert tag not in ("link", "img", "iframe", "object", "embed", "base", "frame")
        for name, value in attrs.items():
            assert name not in ("src", "href", "action", "srcset", "formaction"), (tag, name)
            assert not name.startswith("on"), (tag, name)
            assert "url(" not in (value or "")
        if tag == "script":
            assert attrs == {"type": "application/json", "id": "failcore-summary"}
    style = [t for t, _ in page.tags if t == "style"]
    assert len(style) == 1


def test_script_tag_in_arguments_is_escaped(tmp_path: Path) -> None:
    evil = "</script><script>alert(1)</script><img src=x onerror=alert(2)>\"'&"
    path = tmp_path / "t.jsonl"
    with TraceWriter(path) as w:
        w.record("session.start", None, {"failcore_version": "0", "policy": evil, "format": 1})
        w.record("call.start", "c000001", {"tool": evil, "args": {evil: evil}})
        w.record("policy.precheck", "c000001", {"findings": [
            {"arg": evil, "action": "block", "rule": evil, "reason": evil}]})
        w.record("call.end", "c000001", {"tool": evil, "status": "blocked", "result": None,
                                         "error": {"type": evil, "message": evil},
                                         "duration_ms": 1.0})
    html_text = render_report(read_trace(path), trace_path=evil)
    assert "<script>alert" not in html_text and "<img" not in html_text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text
    page = parse(html_text)
    assert [t for t, _ in page.tags if t in ("script", "img")] == ["script"]
    summary = json.loads(page.scripts[0])  # the JSON block is intact and round-trips
    assert summary["trace"] == evil
    assert summary["calls"][0]["args"] == {evil: evil}
    assert summary["counts"]["blocked"] == 1


def test_failed_verification_is_shown(sample: Path) -> None:
    lines = sample.read_bytes().split(b"\n")
    del lines[4]
    sample.write_bytes(b"\n".join(lines))
    report = verify_trace(sample)
    page = parse(render_report(read_trace(sample), trace_path=str(sample), verify=report))
    text = " ".join(page.text)
    assert "FAILED" in text and "record missing" in text
    assert json.loads(page.scripts[0])["verify"]["ok"] is False


def test_summary_of_an_unfinished_call() -> None:
    records = [{"seq": 0, "kind": "call.start", "call_id": "c1", "body": {"tool": "t", "args": {}}}]
    summary = summarize(records)
    assert summary.calls[0].status == "unfinished" and not summary.complete
    assert "unfinished" in render_report(records)


def _png_pixels_vary(data: bytes) -> tuple[int, int, bool]:
    """(width, height, more than one distinct byte in the decompressed image data)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        ctype = data[pos + 4:pos + 8]
        chunk = data[pos + 8:pos + 8 + length]
        if ctype == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif ctype == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    return width, height, len(set(raw[: 4 * 1024 * 1024])) > 8


def test_report_renders_in_chromium(sample: Path, tmp_path: Path) -> None:
    report_path = tmp_path / "report.html"
    report_path.write_text(render_report(read_trace(sample), trace_path=str(sample),
                                         verify=verify_trace(sample)), encoding="utf-8")
    data = screenshot(report_path, tmp_path / "report.png")
    assert len(data) > 20_000  # a rendered page, not a blank canvas
    width, height, varied = _png_pixels_vary(data)
    assert (width, height) == (1280, 2000) and varied
