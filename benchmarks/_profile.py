"""Workloads to profile, for the notes in PROFILE-NOTES.md.

    .venv/bin/py-spy record --idle --threads --nonblocking --format raw --subprocesses \\
        -o /tmp/warm.txt -- .venv/bin/python -m benchmarks._profile warm 20000
    .venv/bin/python -m benchmarks._profile stages 20000

``warm`` / ``fresh``: back-to-back traced calls; ``warm_tput`` / ``fresh_tput``: 8 threads
on 2 workers (each prints the wall time per call, and the CPU per call of this process and
of its children, reaped when the session closes, so a profile can be read against it).
``stages``: times each parent-side step of a warm traced call on its own, through the
Session's private attributes (a diagnostic, not an API: it breaks when they change).
``worker_stages`` / ``lockdown_stages``: the worker's steps, in forked stand-in workers.
``fresh_hits``: how many back-to-back fresh calls found a worker initialised ahead.
"""

from __future__ import annotations

import itertools
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks._failcore_bench import TOOL, Isolation, _session
from failcore_worker import protocol


def _median_us(fn: Callable[[], object], n: int) -> float:
    """Median µs per call of ``fn``, timed in batches of 20."""
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


def _each_us(fn: Callable[[], object], n: int, before: Callable[[], object] | None = None,
             after: Callable[[], object] | None = None) -> float:
    """Median µs of ``fn`` timed call by call; ``before`` / ``after`` run untimed around it."""
    clock = time.perf_counter_ns
    warm = max(10, n // 10)
    samples = []
    for i in range(n + warm):
        if before is not None:
            before()
        start = clock()
        fn()
        elapsed = clock() - start
        if after is not None:
            after()
        if i >= warm:
            samples.append(elapsed)
    return statistics.median(samples) / 1000


def stages(n: int) -> dict[str, float]:
    """Median µs of each parent-side step of ``session.call("inc", x=1)``, warm and traced."""
    from benchmarks._baselines import measure_pipe
    from failcore import _values

    pipe = measure_pipe(n, 200).value
    with _session("tool", traced=False) as (s0, _trace):
        untraced = _median_us(lambda: s0.call(TOOL, x=1), n)
    with _session("tool", traced=True) as (s, _trace):
        call: Callable[[], object] = lambda: s.call(TOOL, x=1)  # noqa: E731
        total = _median_us(call, n)
        sess: Any = s
        tool = sess._tools[TOOL]
        trace, models, minter, policy, backend = (sess._trace, tool.models, sess._minter,
                                                  s.policy, sess._backend)
        kwargs = {"x": 1}
        args = models.validate_input(kwargs)
        token, mac = minter.mint("c1", TOOL, tool.parts, tool.limits.timeout_s)
        reply = protocol.encode_data("result", {"value": 2, "events": [], "retire": False,
                                                "call_id": "c1"})[protocol.HEADER.size:]
        ids = itertools.count()
        lease = backend.lease(tool.spec)
        assert not lease.fresh, "the warm worker should be initialised by the calls above"

        def round_trip() -> None:  # mint + encode + send + worker turn + recv + decode
            cid = f"r{next(ids)}"
            tok, m = minter.mint(cid, TOOL, tool.parts, 10.0)
            frame = protocol.encode("call", {"token": tok, "mac": m, "args": args})
            backend.exchange(lease, cid, frame)

        try:
            exchange = _median_us(round_trip, n)
        finally:
            backend.release(lease, True)

        def acquire_release() -> None:
            backend.release(backend.lease(tool.spec), True)

        out = {
            "bare multiprocessing.Pipe round trip (same process, for reference)": pipe,
            "whole call, no trace (session.call)": untraced,
            "whole call, JSONL trace (session.call)": total,
            "mint + encode + backend.exchange (the round trip, worker turn included)": exchange,
            "backend.lease + release (warm)": _median_us(acquire_release, n),
            "redact args": _median_us(lambda: models.redact(kwargs), n),
            "validate_input": _median_us(lambda: models.validate_input(kwargs), n),
            "policy.precheck": _median_us(lambda: policy.precheck(tool.parts.grants, args), n),
            "TokenMinter.mint": _median_us(lambda: minter.mint("c1", TOOL, tool.parts, 10.0), n),
            "protocol.encode call": _median_us(lambda: protocol.encode(
                "call", {"token": token, "mac": mac, "args": args}), n),
            "_values.decode_reply result": _median_us(lambda: _values.decode_reply(
                reply, protocol.reply_limit(tool.limits.output_bytes)), n),
            "validate_output + output_to_json": _median_us(
                lambda: models.output_to_json(models.validate_output(2)), n),
            "trace.record call.start": _median_us(lambda: trace.record(
                "call.start", "c000001", {"tool": TOOL, "args": {"x": 1}}, plain=True), n),
            "trace.record token.mint": _median_us(lambda: trace.record(
                "token.mint", "c000001", {"grants_sha256": tool.parts.grants_sha256,
                                          "limits": tool.parts.limits, "ttl_s": 10.0}, plain=True), n),
            "trace.record ipc.send": _median_us(lambda: trace.record(
                "ipc.send", "c000001", {"type": "call", "bytes": 300, "worker": "w1"}, plain=True), n),
            "trace.record ipc.recv": _median_us(lambda: trace.record(
                "ipc.recv", "c000001", {"type": "result", "bytes": 90}, plain=True), n),
            "trace.record call.end": _median_us(lambda: trace.record("call.end", "c000001", {
                "tool": TOOL, "status": "ok", "result": 2, "error": None, "duration_ms": 0.2},
                plain=True), n),
        }
    return out


def worker_stages(n: int) -> dict[str, float]:
    """Median µs of the worker's steps for one call, in a forked, locked-down stand-in worker.

    The stand-in gets the init body a real worker gets (without the uid drop) and runs
    ``failcore_worker.main._run_call`` and its parts; tokens are minted beforehand (each is single-use).
    """
    import dataclasses
    import json
    import os
    import tempfile

    from failcore_worker import guards
    from failcore_worker import main as wmain

    with _session("tool", traced=False) as (s, _trace):
        sess: Any = s
        tool = sess._tools[TOOL]
        base = tempfile.mkdtemp(prefix="w", dir=sess._backend._root)
        body = sess._backend.init_body(tool.spec, base)
        body["uid"] = None
        mint = sess._minter.mint
        calls = [{"token": t, "mac": m, "args": {"x": 1}}
                 for t, m in (mint(f"c{i}", TOOL, tool.parts, 60.0) for i in range(4 * n + 400))]
        frame = protocol.encode("call", calls[-1])[protocol.HEADER.size:]
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the stand-in worker
            try:
                os.close(rfd)
                state = wmain._State()
                wmain.lock_down(state, body)
                wmain._rehearse(state)
                it = iter(calls)
                grants = state.grants
                assert grants is not None
                cwd = os.path.join(base, "probe")
                guards.runtime_begin()
                os.mkdir(cwd, 0o700)
                guards.runtime_end()
                copies = [dataclasses.replace(grants) for _ in range(n + n // 10 + 10)]
                fresh = iter(copies)
                reply = {"value": 2, "events": [], "retire": False, "call_id": "c1"}

                def unaudited() -> None:
                    guards.runtime_begin()
                    os.chdir(cwd)
                    guards.runtime_end()
                    guards.runtime_begin()
                    os.chdir(base)
                    guards.runtime_end()

                def audited() -> None:
                    os.chdir(cwd)
                    os.chdir(base)

                out = {
                    "_run_call (the worker's turn on the caller's clock, without recv/send)":
                        _each_us(lambda: wmain._run_call(state, next(it)), n,
                                 after=lambda: wmain._between_calls(state)),
                    "_between_calls (rmdir + mkdir after the reply, off the clock)":
                        _each_us(lambda: wmain._between_calls(state), n,
                                 before=lambda: wmain._run_call(state, next(it))),
                    "_check_token (HMAC, split, json header)":
                        _median_us(lambda: wmain._check_token(state, next(it)), n),
                    "guards.set_call, activation cached (same grants object)":
                        _median_us(lambda: guards.set_call(grants, cwd), n),
                    "guards.set_call, new grants object (subset check + _activate)":
                        _each_us(lambda: guards.set_call(next(fresh), cwd), n),
                    "scratch chdir in + out, runtime_begin/end (as _run_call does)":
                        _median_us(unaudited, n),
                    "the same 2 chdir through the audit hook (what runtime_begin saves)":
                        _median_us(audited, n),
                    "protocol.decode call frame": _median_us(lambda: protocol.decode(frame), n),
                    "guards.take_events": _median_us(guards.take_events, n),
                    "_cpu_used (getrusage)": _median_us(wmain._cpu_used, n),
                    "encode_reply (value as data, JSON frame)": _median_us(
                        lambda: wmain.encode_reply("result", dict(reply), 1 << 24), n),
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
    """In a forked stand-in worker: what ``serve`` does for ``init`` (lock-down, then the
    rehearsal) and the first call, timing the steps."""
    import dataclasses
    import os

    import cloudpickle

    from failcore_worker import guards
    from failcore_worker import main as wmain

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
    t.run("_rehearse", lambda: wmain._rehearse(state))
    reply = t.run("first _run_call", lambda: wmain._run_call(
        state, {"token": token, "mac": mac, "args": {"x": 1}}))
    t.run("first encode reply", lambda: wmain.encode_reply(reply[0], reply[1], 1 << 24))
    t.run("first _between_calls", lambda: wmain._between_calls(state))
    return t.times


def lockdown_stages(n: int) -> dict[str, float]:
    """Median µs of the steps of ``failcore_worker.main.lock_down``, the rehearsal and the first call,
    over ``n`` stand-in workers forked from this process (a real one is forked from the
    zygote, which has less memory to copy-on-write: its figures are a little lower)."""
    import json
    import os
    import tempfile

    samples: dict[str, list[float]] = {}
    with _session("call", traced=False) as (s, _trace):
        sess: Any = s
        tool = sess._tools[TOOL]
        for i in range(n):
            base = tempfile.mkdtemp(prefix="w", dir=sess._backend._root)
            body = sess._backend.init_body(tool.spec, base)
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


def fresh_hits(n: int, gap_s: float = 0.0) -> dict[str, float]:
    """Back-to-back fresh traced calls: how many found a worker initialised ahead
    (``Pool.take_ready``), and the median µs of the call in each case."""
    samples: dict[bool, list[float]] = {True: [], False: []}
    with _session("call", traced=True) as (s, _trace):
        sess: Any = s
        pool = sess._backend._pool
        take_ready = pool.take_ready
        hit = [False]

        def counted(tool: str) -> Any:
            worker = take_ready(tool)
            hit[0] = worker is not None
            return worker

        pool.take_ready = counted
        for _ in range(20):
            s.call(TOOL, x=1)
        for _ in range(n):
            start = time.perf_counter_ns()
            s.call(TOOL, x=1)
            samples[hit[0]].append((time.perf_counter_ns() - start) / 1000)
            if gap_s:
                time.sleep(gap_s)
    hits, misses = samples[True], samples[False]
    return {
        "calls (a count)": float(n),
        "served by a ready worker (%, not µs)": 100.0 * len(hits) / n,
        "median call, ready worker (one round trip)": statistics.median(hits) if hits else 0.0,
        "median call, no ready worker (fork wait + init + call)":
            statistics.median(misses) if misses else 0.0,
        "median call, all": statistics.median(hits + misses),
    }


def _cpu() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def main(argv: list[str]) -> int:
    what, n = argv[0], int(argv[1])
    table: dict[str, Callable[[int], dict[str, float]]] = {
        "stages": stages, "worker_stages": worker_stages, "lockdown_stages": lockdown_stages,
        "fresh_hits": fresh_hits, "fresh_hits_sparse": lambda k: fresh_hits(k, 0.02)}
    if what in table:
        for name, us in table[what](n).items():
            print(f"{us:8.2f} us  {name}")
        return 0
    isolation: Isolation = "call" if what.startswith("fresh") else "tool"
    cpu0 = _cpu()
    with _session(isolation, traced=True) as (s, _trace):
        for _ in range(50):
            s.call(TOOL, x=1)
        start = time.perf_counter_ns()
        if what.endswith("_tput"):
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
    cpu1 = _cpu()
    calls = n + 50
    print(f"{what}: {n} calls, {elapsed / n / 1000:.1f} us per call (wall), {n * 1e9 / elapsed:.0f} "
          f"calls/s; CPU per call (whole session): this process "
          f"{(cpu1[0] - cpu0[0]) / calls * 1e6:.0f} us, children (zygote + workers) "
          f"{(cpu1[1] - cpu0[1]) / calls * 1e6:.0f} us", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
