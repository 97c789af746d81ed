"""Workloads to profile, for the notes in PROFILE-NOTES.md.

    .venv/bin/py-spy record --idle --threads --nonblocking --format raw --subprocesses \\
        -o /tmp/warm.txt -- .venv/bin/python -m benchmarks._profile warm 20000
    .venv/bin/python -m benchmarks._profile stages 20000

``warm`` / ``fresh``: back-to-back traced calls; ``warm_tput``: 8 threads on 2 warm
workers (each prints the wall time per call so a profile can be read against it).
``stages``: times each parent-side step of a warm traced call on its own, through the
Session's private attributes (a diagnostic, not an API: it breaks when they change).
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks._failcore_bench import TOOL, Isolation, _session
from worker import protocol


def _median_us(fn: Callable[[], object], n: int) -> float:
    for _ in range(max(10, n // 10)):
        fn()
    clock = time.perf_counter_ns
    batch = 20
    samples = []
    for _ in range(max(1, n // batch)):
        start = clock()
        for _ in range(batch):
            fn()
        samples.append((clock() - start) / batch)
    return statistics.median(samples) / 1000


def stages(n: int) -> dict[str, float]:
    """Median µs of each parent-side step of ``session.call("inc", x=1)``, warm and traced."""
    from failcore import _wire

    with _session("tool", traced=True) as (s, _trace):
        call: Callable[[], object] = lambda: s.call(TOOL, x=1)  # noqa: E731
        total = _median_us(call, n)
        sess: Any = s
        tool = sess._tools[TOOL]
        trace, models, minter, policy = sess._trace, tool.models, sess._minter, s.policy
        kwargs = {"x": 1}
        args = models.validate_input(kwargs)
        token, mac = minter.mint("c1", TOOL, tool.parts, tool.limits.timeout_s)
        reply = protocol.encode("result", {"value": 2, "events": [], "retire": False})[protocol.HEADER.size:]
        out = {
            "whole call (session.call)": total,
            "redact args": _median_us(lambda: models.redact(kwargs), n),
            "validate_input": _median_us(lambda: models.validate_input(kwargs), n),
            "policy.precheck": _median_us(lambda: policy.precheck(tool.parts.grants, args), n),
            "TokenMinter.mint": _median_us(lambda: minter.mint("c1", TOOL, tool.parts, 10.0), n),
            "grants.to_wire() for token.mint record": _median_us(tool.parts.grants.to_wire, n),
            "trace.record call.start": _median_us(lambda: trace.record(
                "call.start", "c000001", {"tool": TOOL, "args": {"x": 1}}), n),
            "trace.record token.mint": _median_us(lambda: trace.record(
                "token.mint", "c000001", {"grants": tool.parts.grants.to_wire(),
                                          "limits": tool.parts.limits, "ttl_s": 10.0}), n),
            "trace.record ipc.send": _median_us(lambda: trace.record(
                "ipc.send", "c000001", {"type": "call", "bytes": 300, "worker": "w1"}), n),
            "protocol.encode call": _median_us(lambda: protocol.encode(
                "call", {"token": token, "mac": mac, "args": args}), n),
            "_wire.decode result": _median_us(lambda: _wire.decode(reply), n),
            "validate_output + output_to_json": _median_us(
                lambda: models.output_to_json(models.validate_output(2)), n),
            "trace.record call.end": _median_us(lambda: trace.record("call.end", "c000001", {
                "tool": TOOL, "status": "ok", "result": 2, "error": None, "duration_ms": 0.2}), n),
        }
    return out


def worker_stages(n: int) -> dict[str, float]:
    """Median µs of the worker's steps for one call, in a forked, locked-down stand-in worker.

    The stand-in gets the init body a real worker gets (without the uid drop) and runs
    ``worker.main._run_call`` and its parts; tokens are minted beforehand (each is single-use).
    """
    import json
    import os
    import tempfile
    import types

    from worker import guards
    from worker import main as wmain

    with _session("tool", traced=False) as (s, _trace):
        sess: Any = s
        tool = sess._tools[TOOL]
        base = tempfile.mkdtemp(prefix="w", dir=sess._root)
        body = sess._init_body(tool, types.SimpleNamespace(base_dir=base, extra={}))
        body["uid"] = None
        mint = sess._minter.mint
        calls = [{"token": t, "mac": m, "args": {"x": 1}}
                 for t, m in (mint(f"c{i}", TOOL, tool.parts, 60.0) for i in range(3 * n + 200))]
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the stand-in worker
            try:
                os.close(rfd)
                state = wmain._State()
                wmain.lock_down(state, body)
                it = iter(calls)
                grants = state.grants
                assert grants is not None
                cwd = os.path.join(base, "probe")
                reply = ("result", {"value": 2, "events": [], "retire": False})

                def scratch() -> None:
                    os.mkdir(cwd, 0o700)
                    os.chdir(cwd)
                    os.chdir(base)
                    os.rmdir(cwd)

                out = {
                    "_run_call (whole worker turn, without recv/send)":
                        _median_us(lambda: wmain._run_call(state, next(it)), n),
                    "_check_token (HMAC, split, json header)":
                        _median_us(lambda: wmain._check_token(state, next(it)), n),
                    "guards.set_call (realpath of every granted dir)":
                        _median_us(lambda: guards.set_call(grants, cwd), n),
                    "per-call scratch dir: mkdir+chdir+chdir+rmdir (audited)": _median_us(scratch, n),
                    "_cpu_used (getrusage)": _median_us(wmain._cpu_used, n),
                    "protocol.encode reply": _median_us(lambda: protocol.encode(*reply), n),
                    "implicit_read entries (a count, not µs)": float(len(grants.implicit_read)),
                }
                os.write(wfd, json.dumps(out).encode())
            finally:
                os._exit(0)
        os.close(wfd)
        with os.fdopen(rfd, "rb") as f:
            data = f.read()
        os.waitpid(pid, 0)
    return dict(json.loads(data)) if data else {}


class _Timed:
    """Wraps functions to sum their µs per phase (``phase`` is set by the caller)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.phase = ""

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                key = f"{self.phase}: {name}"
                self.times[key] = self.times.get(key, 0.0) + (time.perf_counter_ns() - start) / 1000
        return wrapper

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.phase = name
        start = time.perf_counter_ns()
        try:
            return fn()
        finally:
            self.times[f"{name} total"] = (time.perf_counter_ns() - start) / 1000


def _lockdown_child(body: dict[str, Any], token: bytes, mac: str) -> dict[str, float]:
    """In a forked stand-in worker: lock down and make the first call, timing the steps."""
    import dataclasses
    import os

    import cloudpickle

    from worker import guards
    from worker import main as wmain

    os.environ.clear()  # as in a real worker: the zygote's minimal environment
    os.environ.update(body["env"])
    t = _Timed()
    wmain._set_limits = t.wrap("_set_limits (rlimits)", wmain._set_limits)
    guards.install = t.wrap("guards.install", guards.install)
    guards._activate = t.wrap("guards._activate (realpath of granted dirs)", guards._activate)
    guards.set_call = t.wrap("guards.set_call", guards.set_call)
    cloudpickle.loads = t.wrap("cloudpickle.loads(tool)", cloudpickle.loads)
    dataclasses.replace = t.wrap("dataclasses.replace(grants)", dataclasses.replace)
    state = wmain._State()
    t.run("lock_down", lambda: wmain.lock_down(state, body))
    reply = t.run("first _run_call", lambda: wmain._run_call(
        state, {"token": token, "mac": mac, "args": {"x": 1}}))
    t.run("first encode reply", lambda: protocol.encode(*reply))
    return t.times


def lockdown_stages(n: int) -> dict[str, float]:
    """Median µs of the steps of ``worker.main.lock_down`` and the first call, over ``n``
    stand-in workers forked from this process (a real one is forked from the zygote,
    which has less memory to copy-on-write: its figures are a little lower)."""
    import json
    import os
    import tempfile
    import types

    samples: dict[str, list[float]] = {}
    with _session("call", traced=False) as (s, _trace):
        sess: Any = s
        tool = sess._tools[TOOL]
        for i in range(n):
            base = tempfile.mkdtemp(prefix="w", dir=sess._root)
            body = sess._init_body(tool, types.SimpleNamespace(base_dir=base, extra={}))
            body["uid"] = None
            token, mac = sess._minter.mint(f"c{i}", TOOL, tool.parts, 60.0)
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(rfd)
                    os.write(wfd, json.dumps(_lockdown_child(body, token, mac)).encode())
                finally:
                    os._exit(0)
            os.close(wfd)
            with os.fdopen(rfd, "rb") as f:
                data = f.read()
            os.waitpid(pid, 0)
            for name, us in json.loads(data).items():
                samples.setdefault(name, []).append(us)
    return {name: statistics.median(v) for name, v in sorted(samples.items())}


def main(argv: list[str]) -> int:
    what, n = argv[0], int(argv[1])
    table = {"stages": stages, "worker_stages": worker_stages, "lockdown_stages": lockdown_stages}
    if what in table:
        for name, us in table[what](n).items():
            print(f"{us:8.2f} us  {name}")
        return 0
    isolation: Isolation = "call" if what == "fresh" else "tool"
    with _session(isolation, traced=True) as (s, _trace):
        for _ in range(50):
            s.call(TOOL, x=1)
        start = time.perf_counter_ns()
        if what == "warm_tput":
            threads = [threading.Thread(target=lambda: [s.call(TOOL, x=1) for _ in range(n // 8)])
                       for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        else:
            for _ in range(n):
                s.call(TOOL, x=1)
        elapsed = time.perf_counter_ns() - start
    print(f"{what}: {n} calls, {elapsed / n / 1000:.1f} us per call (wall)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
