"""Where workers run: the one seam between the Session and the processes that run tools.

::

    Session                                   Backend                       worker
    validate, precheck, token, trace   ──►    lease(spec)            ──►    init (lock down, load)
                                       ──►    exchange(lease, id, call) ─►  call
                                       ◄──    Outcome                ◄──    reply (data)
                                       ──►    release(lease, reuse)         (reused, or retired)

A backend leases a worker for a tool, sends one call's frame and waits for its reply within
the tool's deadline and output bound, and releases the worker for reuse or retires it. It
watches its own workers from outside while they are busy and stops them all on ``close``.
It never writes the trace: it reports (``Lease``, ``Outcome``) and the Session, the single
trace writer, records. Validation, policy, tokens and the trace stay with the caller.

``LocalBackend`` (``failcore._local``) runs workers on this machine; ``FakeBackend``
(``failcore.testing``) runs tools in-process, so tests of everything above the seam need
no process at all. A new place to run workers is one class implementing ``Backend``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from failcore import _values
from failcore._confinement import Confinement, ToolConfinement
from failcore._errors import (
    FailCoreError,
    OutputValidationError,
    ResourceLimitExceeded,
    SecurityError,
    ToolFailed,
    WorkerCrashed,
)
from failcore_worker import protocol
from failcore_worker.rules import Grants

Isolation = Literal["tool", "call"]


@dataclass(frozen=True)
class ToolSpec:
    """Everything a backend needs to run one registered tool (plain data: it may travel).

    ``grants``/``grants_bytes``: what its workers lock down to (the token's grants part).
    ``limits``: the one route limits take (lock-down, deadline, output bound, watchdog).
    ``blob``: the pickled function. ``env_names``: the granted ``env:`` patterns, whose values
    are read where the worker starts. ``network``: "none" (the worker's network namespace is
    empty) or "host" (``failcore._confinement.network_mode``).
    """

    name: str
    isolation: Isolation
    grants: Grants
    grants_bytes: bytes
    limits: protocol.LimitsWire
    blob: bytes
    env_names: tuple[str, ...] = ()
    network: Literal["none", "host"] = "none"


class WorkerRef(Protocol):
    """What the Session sees of a leased worker: its trace name, pid and kill reason."""

    name: str
    pid: int
    kill_reason: str | None


@dataclass(eq=False)
class Lease:
    """One worker held for one call. ``fresh``: this call is the worker's first (the trace
    records a spawn); ``init_bytes``: the size of its ``init`` message, sent now or ahead."""

    spec: ToolSpec
    worker: WorkerRef
    fresh: bool
    init_bytes: int = 0
    handle: Any = field(default=None, repr=False)  # the backend's own state


@dataclass
class Outcome:
    """What came back: a value, or an error to raise, plus what to record.

    ``status`` is the ``call.end`` status; ``undelivered`` means nothing ran and the
    Session may try another worker. ``reuse`` says whether the worker may serve again.
    """

    value: Any = None
    error: FailCoreError | None = None
    status: str = "ok"
    events: list[dict[str, Any]] = field(default_factory=list)
    recv_kind: str | None = None
    recv_bytes: int = 0
    reuse: bool = True
    cpu_s: float = 0.0  # CPU the worker reported for the call (0 when it did not answer)
    blocks: int = 0  # refusals the worker counted (may exceed the block events it listed)


class Backend(Protocol):
    """The seam. Thread-safe: calls on different leases may run concurrently.

    ``confinement``: what kernel confinement its workers run under, once started (the
    Session reports it and, under ``confinement="require"``, refuses to start without it).
    """

    confinement: Confinement

    def start(self, key: bytes) -> None:
        """Start (once, before any lease) with the session's token key."""

    def prepare(self, spec: ToolSpec) -> ToolConfinement:
        """At registration: get ready to run ``spec`` (plan its confinement, start what it
        needs) and say how its workers will be confined."""

    def lease(self, spec: ToolSpec) -> Lease:
        """A worker for one call of ``spec``; blocks while the tool's workers are all busy."""

    def exchange(self, lease: Lease, call_id: str, call_frame: bytes) -> Outcome:
        """Send the encoded ``call`` and wait for its reply (which must name ``call_id``)
        within ``spec.limits``."""

    def release(self, lease: Lease, reuse: bool) -> None:
        """Give the worker back for reuse, or retire it (kill its tree) when ``reuse`` is false."""

    def abort(self, lease: Lease, reason: str) -> None:
        """Kill the leased worker's tree now, from any thread (a cancelled ``acall``)."""

    def close(self) -> None:
        """Stop every worker and release every resource; idempotent."""


def read_reply(tool: str, call_id: str, payload: bytes | bytearray, output_bytes: int,
               retire: Callable[[str], None],
               observed: Sequence[dict[str, Any]] = ()) -> Outcome:
    """Decode a worker's reply as data (never a pickle: ``failcore._values``) and check it
    answers ``call_id``. A reply that is not valid data, or answers another call, is the
    worker's fault: ``retire(reason)`` is called and the worker is never reused.
    ``observed``: events the parent saw itself during the call (the socket broker's)."""
    size = len(payload) + protocol.HEADER.size
    try:
        kind, body = _values.decode_reply(payload, protocol.reply_limit(output_bytes))
    except _values.ReplyTooLarge as exc:
        retire("output")
        return Outcome(status="resource", reuse=False, recv_bytes=size, error=ResourceLimitExceeded(
            f"{tool}: the reply was not decoded: {exc}; the worker was retired. Return fewer, "
            "larger items or raise Limits(output_bytes=...)"))
    except _values.BadValue as exc:
        retire("invalid reply")
        return Outcome(status="invalid_output", reuse=False, recv_bytes=size,
                       error=OutputValidationError(
            f"{tool}: the worker's reply is not valid data ({exc}); the worker was retired"))
    except _values.BadReply as exc:
        retire("invalid reply")
        return Outcome(status="crashed", reuse=False, recv_bytes=size, error=WorkerCrashed(
            f"{tool}: the worker sent a reply that is not a reply ({exc}); the worker was retired"))
    if body.get("call_id") != call_id:
        # A stale reply, or one a tool forged on the channel: never taken for this call's.
        retire("a reply for another call")
        return Outcome(status="crashed", reuse=False, recv_bytes=size, error=WorkerCrashed(
            f"{tool}: the worker answered call {str(body.get('call_id'))[:40]!r}, not "
            f"{call_id!r}; it was retired and the reply discarded"))
    return interpret(tool, kind, body, Outcome(recv_bytes=size), observed)


def blocked_call(tool: str, out: Outcome, events: list[dict[str, Any]]) -> None:
    """Fail ``out`` as blocked by the first refusal in ``events``: a refused operation
    fails the call even when the tool caught the error (the attempt is what matters)."""
    blocked = _first_block(events)
    rule = str(blocked.get("rule", "guard"))
    where = "by the socket broker" if blocked.get("observed") == "parent" else "inside the worker"
    out.status, out.reuse = "blocked", out.reuse and blocked.get("observed") == "parent"
    out.value = None
    out.error = SecurityError(
        f"{tool}: blocked {where}: {blocked.get('reason', '')} [rule: {rule}]", rule=rule,
        target=str(blocked.get("target") or blocked.get("path") or blocked.get("host") or ""),
        layer="worker")


def _first_block(events: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The refusal that names the rule: one the parent saw itself before the worker's word."""
    blocks = [e for e in events if e.get("action") == "block"]
    return next((e for e in blocks if e.get("observed") == "parent"), blocks[0] if blocks else {})


def interpret(tool: str, kind: str, body: dict[str, Any], out: Outcome,
              observed: Sequence[dict[str, Any]] = ()) -> Outcome:
    """Fill ``out`` from a worker's reply ``(kind, body)``: the same for every backend.

    Every event the reply carries is the worker's word (a hostile tool can lie in it):
    it is marked ``observed: "worker"``, whatever it claims. ``blocks`` counts refusals
    apart from the bounded event list, so no refusal is lost to a cap.
    """
    out.recv_kind = kind
    events = [dict(e, observed="worker") for e in body.get("events") or ()]
    events.extend(observed)
    out.events = events
    out.cpu_s = _cpu_seconds(body.get("cpu_s"))
    blocks = body.get("blocks", 0)
    out.blocks = blocks if type(blocks) is int and blocks > 0 else 0
    if kind == "result":
        out.value = body.get("value")
        out.reuse = body.get("retire") is not True
        if out.blocks or any(e.get("action") == "block" for e in events):
            blocked_call(tool, out, events if any(e.get("action") == "block" for e in events)
                         else [{"action": "block", "rule": "guard",
                                "reason": f"{out.blocks} operations were refused"}])
            out.reuse = False
        return out
    err_kind = body.get("kind")
    rtype, message = str(body.get("type", "")), str(body.get("message", ""))
    out.reuse = err_kind in (protocol.ERR_TOOL, protocol.ERR_OUTPUT, protocol.ERR_TOO_LARGE) \
        and body.get("retire") is not True
    if err_kind == protocol.ERR_DENIED or (out.blocks and err_kind == protocol.ERR_TOOL) \
            or (err_kind == protocol.ERR_TOOL and any(e.get("observed") == "parent"
                                                      and e.get("action") == "block"
                                                      for e in observed)):
        if any(e.get("action") == "block" for e in events):
            blocked_call(tool, out, events)
        else:
            out.status = "blocked"
            out.error = SecurityError(f"{tool}: blocked inside the worker: {message} "
                                      "[rule: worker guard]", rule="worker guard", layer="worker")
    elif err_kind == protocol.ERR_TOKEN:
        out.status = "blocked"
        out.error = SecurityError(f"{tool}: the worker refused the call: {message}",
                                  rule="capability token", layer="token")
    elif err_kind in (protocol.ERR_MEMORY, protocol.ERR_RESOURCE, protocol.ERR_TOO_LARGE):
        out.status = "resource"
        out.error = ResourceLimitExceeded(f"{tool}: {message}" if err_kind == protocol.ERR_TOO_LARGE
                                          else f"{tool}: {message} ({rtype})")
    elif err_kind == protocol.ERR_OUTPUT:
        out.status = "invalid_output"
        out.error = OutputValidationError(f"{tool}: {message}")
    else:
        out.status = "failed"
        what = "could not be loaded in the worker" if err_kind == protocol.ERR_INIT else "raised"
        out.error = ToolFailed(
            f"{tool}: the tool {what} {rtype}: {message}",
            remote_type=rtype, remote_message=message,
            remote_traceback=str(body.get("traceback", "")))
    return out


def _cpu_seconds(value: Any) -> float:
    """The worker's CPU report (a fixed-width decimal string), distrusted: a finite number
    of seconds, else 0."""
    if isinstance(value, str) and len(value) <= 16:
        try:
            value = float(value)
        except ValueError:
            return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        return 0.0
    return min(float(value), 1e6)


def __getattr__(name: str) -> Any:
    """``LocalBackend`` and ``FakeBackend`` live in their own modules (they import this
    one); they are reachable here too, where the seam is."""
    if name == "LocalBackend":
        from failcore._local import LocalBackend

        return LocalBackend
    if name == "FakeBackend":
        from failcore.testing import FakeBackend

        return FakeBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
