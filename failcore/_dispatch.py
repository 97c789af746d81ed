"""Send one call to a worker, wait for the answer within the deadline, map failures.

The parent never reads more than the tool's output limit: the frame header is checked
before the payload is read, and the reply is decoded as data (``failcore._values``),
bounded before it is parsed. On timeout, oversize output, a reply that is not valid data
or a lost worker, the whole process tree is killed and the worker is never reused.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from failcore import _values
from failcore._errors import (
    CallCancelled,
    FailCoreError,
    OutputValidationError,
    ResourceLimitExceeded,
    SecurityError,
    ToolFailed,
    ToolTimeout,
    WorkerCrashed,
)
from failcore._workers import Pool, Worker
from failcore_worker import protocol


@dataclass
class Outcome:
    """What came back: a value, or an error to raise, plus what to record."""

    value: Any = None
    error: FailCoreError | None = None
    status: str = "ok"
    events: list[dict[str, Any]] = field(default_factory=list)
    recv_kind: str | None = None
    recv_bytes: int = 0
    reuse: bool = True


def exchange(pool: Pool, worker: Worker, tool: str, frames: list[bytes],
             timeout_s: float, output_bytes: int) -> Outcome:
    """Send the already-encoded ``frames`` and wait for one reply within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    worker.busy_since = time.monotonic()
    try:
        worker.chan.settimeout(timeout_s)
        try:
            worker.chan.sendall(b"".join(frames) if len(frames) > 1 else frames[0])
        except (BrokenPipeError, ConnectionResetError):
            # The worker was dead before the request reached it (e.g. its zygote was
            # killed): nothing ran, so the caller may safely try another worker.
            worker.kill("undelivered")
            return Outcome(status="undelivered", reuse=False, error=WorkerCrashed(
                f"{tool}: the worker was gone before the request reached it"))
        payload = protocol.recv_frame(worker.chan, protocol.reply_limit(output_bytes))
    except TimeoutError:
        worker.kill("timeout")
        return Outcome(status="timeout", reuse=False, error=ToolTimeout(
            f"{tool}: no answer within timeout_s={timeout_s:g}; the worker's process tree was "
            "killed. Raise Limits(timeout_s=...) at registration if the tool needs longer."))
    except protocol.FrameTooLarge as exc:
        worker.kill("output")
        return Outcome(status="resource", reuse=False, error=ResourceLimitExceeded(
            f"{tool}: result of {exc.size} bytes exceeds output_bytes={output_bytes} (not read); "
            "return less or raise Limits(output_bytes=...)"))
    except (protocol.PeerClosed, ConnectionError, OSError):
        return _lost(pool, worker, tool, deadline)
    finally:
        worker.busy_since = None
    return _read_reply(worker, tool, payload, output_bytes)


def _read_reply(worker: Worker, tool: str, payload: bytes | bytearray,
                output_bytes: int) -> Outcome:
    """Decode the reply as data; a reply that is not is the worker's fault: it is retired."""
    recv_bytes = len(payload) + protocol.HEADER.size
    try:
        kind, body = _values.decode_reply(payload, protocol.reply_limit(output_bytes))
    except _values.ReplyTooLarge as exc:
        worker.kill("output")
        return Outcome(status="resource", reuse=False, recv_bytes=recv_bytes,
                       error=ResourceLimitExceeded(
            f"{tool}: the reply was not decoded: {exc}; the worker was retired. Return fewer, "
            "larger items or raise Limits(output_bytes=...)"))
    except _values.BadValue as exc:
        worker.kill("invalid_reply")
        return Outcome(status="invalid_output", reuse=False, recv_bytes=recv_bytes,
                       error=OutputValidationError(
            f"{tool}: the worker's reply is not valid data ({exc}); the worker was retired"))
    except _values.BadReply as exc:
        worker.kill("invalid_reply")
        return Outcome(status="crashed", reuse=False, recv_bytes=recv_bytes,
                       error=WorkerCrashed(
            f"{tool}: the worker sent a reply that is not a reply ({exc}); the worker was "
            "retired"))
    out = Outcome(recv_kind=kind, recv_bytes=recv_bytes, events=list(body.get("events") or []))
    if kind == "result":
        out.value = body.get("value")
        out.reuse = body.get("retire") is not True
        return out
    return _map_error(tool, body, out)


def _map_error(tool: str, body: dict[str, Any], out: Outcome) -> Outcome:
    kind = body.get("kind")
    rtype, message = str(body.get("type", "")), str(body.get("message", ""))
    out.reuse = kind == protocol.ERR_TOOL
    if kind == protocol.ERR_DENIED:
        blocked = next((e for e in out.events if e.get("action") == "block"), {})
        rule = str(blocked.get("rule", "worker guard"))
        target = str(blocked.get("target") or blocked.get("path") or blocked.get("host") or "")
        out.status = "blocked"
        out.error = SecurityError(
            f"{tool}: blocked inside the worker: {blocked.get('reason') or message} [rule: {rule}]",
            rule=rule, target=target, layer="worker")
    elif kind == protocol.ERR_TOKEN:
        out.status = "blocked"
        out.error = SecurityError(f"{tool}: the worker refused the call: {message}",
                                  rule="capability token", layer="token")
    elif kind in (protocol.ERR_MEMORY, protocol.ERR_RESOURCE):
        out.status = "resource"
        out.error = ResourceLimitExceeded(f"{tool}: {message} ({rtype})")
    elif kind == protocol.ERR_TOO_LARGE:
        out.status = "resource"
        out.reuse = True
        out.error = ResourceLimitExceeded(f"{tool}: {message}")
    elif kind == protocol.ERR_OUTPUT:
        out.status = "invalid_output"
        out.reuse = True
        out.error = OutputValidationError(f"{tool}: {message}")
    else:
        out.status = "failed"
        what = "could not be loaded in the worker" if kind == protocol.ERR_INIT else "raised"
        out.error = ToolFailed(
            f"{tool}: the tool {what} {rtype}: {message}",
            remote_type=rtype, remote_message=message,
            remote_traceback=str(body.get("traceback", "")))
    return out


def _lost(pool: Pool, worker: Worker, tool: str, deadline: float) -> Outcome:
    """The channel closed: find out why (our own kill, a limit, a crash)."""
    reason = worker.kill_reason
    worker.kill(reason or "crashed")
    status = pool.wait_status(worker, 2.0)
    if reason == "cancelled":
        return Outcome(status="cancelled", reuse=False, error=CallCancelled(
            f"{tool}: the call was cancelled by its caller; the worker's tree was killed"))
    if reason == "processes":
        return Outcome(status="resource", reuse=False, error=ResourceLimitExceeded(
            f"{tool}: the watchdog killed the worker: {worker.kill_detail}; raise "
            "Limits(processes=...) if the tool needs more"))
    if reason in ("memory",):
        return Outcome(status="resource", reuse=False, error=ResourceLimitExceeded(
            f"{tool}: the worker exceeded its memory limit and was killed ({worker.kill_detail})"))
    if reason in ("net", "exec"):
        return Outcome(status="blocked", reuse=False, error=SecurityError(
            f"{tool}: the watchdog killed the worker: {worker.kill_detail}",
            rule=f"watchdog: {reason}", layer="watchdog"))
    if reason == "timeout" or time.monotonic() > deadline:
        return Outcome(status="timeout", reuse=False, error=ToolTimeout(
            f"{tool}: timed out; the worker's process tree was killed"))
    if status is not None and os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig in (signal.SIGXCPU, signal.SIGXFSZ):
            return Outcome(status="resource", reuse=False, error=ResourceLimitExceeded(
                f"{tool}: the worker was stopped by {name} (CPU or file size rlimit)"))
        return Outcome(status="crashed", reuse=False, error=WorkerCrashed(
            f"{tool}: the worker was killed by {name} before answering"))
    zygote = worker.extra.get("zygote")
    if status is None and zygote is not None and zygote.proc.poll() is not None:
        return Outcome(status="crashed", reuse=False, error=WorkerCrashed(
            f"{tool}: the worker died with its zygote (killed from outside, or by the OOM "
            "killer) before answering; a new zygote serves the next calls"))
    code = os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
    return Outcome(status="crashed", reuse=False, error=WorkerCrashed(
        f"{tool}: the worker exited (code {code}) before answering"))
