"""The benchmark runner's measurement functions work (minimal sizes, no timing assertions)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `benchmarks` lives at the repo root

from benchmarks import _anchor, _baselines, _broker_bench, _failcore_bench, _runner, _scan_bench  # noqa: E402
from benchmarks._report import bounds_section, checks, profile_notes  # noqa: E402
from benchmarks._timing import Row, Unavailable, percentile  # noqa: E402

TINY = _runner.Sizes(direct_batches=2, direct_per_batch=10, pipe=5, pools=3, python_start=1,
                     warm=5, warm_sparse=2, fresh=3, fresh_sparse=2, warm_tput=16, fresh_tput=8,
                     anchor=3, scan=20)


def _ok(row: Row, unit: str) -> None:
    assert isinstance(row, Row), row
    assert row.unit == unit
    assert row.value > 0
    assert row.n > 0


def test_baselines() -> None:
    _ok(_baselines.measure_direct(2, 10), "µs")
    _ok(_baselines.measure_pipe(5, 2), "µs")
    _ok(_baselines.measure_process_pool_executor(3, 1), "µs")
    _ok(_baselines.measure_mp_pool(3, 1), "µs")
    _ok(_baselines.measure_python_start(1, 0), "µs")
    _ok(_baselines.measure_ppe_throughput(10), "calls/s")


@pytest.mark.parametrize("isolation", ["tool", "call"])
def test_call_latency_and_trace_size(isolation: _failcore_bench.Isolation) -> None:
    row, size = _failcore_bench.measure_call(isolation, True, 3, 1)
    _ok(row, "µs")
    assert size is not None
    _ok(size, "B")
    row, size = _failcore_bench.measure_call(isolation, False, 2, 1, gap_s=0.001)
    _ok(row, "µs")
    assert size is None
    assert row.key.endswith("_sparse")


def test_secret_call_latency() -> None:
    row = _failcore_bench.measure_secret_call(3, 1)
    _ok(row, "µs")
    assert row.key == "warm_traced_secret"


@pytest.mark.parametrize("isolation", ["tool", "call"])
@pytest.mark.parametrize("mode", ["threads", "asyncio"])
def test_throughput(isolation: _failcore_bench.Isolation, mode: str) -> None:
    row = _failcore_bench.measure_throughput(isolation, mode, 8, threads=2)
    _ok(row, "calls/s")


def test_idle_memory() -> None:
    rows = _failcore_bench.measure_idle_memory(prespawn=2, settle_s=0.0)
    assert [r.key for r in rows] == ["idle_rss", "idle_uss", "zygote_rss"]
    for r in rows:
        _ok(r, "MB")


def test_scan_rows() -> None:
    small, json_kb, log_kb = _scan_bench.measure_scan(20)
    _ok(small, "µs")
    _ok(json_kb, "µs/KB")
    _ok(log_kb, "µs/KB")
    on, off = _scan_bench.measure_call_with_scan(3, 1)
    assert (on.key, off.key) == ("warm_small_scan_on", "warm_small_scan_off")
    _ok(on, "µs")


def test_anchor_failure_is_reported_not_raised(tmp_path: Path) -> None:
    out = _anchor.measure_anchor(tmp_path / "no-such-python", 3, 1)
    assert isinstance(out, Unavailable)
    assert "no-such-python" in out.reason
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho boom >&2\nexit 3\n")
    fake.chmod(0o755)
    out = _anchor.measure_anchor(fake, 3, 1)
    assert isinstance(out, Unavailable)
    assert "exited 3" in out.reason and "boom" in out.reason


def test_anchor_when_installed() -> None:
    python = _anchor.venv_python(_anchor.DEFAULT_VENV)
    if not python.exists():
        pytest.skip("benchmarks/.anchor-venv not created (python -m benchmarks creates it)")
    out = _anchor.measure_anchor(python, 3, 1)
    assert isinstance(out, Row), out
    _ok(out, "µs")


def test_checks_are_ratios_within_the_run() -> None:
    def r(key: str, value: float, unit: str = "µs") -> Row:
        return Row(key, key, value, unit, n=1)

    rows = {k.key: k for k in [r("pipe", 50), r("warm_traced", 90), r("ppe", 300),
                               r("fresh_traced", 1600), r("fresh_tput_threads", 400, "calls/s"),
                               r("warm_tput_threads", 1000, "calls/s")]}
    status = {c.key: c.status for c in checks(rows)}
    assert status["warm_vs_pipe"] == "PASS"  # 1.8x
    assert status["warm_vs_ppe"] == "PASS"  # 3.3x
    assert status["warm_vs_anchor"] == "N/A"  # anchor missing: never a silent PASS
    assert status["fresh_median"] == "MISS"
    assert status["fresh_tput"] == "PASS"
    assert status["fresh_tput_async"] == "N/A"
    assert status["warm_tput"] == "MISS"
    results = checks(rows)
    text = bounds_section(results, {"fresh_median": "fork dominates", "warm_tput": "cpu bound"})
    assert text.count("fork dominates") == 1 and "cpu bound" in text
    assert "warm_tput_async" not in text  # N/A, not a MISS
    text = bounds_section(results, {})
    assert "add a `## warm_tput` section" in text  # no notes: say how to get them


def test_percentile() -> None:
    assert percentile([5, 1, 3], 0.5) == 3
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 0.9) == 9


def test_profile_notes_sections(tmp_path: Path) -> None:
    notes = tmp_path / "notes.md"
    notes.write_text("# title\n\n## warm_vs_pipe warm_vs_ppe (shared)\nline one\n\n"
                     "## fresh_median\nline two\n")
    assert profile_notes(notes) == {"warm_vs_pipe": "line one", "warm_vs_ppe": "line one",
                                    "fresh_median": "line two"}


def test_runner_end_to_end() -> None:
    rows = _runner.measure_all(TINY, None, lambda _text: None)
    assert not [r for r in rows if isinstance(r, Unavailable)]
    meta = {"date": "d", "cores": "c", "kernel": "k", "python": "p", "command": "cmd",
            "duration": "1 s", "load_before": "0", "load_after": "0"}
    stdout, md = _runner.render(rows, meta)
    assert "| target | measured | result |" in stdout
    for heading in ("## Results", "## Targets", "## What bounds it"):
        assert heading in md


def test_kernel_rows() -> None:
    from benchmarks import _kernel_bench

    rows = _kernel_bench.measure_overhead("tool", 4, blocks=2, warmup=1)
    assert [r.key for r in rows] == ["kernel_warm_on", "kernel_warm_off"]
    for r in rows:
        _ok(r, "µs")
    assert "confinement=off" in rows[0].note
    rows = _kernel_bench.measure_overhead("call", 2, blocks=1, warmup=1, prespawn=0)
    assert rows[0].key == "kernel_cold_on"
    rows = _kernel_bench.measure_overhead("call", 2, blocks=1, warmup=1, gap_s=0.001)
    assert rows[0].key == "kernel_fresh_sparse_on"
    _ok(_kernel_bench.measure_leftover_check(3), "µs")
    rows = _kernel_bench.measure_session_start(1)
    assert [r.key for r in rows] == ["start_on", "start_off", "start_prepare"]
    for r in rows:
        _ok(r, "µs")


@pytest.mark.timeout(120)
def test_mcp_guard_rows() -> None:
    pytest.importorskip("mcp")
    from benchmarks import _mcp_guard_bench

    rows = _mcp_guard_bench.measure_guard(3, 1)
    by_key = {r.key: r for r in rows if isinstance(r, Row)}
    for key in ("mcp_server_direct", "mcp_guard", "mcp_server_direct_start", "mcp_guard_start"):
        _ok(by_key[key], "µs")
    assert "x direct" in by_key["mcp_guard"].note
    assert "through `failcore mcp guard`" in _mcp_guard_bench.summary(by_key)


def test_brokered_connect() -> None:
    rows = _broker_bench.measure_connect(5, 1)
    if isinstance(rows, Unavailable):
        pytest.skip(f"brokered connect not measurable here: {rows.reason}")
    assert [r.key for r in rows] == ["connect_direct", "connect_brokered", "resolve_direct",
                                     "resolve_brokered"]
    for r in rows:
        _ok(r, "µs")
    assert "x (+" in rows[1].note
