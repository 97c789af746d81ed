"""Hostile replies (issue 12 item 1): a tool that controls its worker's reply bytes.

The tool replaces its worker's reply encoder (``failcore_worker.main.encode_reply``, the
one function the run loop calls to build a reply) with one that returns bytes of the
attacker's choosing: the pickles that allocated 2 GiB or looped in the parent before,
JSON shaped for the worst memory amplification, hash floods, bad tags, deep nesting.
Each is refused or bounded, the worker is retired, and the next call works. The parent's
memory is measured in a subprocess (its own peak RSS, ``VmHWM``, reset per case).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from conftest import idle_worker_pids
from test_reliability_support import wait_gone

from failcore import (
    Limits,
    OutputValidationError,
    ResourceLimitExceeded,
    Session,
    ToolMetadata,
    WorkerCrashed,
)
from failcore_worker import _data_cost, protocol

MB = 1 << 20


def hostile_payload(kind: str, size: int, call_id: str = "") -> bytes:
    """A reply payload (after the header) of about ``size`` bytes, of the given kind,
    naming ``call_id`` (a tool can read its own call id: the parent must not rely on it)."""
    tail_default = ',"events":[],"call_id":"' + call_id + '"}]'

    def array(item: str, head: str = '["result",{"value":', tail: str = tail_default) -> bytes:
        count = max(1, (size - len(head) - len(tail) - 2) // (len(item) + 1))
        return (head + "[" + ",".join([item] * count) + "]" + tail).encode()

    if kind == "pickle_2gib":  # the 40-byte reply: bytearray(2**31) when unpickled
        return b"cbuiltins\nbytearray\n\x8a\x05\x00\x00\x00\x80\x00\x85R."
    if kind == "pickle_loop":  # deque(range(N), 1): seconds of CPU when unpickled
        return b"ccollections\ndeque\ncbuiltins\nrange\n\x8a\x05\x00\xe4\x0bT\x02\x85RK\x01\x86R."
    if kind == "empty_dicts":  # 24x when parsed: refused unparsed
        return array("{}")
    if kind == "nested_dicts":  # ~37x when parsed: refused unparsed
        return array('{"":{"":{"":{"":{}}}}}')
    if kind == "ints":  # the worst shape that passes the estimate (~10x when parsed)
        return array("257")
    if kind == "short_strings":
        return array('"ab"')
    if kind == "big_ints":  # the slowest numbers to parse
        return array("9" * 4000)
    if kind == "hash_flood":  # small enough to pass the budget, so the flood check refuses it
        keys = ",".join(str(k * (2**61 - 1)) for k in range(1, min(size // 22, 20_000)))
        return ('["result",{"value":{"$set":[' + keys + ']},"events":[]}]').encode()
    if kind == "sets":  # cheap text, expensive sets: stopped while decoding
        return array('{"$set":[' + ",".join(str(1000 + i) for i in range(40)) + "]}")
    if kind == "bad_tag":
        return b'["result",{"value":{"$pickle":"gASV"},"events":[]}]'
    if kind == "blob_overrun":
        return b'["result",{"value":{"$bytes":99999999},"events":[]}]\0abc'
    if kind == "deep":  # past the parser's recursion limit, within the budget
        return b'["result",{"value":' + b"[" * 5000 + b"]" * 5000 + b"}]"
    if kind == "very_deep":
        return b'["result",{"value":' + b"[" * 200_000 + b"]" * 200_000 + b"}]"
    if kind == "not_a_reply":
        return b'["exec",{"code":"import os"}]'
    raise ValueError(kind)


def hostile(kind: str, size: int):  # type: ignore[no-untyped-def]  # no annotation: plain data
    """Runs in the worker: the next reply this worker sends is the attacker's bytes
    (``kind="honest"``: an ordinary call)."""
    import sys as worker_sys

    if kind == "honest":
        return
    main = worker_sys.modules["failcore_worker.main"]

    def forged(_kind: str, body: dict, output_bytes: int) -> bytes:  # type: ignore[type-arg]
        payload = hostile_payload(kind, size, str(body.get("call_id")))
        return protocol.HEADER.pack(len(payload)) + payload

    main.encode_reply = forged


def square(x: int) -> int:
    return x * x


EXPECTED: dict[str, tuple[type[Exception], str]] = {
    "pickle_2gib": (WorkerCrashed, "not a reply .not UTF-8"),
    "pickle_loop": (WorkerCrashed, "not a reply .not UTF-8"),
    "empty_dicts": (ResourceLimitExceeded, "was not decoded: decoding it could take"),
    "nested_dicts": (ResourceLimitExceeded, "was not decoded"),
    "sets": (ResourceLimitExceeded, "was not decoded"),
    "hash_flood": (OutputValidationError, "hash flooding"),
    "bad_tag": (OutputValidationError, "unknown tag '\\$pickle'"),
    "blob_overrun": (OutputValidationError, "past the blob tail"),
    "deep": (WorkerCrashed, "not JSON: maximum recursion depth"),
    "very_deep": (ResourceLimitExceeded, "was not decoded"),
    "short_strings": (ResourceLimitExceeded, "was not decoded"),
    "not_a_reply": (WorkerCrashed, "unknown reply kind 'exec'"),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_a_hostile_reply_is_refused_and_its_worker_retired(kind: str) -> None:
    error, match = EXPECTED[kind]
    with Session() as s:
        s.register("hostile", hostile, ToolMetadata(
            isolation="tool", limits=Limits(output_bytes=MB, timeout_s=30)))
        s.register("square", square, ToolMetadata(isolation="tool"))
        assert s.call("hostile", kind="honest", size=0) is None
        (pid,) = idle_worker_pids(s, "hostile")
        with pytest.raises(error, match=match):
            s.call("hostile", kind=kind, size=protocol.reply_limit(MB) - 64)
        assert not idle_worker_pids(s, "hostile") and wait_gone([pid]) == [], \
            "the worker that sent it is retired"
        assert s.call("hostile", kind="honest", size=0) is None  # a new, honest worker
        assert idle_worker_pids(s, "hostile") != [pid]
        assert s.call("square", x=5) == 25


_RSS_SCRIPT = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {tests!r})
    from failcore import Session, ToolMetadata, Limits, FailCoreError
    from test_reply_attacks import hostile

    def hwm_and_rss():
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return (int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024)

    out = {{}}
    with Session() as s:
        s.register("hostile", hostile, ToolMetadata(
            isolation="tool", limits=Limits(output_bytes={output_bytes}, timeout_s=60)))
        for kind in {kinds!r}:
            s.register("warm_" + kind, hostile, ToolMetadata(
                isolation="tool", limits=Limits(output_bytes={output_bytes}, timeout_s=60)))
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            base = hwm_and_rss()[1]
            started = time.monotonic()
            try:
                s.call("warm_" + kind, kind=kind, size={size})
                outcome = "ok"
            except FailCoreError as exc:
                outcome = type(exc).__name__
            out[kind] = {{"peak": hwm_and_rss()[0] - base, "seconds": time.monotonic() - started,
                          "outcome": outcome}}
    print(json.dumps(out))
""")


def test_parent_memory_and_time_stay_bounded_under_hostile_replies() -> None:
    """Parent peak RSS growth per hostile reply, in a fresh interpreter: never above the
    guarantee (the frame plus DECODE_MULTIPLE x the frame limit), and a small multiple of
    output_bytes for every shape (figures printed with -s; RELIABILITY.md records them)."""
    output_bytes = 4 * MB
    frame_limit = protocol.reply_limit(output_bytes)
    kinds = ["pickle_2gib", "pickle_loop", "empty_dicts", "nested_dicts", "ints",
             "short_strings", "big_ints", "hash_flood", "sets"]
    script = _RSS_SCRIPT.format(tests=os.path.dirname(__file__), output_bytes=output_bytes,
                                kinds=kinds, size=frame_limit - 64)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    guarantee = frame_limit * (1 + _data_cost.DECODE_MULTIPLE)
    print(f"\nhostile replies, output_bytes={output_bytes // MB} MiB "
          f"(frame limit {frame_limit / MB:.2f} MiB, guarantee {guarantee / MB:.0f} MiB):")
    for kind, fig in figures.items():
        print(f"  {kind:14s} {fig['outcome']:22s} peak +{fig['peak'] / MB:6.1f} MiB "
              f"({fig['peak'] / output_bytes:4.1f}x output_bytes) in {fig['seconds']:.2f} s")
    for kind, fig in figures.items():
        assert fig["peak"] <= guarantee, (kind, fig)
    assert figures["ints"]["outcome"] == figures["big_ints"]["outcome"] == "ok"
    for refused in ("empty_dicts", "nested_dicts", "short_strings", "sets"):  # ~the frame only
        assert figures[refused]["peak"] <= 3 * frame_limit, figures[refused]
    for kind in ("pickle_2gib", "pickle_loop"):
        assert figures[kind]["peak"] < 16 * MB and figures[kind]["outcome"] == "WorkerCrashed"
