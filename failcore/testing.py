"""Test helpers: ``FakeBackend`` runs tools in this process, so tests of everything above the
backend seam (validation, policy, tokens, the trace, replay) need no worker process.

Like httpx's ``MockTransport``: hand it a function that plays the worker::

    def worker(call: FakeCall) -> object:
        if call.tool == "fetch":
            return FakeReply(events=[{"op": "net.connect", "target": "10.0.0.5:80",
                                      "action": "block", "rule": "net_safe: 10.0.0.0/8 (private)",
                                      "reason": "scripted"}], error="denied")
        return call.run()          # the registered function itself, in this process

    with Session(backend=FakeBackend(worker)) as session: ...

Nothing is isolated here: never use it to run a tool you do not trust.
"""

from __future__ import annotations

import json
import pickle
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from failcore import _confinement
from failcore._backend import Lease, Outcome, ToolSpec, read_reply
from failcore._confinement import ToolConfinement
from failcore_worker import protocol
from failcore_worker.main import encode_reply
from failcore_worker.rules import Grants, GuardEvent

__all__ = ["FakeBackend", "FakeCall", "FakeReply"]


@dataclass(frozen=True)
class FakeCall:
    """One call as a worker would receive it: tool, validated arguments, the token's grants."""

    tool: str
    call_id: str
    args: dict[str, Any]
    grants: Grants
    spec: ToolSpec = field(repr=False)

    def run(self) -> Any:
        """Run the registered function in this process (what a worker would do)."""
        return cloudpickle.loads(self.spec.blob)(**self.args)


@dataclass(frozen=True)
class FakeReply:
    """A scripted worker reply: ``value``, the guard ``events`` the worker reports, and
    optionally an error kind (``"denied"``, ``"tool"``, ``"memory"``, ``"resource"``...,
    see ``failcore_worker.protocol.ERR_*``) with its type and message."""

    value: Any = None
    events: Sequence[GuardEvent] = ()
    error: str | None = None
    type: str = ""
    message: str = ""


@dataclass(eq=False)
class _FakeWorker:
    name: str
    pid: int = 0
    kill_reason: str | None = None


class FakeBackend:
    """A ``Backend`` whose "workers" are a function call in this process.

    ``handler(call)`` returns the tool's value, a ``FakeReply``, or raises (the call then
    fails with ``ToolFailed``, as if the tool had raised). The default runs the registered
    function. Every call is appended to ``calls``. Tokens are verified as a worker would.
    """

    def __init__(self, handler: Callable[[FakeCall], Any] | None = None) -> None:
        self._handler = handler or FakeCall.run
        self._key = b""
        self._warm: dict[str, _FakeWorker] = {}
        self._lock = threading.Lock()
        self.calls: list[FakeCall] = []
        self.closed = False
        self.confinement = _confinement.off("FakeBackend runs tools in this process", None)

    def start(self, key: bytes) -> None:
        self._key = key

    def prepare(self, spec: ToolSpec) -> ToolConfinement:
        return ToolConfinement(spec.name, spec.network, ("in-process: nothing is confined",))

    def lease(self, spec: ToolSpec) -> Lease:
        with self._lock:
            worker = self._warm.get(spec.name) if spec.isolation == "tool" else None
            if worker is not None:
                return Lease(spec, worker, fresh=False)
            worker = _FakeWorker(name="fake")
            if spec.isolation == "tool":
                self._warm[spec.name] = worker
            return Lease(spec, worker, fresh=True)

    def exchange(self, lease: Lease, call_id: str, call_frame: bytes) -> Outcome:
        kind, body = pickle.loads(call_frame[protocol.HEADER.size:])  # the trusted direction
        token, mac = body["token"], body["mac"]
        if kind != "call" or not protocol.verify(self._key, token, mac):
            return self._reply(lease, call_id, "error", {
                "kind": protocol.ERR_TOKEN, "type": "token", "message":
                "capability token does not verify", "traceback": "", "events": []})
        header, grants_bytes, _limits = protocol.split_token(token)
        call = FakeCall(tool=lease.spec.name, call_id=str(header["call_id"]),
                        args=dict(body["args"]),
                        grants=Grants.from_wire(json.loads(grants_bytes)), spec=lease.spec)
        with self._lock:
            self.calls.append(call)
        try:
            value = self._handler(call)
        except Exception as exc:  # noqa: BLE001 - the tool's exception, as a worker reports it
            return self._reply(lease, call_id, "error", {
                "kind": protocol.ERR_TOOL, "type": type(exc).__name__, "message": str(exc),
                "traceback": "", "events": []})
        if isinstance(value, FakeReply):
            events = [dict(e) for e in value.events]
            if value.error is None:
                return self._reply(lease, call_id, "result", {
                    "value": value.value, "events": events, "retire": False})
            return self._reply(lease, call_id, "error", {
                "kind": value.error, "type": value.type or value.error, "message": value.message,
                "traceback": "", "events": events})
        return self._reply(lease, call_id, "result", {"value": value, "events": [], "retire": False})

    @staticmethod
    def _reply(lease: Lease, call_id: str, kind: str, body: dict[str, Any]) -> Outcome:
        """The reply as a worker would send it (its value encoded as data, within the
        limits) and as the parent reads it: the same code both ways."""
        body["call_id"] = call_id
        output_bytes = lease.spec.limits["output_bytes"]
        frame = encode_reply(kind, body, output_bytes)
        return read_reply(lease.spec.name, call_id, frame[protocol.HEADER.size:], output_bytes,
                          lambda reason: setattr(lease.worker, "kill_reason", reason))

    def release(self, lease: Lease, reuse: bool) -> None:
        if not reuse:
            with self._lock:
                if self._warm.get(lease.spec.name) is lease.worker:
                    del self._warm[lease.spec.name]

    def abort(self, lease: Lease, reason: str) -> None:
        lease.worker.kill_reason = reason

    def close(self) -> None:
        self.closed = True
