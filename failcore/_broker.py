"""The parent side of the socket broker: a confined worker's only way onto the network.

A worker in an empty network namespace asks, over its channel, for each name lookup and
TCP connect its tool makes (``failcore_worker._broker``). ``Broker.handle`` answers one
request for one call:

    worker: broker.connect {host, port}          parent (this module)
            ----------------------------------->  1. judge the lookup (if host is a name),
                                                     resolve it here, remember the names
                                                  2. judge the RESOLVED address with
                                                     rules.check_connect, names from the
                                                     parent's own book
                                                  3. start a non-blocking connect in the
                                                     parent's namespace
            <-----------------------------------  broker.reply + the descriptor (SCM_RIGHTS)
    worker: dup2 under the tool's socket, wait for the connect to finish (its own timeout,
            capped by the call's remaining time)

Why the connect is only *started* here: the parent never waits on a remote host, so one
slow connect neither holds the exchange loop nor serialises a tool's concurrent connects;
the address is fixed when the connect starts, so nothing is judged late. Lookups do block
(libc has no asynchronous getaddrinfo); they run on daemon threads and are abandoned at
the call's deadline (``_broker_lookup``).

Trust: every byte from the worker is data (``protocol.decode_data``, sizes and types
checked here). Names the worker reports are never used to judge: the book is filled only
by lookups the parent made itself (forward lookups; PTR answers are the address owner's
word and never grant anything). Each call has a budget of lookups and connects; past it
requests are refused (and the worker told to stop asking), and a worker that keeps asking
is reported as a protocol violation, as is any malformed request.

Every brokered lookup and connect, allowed or refused, yields a ``GuardEvent`` for the
trace (``observed: "parent"``: the parent saw it itself, it is not the worker's report).
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from failcore import _broker_request as req
from failcore._broker_lookup import (
    LookupTimeout,
    Resolver,
    SystemResolver,
    reverse_name,
)
from failcore_worker import protocol, rules
from failcore_worker._guard_names import NameBook
from failcore_worker.protocol import GuardEvent
from failcore_worker.rules import Grants, Verdict, check_resolve, worse

__all__ = ["Broker", "BrokerAnswer", "BrokerLimits", "send_answer", "serve"]

_FAMILIES = protocol.BROKER_FAMILIES
# A worker told its budget is spent may have a few requests in flight (threads); past
# this many more it is ignoring the reply.
_SLACK = 64


@dataclass(frozen=True)
class BrokerLimits:
    """Per-call bounds: lookups and connects the parent makes for one call, addresses in
    one reply."""

    resolves: int = 1024
    connects: int = 1024
    addresses: int = 64


@dataclass
class BrokerAnswer:
    """What to do with one request: send ``reply`` (with ``fd``, which ``send_answer``
    closes), record ``events``; a ``violation`` means the worker broke the protocol and
    should be killed (the reply still tells it no)."""

    reply: dict[str, Any]
    fd: int | None = None
    events: list[GuardEvent] = field(default_factory=list)
    violation: str | None = None

    def close(self) -> None:
        """Close the descriptor if it was not sent (an answer that will not be delivered)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class Broker:
    """Answers one call's broker requests. Thread-safe; make one per call.

    ``grants``: the call's token grants. ``enforced``: the session policy's enforced
    grants (``Policy`` rules forced in); each decision is the stricter of the two. Pass
    None under a warn-only policy, whose token grants carry no policy rules by design.
    ``deadline``: the call's end on ``time.monotonic()``. ``book``: the worker's name book
    (names the parent resolved for it); share one per worker or make one per call.
    """

    def __init__(self, grants: Grants, *, deadline: float, enforced: Grants | None = None,
                 book: NameBook | None = None, limits: BrokerLimits = BrokerLimits(),
                 resolver: Resolver | None = None) -> None:
        self.grants = grants
        self.enforced = enforced
        self.deadline = deadline
        self.book = book if book is not None else NameBook()
        self.limits = limits
        self.resolver: Resolver = resolver if resolver is not None else SystemResolver()
        self._lock = threading.Lock()
        self._used = {"resolves": 0, "connects": 0}
        self._refused_after_budget = 0

    # -- entry points ----------------------------------------------------------------

    def handle_frame(self, payload: bytes | bytearray) -> BrokerAnswer:
        """Answer one worker -> parent frame's payload (``kind`` ``broker.*``)."""
        if len(payload) > protocol.MAX_BROKER_REQUEST:
            return BrokerAnswer(req.error(errno.EMSGSIZE, "broker request too large"),
                                violation=f"broker request of {len(payload)} bytes (limit "
                                          f"{protocol.MAX_BROKER_REQUEST})")
        try:
            kind, body = protocol.decode_data(payload)
        except protocol.BadFrame as exc:
            return BrokerAnswer(req.error(errno.EPROTO, "malformed broker request"),
                                violation=f"malformed broker request: {exc}")
        return self.handle(kind, body)

    def handle(self, kind: str, body: Mapping[str, Any]) -> BrokerAnswer:
        """Answer one decoded request. Never raises for anything the worker sent."""
        request_id = body.get("id") if isinstance(body.get("id"), int) else None
        events: list[GuardEvent] = []
        try:
            if kind == protocol.BROKER_CONNECT:
                reply, fd = self._connect(body, events)
                return BrokerAnswer({"id": request_id, **reply}, fd, events)
            if kind == protocol.BROKER_RESOLVE:
                return BrokerAnswer({"id": request_id, **self._resolve(body, events)}, None, events)
            raise req.Refused(req.error(errno.EPROTO, f"unknown request {kind!r}"),
                              f"unknown broker request kind {kind!r}")
        except req.Refused as refused:
            return BrokerAnswer({**refused.reply, "id": request_id}, None, events,
                                refused.violation)

    # -- connect ------------------------------------------------------------------------

    def _connect(self, body: Mapping[str, Any],
                 events: list[GuardEvent]) -> tuple[dict[str, Any], int | None]:
        family = req.field(body, "family", int)
        proto = req.field(body, "proto", int)
        host = req.host(body)
        port = req.port(body)
        flowinfo = req.field(body, "flowinfo", int)
        scope_id = req.field(body, "scope_id", int)
        if family not in _FAMILIES or proto not in (0, socket.IPPROTO_TCP) \
                or not (0 <= flowinfo <= 0xFFFFF and 0 <= scope_id < 2**32):
            raise req.Refused(req.error(errno.EINVAL, "unsupported socket"),
                              f"broker.connect for family {family}, proto {proto}")
        self._spend("connects", events, host, port)
        left = self._left()
        ip = self._address(family, host, port, left, events)
        names = self.book.get(ip)
        verdict = self._judge(lambda g: rules.check_connect(g, ip, port, names))
        target = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        events.append(_event("net.connect", target, verdict, host=ip, port=port, names=list(names)))
        if verdict.action == "block":
            return req.denied(verdict, f"connect to {target}"), None
        sockaddr: tuple[Any, ...] = (ip, port) if family == socket.AF_INET \
            else (ip, port, flowinfo, scope_id)
        # The bare _socket type: this socket only lives until its descriptor is sent.
        sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                              | socket.SOCK_CLOEXEC, proto)
        try:
            code = sock.connect_ex(sockaddr)
        except OSError as exc:  # e.g. a scope id naming no interface
            sock.close()
            return {"errno": exc.errno or errno.EINVAL, "message": str(exc)}, None
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            return {"errno": code, "message": req.strerror(code)}, None
        return {"fd": True, "in_progress": code != 0, "wait_s": self._left()}, sock.detach()

    def _address(self, family: int, host: str, port: int, left: float,
                 events: list[GuardEvent]) -> str:
        """The address a connect to ``host`` reaches: a literal as is (as CPython's
        setipaddr reads it), a name resolved here first (its lookup judged and booked)."""
        special = {"": "0.0.0.0" if family == socket.AF_INET else "::",
                   "<broadcast>": "255.255.255.255"}
        if host in special:
            return special[host]
        try:
            socket.inet_pton(family, host.split("%", 1)[0])
            return host.split("%", 1)[0]
        except (OSError, ValueError):
            pass
        infos = self._lookup(host, port, family, socket.SOCK_STREAM, 0, 0, left, events)
        if not infos:
            raise req.Refused({"gai": socket.EAI_NONAME, "message": "Name or service not known"})
        return str(infos[0][4][0])

    # -- lookups ------------------------------------------------------------------------

    def _resolve(self, body: Mapping[str, Any], events: list[GuardEvent]) -> dict[str, Any]:
        op = body.get("op")
        host = req.host(body)
        if op == "getaddrinfo":
            port = req.service(body)
            family = req.field(body, "family", int)
            kind = req.field(body, "type", int)
            proto = req.field(body, "proto", int)
            flags = req.field(body, "flags", int)
            if family not in (0, *_FAMILIES) or kind not in protocol.BROKER_SOCKTYPES \
                    or not 0 <= proto < 256 or flags & ~protocol.BROKER_AI_FLAGS:
                raise req.Refused(req.error(errno.EINVAL, "unsupported lookup"),
                                  f"getaddrinfo with family {family}, type {kind}, "
                                  f"proto {proto}, flags {flags:#x}")
            self._spend("resolves", events, host, _number(port))
            infos = self._lookup(host, port, family, kind, proto, flags, self._left(), events)
            return {"addrinfo": [(int(f), int(t), p, _name(c), tuple(sa))
                                 for f, t, p, c, sa in infos]}
        if op == "gethostbyaddr":
            self._spend("resolves", events, host, 0)
            ip = host.split("%", 1)[0] if req.is_inet(host) else ""
            if not ip:  # a name: looked up first, as libc's gethostbyaddr does
                infos = self._lookup(host, None, 0, socket.SOCK_STREAM, 0, 0, self._left(), events)
                ip = str(infos[0][4][0]) if infos else ""
            if not ip:
                return {"herror": 1, "message": "Unknown host"}
            self._judge_reverse(ip, events)
            name, aliases, addresses = self._call(lambda t: self.resolver.gethostbyaddr(ip, t))
            cap = self.limits.addresses
            return {"hostent": (_name(name), [_name(a) for a in aliases[:cap]],
                                [_name(a) for a in addresses[:cap]])}
        if op == "getnameinfo":
            port = req.service(body)
            flags = req.field(body, "flags", int)
            if flags & ~protocol.BROKER_NI_FLAGS or not req.is_inet(host):
                raise req.Refused(req.error(errno.EINVAL, "unsupported lookup"),
                                  f"getnameinfo of {host!r} with flags {flags:#x}")
            self._spend("resolves", events, host, _number(port))
            self._judge_reverse(host, events)
            sockaddr = (host, port if port is not None else 0)
            found, serv = self._call(lambda t: self.resolver.getnameinfo(sockaddr, flags, t))
            return {"nameinfo": (_name(found), _name(serv))}
        raise req.Refused(req.error(errno.EINVAL, "unknown lookup"),
                          f"unknown broker.resolve op {op!r}")

    def _lookup(self, host: str, port: int | str | None, family: int, kind: int, proto: int,
                flags: int, left: float, events: list[GuardEvent]) -> list[tuple[Any, ...]]:
        """getaddrinfo, judged first; its addresses are booked under ``host``."""
        number = _number(port)
        verdict = self._judge(lambda g: check_resolve(g, host, number))
        events.append(_event("net.resolve", host, verdict, host=host, port=number))
        if verdict.action == "block":
            raise req.Refused(req.denied(verdict, f"looking up {host}"))
        infos = self._call(lambda t: self.resolver.getaddrinfo(host, port, family, kind, proto,
                                                               flags, t), left)
        kept = [i for i in infos if i[0] in _FAMILIES][: self.limits.addresses]
        with self._lock:
            self.book.remember(host, (i[4][0] for i in kept))
        return kept

    def _judge_reverse(self, ip: str, events: list[GuardEvent]) -> None:
        name = reverse_name(ip)
        verdict = self._judge(lambda g: check_resolve(g, name, 0))
        if verdict.allowed:
            verdict = Verdict(verdict.action, "resolve: reverse lookup",
                              f"the query for {name} is allowed like a forward lookup; its "
                              "answer names nothing a connect is judged on")
        events.append(_event("net.resolve", name, verdict, host=name, port=0))
        if verdict.action == "block":
            raise req.Refused(req.denied(verdict, f"the reverse lookup of {ip}"))

    def _call(self, fn: Any, left: float | None = None) -> Any:
        """Run one resolver call with the call's remaining time; resolver errors become
        the reply the worker raises."""
        try:
            return fn(self._left() if left is None else left)
        except socket.gaierror as exc:
            raise req.Refused({"gai": exc.errno, "message": exc.strerror or str(exc)}) from None
        except socket.herror as exc:
            raise req.Refused({"herror": exc.errno, "message": exc.strerror or str(exc)}) from None
        except LookupTimeout as exc:
            raise req.Refused({"gai": socket.EAI_AGAIN, "message": "Temporary failure in name "
                               f"resolution (FailCore: {exc})"}) from None
        except (OSError, UnicodeError, ValueError) as exc:
            raise req.Refused({"gai": socket.EAI_NONAME, "message": str(exc)}) from None

    # -- judging and budget -------------------------------------------------------------

    def _judge(self, decide: Any) -> Verdict:
        verdict: Verdict = decide(self.grants)
        if self.enforced is not None and self.enforced is not self.grants:
            verdict = worse(verdict, decide(self.enforced))
        return verdict

    def _spend(self, what: str, events: list[GuardEvent], host: str, port: int) -> None:
        with self._lock:
            self._used[what] += 1
            used = self._used[what]
            if used <= getattr(self.limits, what):
                return
            self._refused_after_budget += 1
            late = self._refused_after_budget
        limit = getattr(self.limits, what)
        noun = "lookups" if what == "resolves" else "connects"
        verdict = Verdict("block", f"broker: {what} limit",
                          f"the call already made {limit} {noun} through the broker "
                          f"(BrokerLimits.{what}); reuse connections, or split the work "
                          "into several calls")
        if late == 1:  # one record for the whole overflow, not one per attempt
            events.append(_event("net.connect" if what == "connects" else "net.resolve",
                                 host, verdict, host=host, port=port))
        violation = (f"the worker kept asking the broker after its {what} budget was spent"
                     if late > _SLACK else None)
        raise req.Refused({**req.denied(verdict, f"{noun[:-1]} {host}"), "exhausted": True},
                          violation)

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise req.Refused({"errno": errno.ETIMEDOUT,
                               "message": "Connection timed out (FailCore: the call's time is up)"})
        return left


def serve(chan: socket.socket, broker: Broker,
          on_answer: Callable[[BrokerAnswer], None] | None = None) -> None:
    """Answer requests on a channel that carries only broker traffic, until the worker
    closes it or breaks the protocol. ``on_answer`` sees each answer before it is sent
    (to record its events). For a dedicated broker channel served by a parent thread;
    the exchange loop instead calls ``handle_frame`` and ``send_answer`` per frame."""
    while True:
        try:
            payload = protocol.recv_frame(chan, protocol.MAX_BROKER_REQUEST)
        except (protocol.PeerClosed, protocol.FrameTooLarge, OSError):
            return
        answer = broker.handle_frame(payload)
        if on_answer is not None:
            on_answer(answer)
        try:
            send_answer(chan, answer)
        except OSError:
            return
        if answer.violation is not None:
            return


def send_answer(chan: socket.socket, answer: BrokerAnswer) -> None:
    """Send ``answer`` as a ``broker.reply`` frame (descriptor on its first bytes), then
    close the parent's copy of the descriptor, sent or not."""
    try:
        frame = protocol.encode(protocol.BROKER_REPLY, answer.reply)
        protocol.send_with_fd(chan, frame, answer.fd)
    finally:
        answer.close()


def _name(text: Any) -> str:
    """A resolver's string, cut to a DNS name's length: replies stay within the worker's
    reply bound (``protocol.MAX_BROKER_REPLY``) whatever a PTR record holds."""
    return str(text)[:protocol.BROKER_MAX_HOST]


def _number(port: int | str | None) -> int:
    """The port a lookup is judged for: a service name counts as 0, as in the guards."""
    return port if isinstance(port, int) else int(port) if port and port.isdigit() else 0


def _event(op: str, target: str, verdict: Verdict, **fields: Any) -> GuardEvent:
    event: GuardEvent = {"op": op, "target": target, "action": verdict.action,
                         "rule": verdict.rule, "reason": verdict.reason, "observed": "parent"}
    event.update(fields)  # type: ignore[typeddict-item]
    return event
