"""The socket broker's round trip, worker side: one request at a time, only during a call.

Private to ``failcore_worker._broker`` and ``_broker_names``. ``ask`` is the run loop's
transport over the worker's channel; ``request`` serialises calls to it (tool threads may
connect concurrently: only the round trip is serialised, not the wait for a connect to
finish), refuses locally between calls (``end_call``) and once the call's budget is spent,
and turns the parent's answer into what a tool expects: ``GuardDenied`` (EACCES) for a
policy refusal, ``BrokerError`` (ENETUNREACH) when nobody answers.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from failcore_worker import protocol
from failcore_worker._guard_judge import GuardDenied
from failcore_worker.rules import Verdict

Ask = Callable[[str, dict[str, Any]], tuple[dict[str, Any], list[int]]]

INET = (socket.AF_INET, socket.AF_INET6)
NO_NETWORK = "Network is unreachable (FailCore: this worker has no network of its own; "


class BrokerError(OSError):
    """The broker could not answer (no call running, the channel failed)."""


class _State:
    def __init__(self) -> None:
        self.ask: Ask | None = None
        self.lock = threading.Lock()
        self.active = False
        self.exhausted: Verdict | None = None
        self.next_id = 0


state = _State()


def _after_fork_in_child() -> None:
    # A forked child shares the worker's channel: a request from it would interleave with
    # the worker's frames (and the lock may have been held by another thread at fork).
    # It gets no broker, so no network: the parent answers the worker alone.
    state.lock = threading.Lock()
    state.active = False
    state.ask = None


os.register_at_fork(after_in_child=_after_fork_in_child)


def begin_call() -> None:
    """A call starts: the parent answers broker requests until ``end_call``."""
    with state.lock:
        state.active = True
        state.exhausted = None


def end_call() -> None:
    """The call ended: waits for a request in flight, then refuses new ones locally.

    After this returns the channel is the run loop's again; a thread the tool left behind
    gets ``BrokerError`` instead of writing to it.
    """
    with state.lock:
        state.active = False


def channel_ask(chan: socket.socket, limit: int = protocol.MAX_BROKER_REPLY) -> Ask:
    """The reference ``ask``: a JSON request frame out, a ``broker.reply`` frame (and its
    descriptor, if any) back, on ``chan``. Not thread-safe by itself; ``request``
    serialises its calls."""
    def ask(kind: str, body: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        chan.sendall(protocol.encode_data(kind, body))
        payload, fds = protocol.recv_frame_fds(chan, limit)
        reply_kind, reply = protocol.decode(payload)
        if reply_kind != protocol.BROKER_REPLY:
            for fd in fds:
                os.close(fd)
            raise BrokerError(errno.EPROTO, f"expected {protocol.BROKER_REPLY}, got {reply_kind!r}")
        return reply, fds
    return ask


def request(kind: str, body: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """Ask the parent; returns the reply and the descriptor that came with it (owned by
    the caller). Raises GuardDenied for a policy refusal, BrokerError when nobody answers."""
    with state.lock:
        if state.exhausted is not None:
            deny(state.exhausted)
        if not state.active or state.ask is None:
            raise BrokerError(errno.ENETUNREACH, NO_NETWORK + "the parent brokers "
                              "connections and lookups only while a call runs)")
        state.next_id += 1
        body["id"] = state.next_id
        try:
            reply, fds = state.ask(kind, body)
        except Exception as exc:  # noqa: BLE001 - a broken channel is a broken network
            state.active = False  # the channel's framing is lost: ask nothing more
            raise BrokerError(errno.ENETUNREACH, NO_NETWORK + f"the parent's socket broker "
                              f"did not answer: {exc})") from None
        fd = fds[0] if fds else None
        for extra in fds[1:]:
            os.close(extra)
        if reply.get("id") != body["id"] or (fd is not None) != bool(reply.get("fd")):
            if fd is not None:
                os.close(fd)
            raise BrokerError(errno.EPROTO, "the socket broker's reply does not match the request")
        if reply.get("exhausted") and reply.get("denied"):
            state.exhausted = _verdict(reply)
    if reply.get("denied"):
        deny(_verdict(reply), str(reply.get("message", "")))
    return reply, fd


def _verdict(reply: dict[str, Any]) -> Verdict:
    return Verdict("block", str(reply.get("rule", "broker")), str(reply.get("reason", "")))


def deny(verdict: Verdict, message: str = "") -> None:
    """A policy refusal: EACCES (``GuardDenied`` is a PermissionError) naming the rule."""
    raise GuardDenied(verdict, message or f"FailCore blocked it: {verdict.rule}: {verdict.reason}")


def resolver_error(reply: dict[str, Any]) -> None:
    message = str(reply.get("message", ""))
    if "gai" in reply:
        raise socket.gaierror(int(reply["gai"]), message)
    if "herror" in reply:
        raise socket.herror(int(reply["herror"]), message)
    if "errno" in reply:
        raise OSError(int(reply["errno"]), message or os.strerror(int(reply["errno"])))


def text(host: Any) -> str | None:
    """A host argument as CPython reads it (str, or ASCII bytes), else None."""
    if isinstance(host, (bytes, bytearray)):
        try:
            return bytes(host).decode("ascii")
        except UnicodeDecodeError:
            return None
    return host if isinstance(host, str) else None


def numeric(host: str, families: tuple[int, ...] = INET) -> bool:
    """A host CPython and libc read without a resolver (inet_pton forms, or none)."""
    if host in ("", "<broadcast>"):
        return True
    bare = host.split("%", 1)[0]
    for family in families:
        try:
            socket.inet_pton(family, bare)
            return True
        except (OSError, ValueError):
            pass
    return False


def sendable(host: str) -> bool:
    """A host a well-formed request may carry (``protocol.BROKER_MAX_HOST``, no NUL)."""
    return len(host) <= protocol.BROKER_MAX_HOST and "\0" not in host
