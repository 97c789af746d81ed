"""The worker's socket factory, reduced to the capabilities: TCP and DNS go through the parent.

A confined worker lives in a network namespace with no interface, so nothing it does with a
socket reaches a network by itself. ``install(ask)`` replaces the few Python entry points
that need one:

- ``socket.socket.connect`` / ``connect_ex`` on AF_INET/AF_INET6 stream sockets send a
  ``broker.connect`` to the parent, which resolves and judges the *resolved* address against
  the call's grants, starts the connect in its own namespace and passes the descriptor back.
  It is ``os.dup2``'d under the tool's socket (so the object, its fd number, timeout and
  blocking mode are the tool's), the socket options the tool set are copied over, and the
  worker waits for the connect to finish the way CPython would (the tool's timeout, capped
  by the call's remaining time). A non-blocking socket gets ``EINPROGRESS`` as usual, which
  is what asyncio's ``sock_connect`` expects. So urllib, http.client, requests, httpx, ssl
  and asyncio streams work unchanged.
- ``socket.getaddrinfo``, ``gethostbyname``, ``gethostbyname_ex``, ``gethostbyaddr`` and
  ``getnameinfo`` send a ``broker.resolve``: every lookup is a DNS query, a data channel of
  its own, so the parent judges it first. Numeric hosts are answered here (no query).

What is *not* brokered, by design: UDP and raw sockets (the kernel answers: the namespace
has no route; DNS goes through the broker instead, so no tool needs UDP for it), binding
and listening (a worker serves nobody), Unix sockets (files: the file rules apply), and
native code calling ``connect(2)`` itself (``_socket``, ctypes, C extensions): it gets the
kernel's "Network is unreachable". A forked (not exec'd) child of the worker gets no
broker: it would share the worker's channel.

Limits (tests pin each): a brokered descriptor is a socket of the *parent's* namespace.
After ``connect(AF_UNSPEC)`` native code can connect it again there, unjudged, unless
Landlock's TCP rules deny connect(2) in the worker (ABI >= 4: then EACCES), and can
``listen(2)`` on it (autobound to 0.0.0.0 of the parent's namespace), which Landlock up to
ABI 7 does not cover: a seccomp filter on listen(2), or the watchdog, has to. urllib3
(requests) probes IPv6 at import by binding ::1, which the empty namespace refuses, and
from then on resolves IPv4 only.

The channel is the parent's: ``ask(kind, body) -> (reply, fds)`` is provided by the run
loop (``channel_ask`` is the reference one over a socket); ``_broker_channel`` serialises
the round trips (tool threads may connect concurrently) and asks nothing between calls
(``begin_call`` / ``end_call``); ``_broker_names`` holds the lookups. Stdlib only.
"""

from __future__ import annotations

import errno
import operator
import os
import select
import socket
import weakref
from collections.abc import Callable
from typing import Any

from failcore_worker import _broker_names, protocol
from failcore_worker._broker_channel import (
    INET,
    NO_NETWORK,
    Ask,
    BrokerError,
    begin_call,
    channel_ask,
    end_call,
    request,
    resolver_error,
    sendable,
    state,
    text,
)

# The run loop's whole interface is here (the rest lives in _broker_channel/_broker_names).
__all__ = ["Ask", "BrokerError", "install", "begin_call", "end_call", "channel_ask",
           "connect_request"]

_orig_connect = socket.socket.connect
_orig_connect_ex = socket.socket.connect_ex
_orig_setsockopt = socket.socket.setsockopt

# Non-blocking sockets whose brokered connect is under way (socket -> its fd number).
_pending: weakref.WeakKeyDictionary[socket.socket, int] = weakref.WeakKeyDictionary()
# Options a tool set on a TCP socket (urllib3 sets TCP_NODELAY before connect): they
# belong to the socket the brokered one replaces, so they are set again on it.
_options: weakref.WeakKeyDictionary[socket.socket, dict[tuple[int, int], tuple[Any, ...]]] = \
    weakref.WeakKeyDictionary()
_MAX_OPTIONS = 64


def install(ask: Ask) -> None:
    """Route this process's TCP connects and name lookups through ``ask``.

    Call once, after the guards are installed (these functions replace theirs) and before
    the tool's code loads. Nothing is asked until ``begin_call``.
    """
    if state.ask is not None:
        raise RuntimeError("the socket broker is already installed in this process")
    state.ask = ask
    socket.socket.connect = _connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign,assignment]
    socket.socket.setsockopt = _setsockopt  # type: ignore[method-assign,assignment]
    socket.getaddrinfo = _broker_names.getaddrinfo
    socket.gethostbyname = _broker_names.gethostbyname
    socket.gethostbyname_ex = _broker_names.gethostbyname_ex
    socket.gethostbyaddr = _broker_names.gethostbyaddr
    socket.getnameinfo = _broker_names.getnameinfo


# --- connect ----------------------------------------------------------------------------


def _brokered(sock: socket.socket) -> bool:
    return (sock.family in INET and sock.type == socket.SOCK_STREAM
            and sock.proto in (0, socket.IPPROTO_TCP) and sock.fileno() >= 0)


def _connect(self: socket.socket, address: Any) -> None:
    fields = connect_request(self.family, self.proto, address) if _brokered(self) else None
    if fields is None:
        _kernel(_orig_connect, self, address)
    elif _broker_connect(self, fields, raise_errors=True) == errno.EINPROGRESS:
        raise BlockingIOError(errno.EINPROGRESS, os.strerror(errno.EINPROGRESS))


def _connect_ex(self: socket.socket, address: Any) -> int:
    fields = connect_request(self.family, self.proto, address) if _brokered(self) else None
    if fields is None:
        return int(_kernel(_orig_connect_ex, self, address))
    try:
        return _broker_connect(self, fields, raise_errors=False)
    except BrokerError as exc:  # connect_ex reports errors, as the kernel's would be
        return exc.errno or errno.ENETUNREACH


def _kernel(method: Callable[..., Any], sock: socket.socket, address: Any) -> Any:
    """Not brokered: the kernel decides (Unix sockets work; UDP finds no route; a malformed
    address gets CPython's own TypeError)."""
    try:
        return method(sock, address)
    except OSError as exc:
        if exc.errno != errno.ENETUNREACH or sock.family not in INET:
            raise
        raise OSError(errno.ENETUNREACH, NO_NETWORK + "only TCP connects and name lookups "
                      "are brokered through the parent, UDP and raw sockets are not)") from None


def connect_request(family: int, proto: int, address: Any) -> dict[str, Any] | None:
    """The ``broker.connect`` body for a TCP socket connecting to ``address``, or None
    where CPython itself refuses the address (its own call then raises, resolving
    nothing: the namespace has no network either way)."""
    size = (2,) if family == socket.AF_INET else (2, 3, 4)
    if not isinstance(address, tuple) or len(address) not in size:
        return None
    host = text(address[0])
    try:
        port, *extra = (operator.index(x) for x in address[1:])
    except TypeError:
        return None
    if host is None or not sendable(host):
        return None
    if not 0 <= port <= 65535:
        raise OverflowError("connect(): port must be 0-65535.")
    flowinfo, scope_id = (list(extra) + [0, 0])[:2]
    if not (0 <= flowinfo <= 0xFFFFF and 0 <= scope_id < 2**32):
        return None
    return {"family": int(family), "proto": int(proto), "host": host, "port": port,
            "flowinfo": flowinfo, "scope_id": scope_id}


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _broker_connect(sock: socket.socket, fields: dict[str, Any], raise_errors: bool) -> int:
    """Connect ``sock`` through the parent; returns 0, EINPROGRESS (non-blocking) or, when
    not ``raise_errors``, the errno a real ``connect_ex`` would return."""
    if _pending.get(sock) == sock.fileno():
        return _poll_pending(sock, raise_errors)
    if _connected(sock):  # the kernel's answer, without resolving anything
        return _fail(errno.EISCONN, raise_errors)
    timeout = sock.gettimeout()
    reply, fd = request(protocol.BROKER_CONNECT, fields)
    if fd is None:
        if "gai" in reply:
            resolver_error(reply)
        return _fail(int(reply.get("errno", errno.ECONNABORTED)), raise_errors,
                     str(reply.get("message", "")))
    try:
        os.dup2(fd, sock.fileno(), inheritable=False)
    finally:
        os.close(fd)
    sock.settimeout(timeout)  # the blocking mode belongs to the new open file description
    for args in _options.get(sock, {}).values():
        try:
            _orig_setsockopt(sock, *args)
        except OSError:
            pass  # as the tool's own call would have failed on this socket: not a right
    if not reply.get("in_progress"):
        return 0
    if timeout == 0.0:
        _pending[sock] = sock.fileno()
        return errno.EINPROGRESS
    return _wait_connected(sock, timeout, float(reply.get("wait_s", 0.0)), raise_errors)


def _fail(code: int, raise_errors: bool, message: str = "") -> int:
    if raise_errors:
        raise OSError(code, message or os.strerror(code))
    return code


def _poll_pending(sock: socket.socket, raise_errors: bool) -> int:
    """A second connect on a non-blocking socket whose brokered connect is under way: the
    kernel's answers (EALREADY, then 0 once, then EISCONN), read from the socket itself."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    if not poller.poll(0):
        return _fail(errno.EALREADY, raise_errors)
    del _pending[sock]
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        _unplug(sock)
        return _fail(code, raise_errors)
    return 0


def _unplug(sock: socket.socket) -> None:
    """After a brokered connect failed: give the object a fresh socket of this namespace
    again, so no unconnected socket of the parent's namespace stays in the tool's hands."""
    timeout = sock.gettimeout()
    with socket.socket(sock.family, socket.SOCK_STREAM) as fresh:
        os.dup2(fresh.fileno(), sock.fileno(), inheritable=False)
    sock.settimeout(timeout)


def _wait_connected(sock: socket.socket, timeout: float | None, wait_s: float,
                    raise_errors: bool) -> int:
    """What CPython's internal_connect does for a pending connect: wait until writable,
    then read SO_ERROR. ``wait_s`` (the call's remaining time) caps a timeout-less wait."""
    limit = wait_s if timeout is None else min(timeout, wait_s)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    if poller.poll(max(limit, 0.0) * 1000.0):
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code in (0, errno.EISCONN):
            return 0
        _unplug(sock)
        return _fail(code, raise_errors)
    if timeout is not None and timeout <= wait_s:
        if raise_errors:
            raise TimeoutError("timed out")
        return errno.EWOULDBLOCK
    return _fail(errno.ETIMEDOUT, raise_errors,
                 "Connection timed out (FailCore: the call's time ran out while connecting)")


def _setsockopt(self: socket.socket, level: int, optname: int, value: Any, *optlen: int) -> None:
    """``setsockopt``, remembered for a TCP socket that the broker may yet replace."""
    _orig_setsockopt(self, level, optname, value, *optlen)
    if self.family in INET and self.type == socket.SOCK_STREAM:
        options = _options.setdefault(self, {})
        if len(options) < _MAX_OPTIONS or (level, optname) in options:
            kept = value if isinstance(value, int) or value is None else bytes(value)
            options[(level, optname)] = (level, optname, kept, *optlen)
