"""The anchor: the published ``failcore==0.1.3`` timed on the same tool, in its own venv.

It has the same distribution name as this project, so it can never share an interpreter
with it: it lives in ``benchmarks/.anchor-venv`` (gitignored) and is timed by a script
run there with ``-I`` (this repository is not on its path), from a temp directory that is
also its HOME and ``FAILCORE_PROJECT_ROOT`` (0.1.3 creates a ``.failcore`` project
directory and a SQLite file wherever it decides the project root is). The script prints
one JSON line. Any failure becomes an ``Unavailable`` with the reason: the run goes on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._timing import Row, Unavailable

ANCHOR_VERSION = "0.1.3"
DEFAULT_VENV = Path(__file__).resolve().parent / ".anchor-venv"
_KEY = "anchor_traced"
_LABEL = f"anchor failcore=={ANCHOR_VERSION} Session.call, JSONL trace (in-process)"

# Runs inside the anchor venv. 0.1.3's Session.call executes the tool in-process and
# returns a StepResult (it does not raise); auto_ingest=False keeps SQLite off the path.
_SCRIPT = r"""
import importlib.metadata, json, os, statistics, sys, time
from failcore.api import Session
n, warmup, tmp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def inc(x: int) -> int:
    return x + 1
trace = os.path.join(tmp, "trace.jsonl")
s = Session(trace=trace, sandbox=os.path.join(tmp, "sandbox"), auto_ingest=False)
s.register("inc", inc)
for _ in range(warmup):
    r = s.call("inc", x=1)
status = str(getattr(r.status, "value", r.status))
value = r.output.value if r.output is not None else None
if status.lower() != "ok" or value != 2:
    raise SystemExit(f"anchor call did not return 2: status={status} value={value!r}")
size = os.path.getsize(trace)
clock = time.perf_counter_ns
samples = []
for _ in range(n):
    t = clock()
    s.call("inc", x=1)
    samples.append(clock() - t)
size = os.path.getsize(trace) - size
s.close()
samples.sort()
print(json.dumps({"version": importlib.metadata.version("failcore"),
                  "median_ns": statistics.median(samples),
                  "p90_ns": samples[min(len(samples) - 1, round(0.9 * (len(samples) - 1)))],
                  "n": n, "trace_bytes_per_call": size / n}))
"""


def _tail(text: str | bytes | None, limit: int = 200) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [ln.strip() for ln in (text or "").strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else "no output")[:limit]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_anchor(venv: Path = DEFAULT_VENV, timeout_s: float = 300.0) -> Path | Unavailable:
    """The anchor venv's interpreter, creating the venv and installing 0.1.3 when missing."""
    python = venv_python(venv)
    if _installed_version(python) == ANCHOR_VERSION:
        return python
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                           capture_output=True, timeout=timeout_s)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"failcore=={ANCHOR_VERSION}"],
                       check=True, capture_output=True, timeout=timeout_s)
    except subprocess.CalledProcessError as exc:
        return Unavailable(_KEY, _LABEL, f"installing failcore=={ANCHOR_VERSION} failed: {_tail(exc.stderr)}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Unavailable(_KEY, _LABEL, f"installing failcore=={ANCHOR_VERSION} failed: {exc}")
    version = _installed_version(python)
    if version != ANCHOR_VERSION:
        return Unavailable(_KEY, _LABEL, f"{venv} holds failcore {version}, not {ANCHOR_VERSION}")
    return python


def _installed_version(python: Path) -> str | None:
    if not python.exists():
        return None
    try:
        out = subprocess.run(
            [str(python), "-I", "-c",
             "import importlib.metadata as m; print(m.version('failcore'))"],
            capture_output=True, text=True, timeout=60, cwd=tempfile.gettempdir())
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def measure_anchor(python: Path | str, n: int, warmup: int, timeout_s: float = 120.0) -> Row | Unavailable:
    """Median of 0.1.3's traced ``Session.call`` on ``inc``, run by ``python`` in a subprocess."""
    with tempfile.TemporaryDirectory(prefix="failcore-anchor-") as tmp:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp,
               "FAILCORE_PROJECT_ROOT": tmp, "LANG": "C.UTF-8"}
        try:
            proc = subprocess.run([str(python), "-I", "-c", _SCRIPT, str(n), str(warmup), tmp],
                                  capture_output=True, text=True, timeout=timeout_s, cwd=tmp, env=env)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return Unavailable(_KEY, _LABEL, f"running the anchor failed: {exc}")
    if proc.returncode != 0:
        return Unavailable(_KEY, _LABEL, f"the anchor exited {proc.returncode}: {_tail(proc.stderr)}")
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        median_us, p90_us = float(data["median_ns"]) / 1000, float(data["p90_ns"]) / 1000
        version = str(data["version"])
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return Unavailable(_KEY, _LABEL, f"unreadable anchor output ({exc}): {_tail(proc.stdout)}")
    if version != ANCHOR_VERSION:
        return Unavailable(_KEY, _LABEL, f"{python} runs failcore {version}, not {ANCHOR_VERSION}")
    return Row(_KEY, _LABEL, median_us, "µs", p90=p90_us, n=int(data["n"]),
               note=f"{float(data['trace_bytes_per_call']):.0f} trace bytes per call")
