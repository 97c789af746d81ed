"""Where workers run: the one seam between the Session and the processes that run tools.

::

    Session                                   Backend                       worker
    validate, precheck, token, trace   ──►    lease(spec)            ──►    init (lock down, load)
                                       ──►    exchange(lease, call)  ──►    call
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

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from failcore._confinement import Confinement, ToolConfinement
from failcore._errors import (
    FailCoreError,
    OutputValidationError,
    ResourceLimitExceeded,
    SecurityError,
    ToolFailed,
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

    def exchange(self, lease: Lease, call_frame: bytes) -> Outcome:
        """Send the encoded ``call`` and wait for its reply within ``spec.limits``."""

    def release(self, lease: Lease, reuse: bool) -> None:
        """Give the worker back for reuse, or retire it (kill its tree) when ``reuse`` is false."""

    def abort(self, lease: Lease, reason: str) -> None:
        """Kill the leased worker's tree now, from any thread (a cancelled ``acall``)."""

    def close(self) -> None:
        """Stop every worker and release every resource; idempotent."""


def interpret(tool: str, kind: str, body: dict[str, Any], out: Outcome) -> Outcome:
    """Fill ``out`` from a worker's reply ``(kind, body)``: the same for every backend."""
    out.recv_kind = kind
    out.events = list(body.get("events") or [])
    out.cpu_s = _cpu_seconds(body.get("cpu_s"))
    if kind == "result":
        out.value = body.get("value")
        out.reuse = not body.get("retire", False)
        return out
    err_kind = body.get("kind")
    rtype, message = str(body.get("type", "")), str(body.get("message", ""))
    out.reuse = err_kind == protocol.ERR_TOOL and not body.get("retire", False)
    if err_kind == protocol.ERR_DENIED:
        blocked = next((e for e in out.events if e.get("action") == "block"), {})
        rule = str(blocked.get("rule", "worker guard"))
        target = str(blocked.get("target") or blocked.get("path") or blocked.get("host") or "")
        out.status = "blocked"
        out.error = SecurityError(
            f"{tool}: blocked inside the worker: {blocked.get('reason') or message} [rule: {rule}]",
            rule=rule, target=target, layer="worker")
    elif err_kind == protocol.ERR_TOKEN:
        out.status = "blocked"
        out.error = SecurityError(f"{tool}: the worker refused the call: {message}",
                                  rule="capability token", layer="token")
    elif err_kind in (protocol.ERR_MEMORY, protocol.ERR_RESOURCE):
        out.status = "resource"
        out.error = ResourceLimitExceeded(f"{tool}: {message} ({rtype})")
    elif err_kind == protocol.ERR_UNPICKLABLE:
        out.status = "invalid_output"
        out.reuse = True
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
    """The worker's CPU report, distrusted: a finite number of seconds, else 0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        return 0.0
    return min(float(value), 1e6)
