"""What the secret/PII scanner costs: a typical small result, per KB of larger ones, and a
warm call with scanning on (the default) against the same call with ``scan=False``.

The scanner runs in the parent on every call's arguments and result, so its cost adds to
every call; the per-KB rows say how it grows with the size of what a tool returns.
"""

from __future__ import annotations

import json
import random
import statistics
import string
import time
from typing import Any

from benchmarks._timing import Row, latency_row, sample_ns
from failcore import Scan, Session
from failcore._scan import new_salt, scan_value

# A typical small tool result: a status, a count, a few short strings, a timestamp.
SMALL: dict[str, Any] = {
    "status": "ok", "count": 3, "items": ["alpha", "beta", "gamma"],
    "updated": "2024-01-15T12:30:00Z", "next": "https://api.example.com/v1/items?page=2",
}


def records_json(kb: int) -> str:
    """~``kb`` KB of API-like JSON (ids, names, timestamps, prose), no secrets in it."""
    rng = random.Random(7)
    rows: list[dict[str, Any]] = []
    while len(json.dumps(rows)) < kb * 1024:
        i = len(rows)
        rows.append({
            "id": i, "uuid": f"{rng.getrandbits(128):032x}", "name": f"user{i}",
            "created": f"2024-01-{1 + i % 28:02d}T12:{i % 60:02d}:00Z", "score": i * 1.5,
            "tags": ["alpha", "beta"], "note": " ".join(
                rng.choice(("fast", "report", "value", "owner", "region", "status", "total"))
                for _ in range(8)),
        })
    return json.dumps(rows)


def log_text(kb: int) -> str:
    """~``kb`` KB of log lines: timestamps, paths, numbers, words."""
    rng = random.Random(11)
    lines: list[str] = []
    size = 0
    while size < kb * 1024:
        line = (f"2024-01-15 12:{rng.randrange(60):02d}:{rng.randrange(60):02d} INFO "
                f"/srv/app/{''.join(rng.choices(string.ascii_lowercase, k=6))}.py:{rng.randrange(900)} "
                f"handled request {rng.randrange(10**6)} in {rng.random() * 100:.2f} ms")
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def _scan_row(key: str, label: str, value: Any, n: int, per_kb: bool) -> Row:
    scan, salt = Scan(), new_salt()
    samples = sample_ns(lambda: scan_value(scan, value, "result", salt), n, max(5, n // 10))
    row = latency_row(key, label, samples)
    if not per_kb:
        return row
    kb = len(value if isinstance(value, str) else json.dumps(value)) / 1024
    return Row(key=key, label=f"{label} ({kb:.0f} KB)", value=row.value / kb, unit="µs/KB",
               p90=(row.p90 or 0) / kb, n=row.n, note=f"{row.value:,.0f} µs per scan")


def measure_scan(n: int) -> list[Row]:
    """The scanner alone: a small result, and per KB of JSON and of log text."""
    return [
        _scan_row("scan_small", f"scan of a small result ({len(json.dumps(SMALL))} B of JSON)",
                  SMALL, n, False),
        _scan_row("scan_json_kb", "scan per KB of API-like JSON", records_json(16),
                  max(20, n // 50), True),
        _scan_row("scan_log_kb", "scan per KB of log text", log_text(16), max(20, n // 50), True),
    ]


def small_result() -> dict[str, Any]:
    return {"status": "ok", "count": 3, "items": ["alpha", "beta", "gamma"],
            "updated": "2024-01-15T12:30:00Z", "next": "https://api.example.com/v1/items?page=2"}


def measure_call_with_scan(n: int, warmup: int, block: int = 100) -> list[Row]:
    """A warm, untraced call returning a small dict, scanning on (the default) and off.

    Both sessions stay open and blocks of ``block`` calls alternate between them, so the
    load drifting on a shared machine weighs on both figures alike. The note gives the
    parent's CPU time per call (median over blocks, ``time.process_time_ns``), which the
    scan adds to directly and other processes disturb less than the wall clock.
    """
    with Session(scan=None) as on, Session(scan=False) as off:
        for s in (on, off):
            s.register("small", small_result)
            for _ in range(warmup):
                s.call("small")
        wall: dict[bool, list[int]] = {True: [], False: []}
        cpu: dict[bool, list[float]] = {True: [], False: []}
        block = max(1, min(block, n))
        for _ in range(max(1, n // block)):
            for flag, s in ((True, on), (False, off)):
                c0 = time.process_time_ns()
                wall[flag].extend(sample_ns(lambda: s.call("small"), block, 0))  # noqa: B023
                cpu[flag].append((time.process_time_ns() - c0) / block)
    return [latency_row(f"warm_small_scan_{'on' if flag else 'off'}",
                        "FailCore warm call returning a small dict, no trace, scan "
                        f"{'on (default)' if flag else 'off'} (blocks interleaved)",
                        wall[flag],
                        note=f"parent CPU {statistics.median(cpu[flag]) / 1000:.1f} µs per call")
            for flag in (True, False)]
