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
kernel's "Network is unreachable".

The channel is the parent's: ``ask(kind, body) -> (reply, fds)`` is provided by the run
loop (``channel_ask`` is the reference one over a socket). Calls to it are serialised
here, so tool threads may connect concurrently; only the round trip is serialised, the
wait for a connect to complete is not. Between calls (``end_call``) nothing is asked.
Standard library only.
"""

from __future__ import annotations

import errno
import operator
import os
import select
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any

from failcore_worker import protocol
from failcore_worker._guard_judge import GuardDenied
from failcore_worker.rules import Verdict

__all__ = ["Ask", "BrokerError", "install", "begin_call", "end_call", "channel_ask",
           "connect_request", "lookup_request", "reverse_request"]

Ask = Callable[[str, dict[str, Any]], tuple[dict[str, Any], list[int]]]

_orig_connect = socket.socket.connect
_orig_connect_ex = socket.socket.connect_ex
_orig_setsockopt = socket.socket.setsockopt
_orig_getaddrinfo = socket.getaddrinfo
_orig_gethostbyname = socket.gethostbyname
_orig_gethostbyname_ex = socket.gethostbyname_ex
_orig_gethostbyaddr = socket.gethostbyaddr
_orig_getnameinfo = socket.getnameinfo

_INET = (socket.AF_INET, socket.AF_INET6)
_NO_NETWORK = "Network is unreachable (FailCore: this worker has no network of its own; "


class BrokerError(OSError):
    """The broker could not answer (no call running, the channel failed)."""


class _State:
    def __init__(self) -> None:
        self.ask: Ask | None = None
        self.lock = threading.Lock()
        self.active = False
        self.exhausted: Verdict | None = None
        self.next_id = 0


_state = _State()
# Non-blocking sockets whose brokered connect is under way (socket -> its fd number).
_pending: weakref.WeakKeyDictionary[socket.socket, int] = weakref.WeakKeyDictionary()
# Options a tool set on a TCP socket (urllib3 sets TCP_NODELAY before connect): they
# belong to the socket the brokered one replaces, so they are set again on it.
_options: weakref.WeakKeyDictionary[socket.socket, dict[tuple[int, int], tuple[Any, ...]]] = \
    weakref.WeakKeyDictionary()
_MAX_OPTIONS = 64


# --- public interface ------------------------------------------------------------------


def install(ask: Ask) -> None:
    """Route this process's TCP connects and name lookups through ``ask``.

    Call once, after the guards are installed (these functions replace theirs) and before
    the tool's code loads. Nothing is asked until ``begin_call``.
    """
    if _state.ask is not None:
        raise RuntimeError("the socket broker is already installed in this process")
    _state.ask = ask
    socket.socket.connect = _connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = _connect_ex  # type: ignore[method-assign,assignment]
    socket.socket.setsockopt = _setsockopt  # type: ignore[method-assign,assignment]
    socket.getaddrinfo = _getaddrinfo
    socket.gethostbyname = _gethostbyname
    socket.gethostbyname_ex = _gethostbyname_ex
    socket.gethostbyaddr = _gethostbyaddr
    socket.getnameinfo = _getnameinfo


def begin_call() -> None:
    """A call starts: the parent answers broker requests until ``end_call``."""
    with _state.lock:
        _state.active = True
        _state.exhausted = None


def end_call() -> None:
    """The call ended: waits for a request in flight, then refuses new ones locally.

    After this returns the channel is the run loop's again; a thread the tool left behind
    gets ``BrokerError`` instead of writing to it.
    """
    with _state.lock:
        _state.active = False


def channel_ask(chan: socket.socket, limit: int = protocol.MAX_BROKER_REPLY) -> Ask:
    """The reference ``ask``: a JSON request frame out, a ``broker.reply`` frame (and its
    descriptor, if any) back, on ``chan``. Not thread-safe by itself; ``install``
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


# --- the round trip --------------------------------------------------------------------


def _request(kind: str, body: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """Ask the parent; returns the reply and the descriptor that came with it (owned by
    the caller). Raises GuardDenied for a policy refusal, BrokerError when nobody answers."""
    with _state.lock:
        if _state.exhausted is not None:
            _deny(_state.exhausted)
        if not _state.active or _state.ask is None:
            raise BrokerError(errno.ENETUNREACH, _NO_NETWORK + "the parent brokers "
                              "connections and lookups only while a call runs)")
        _state.next_id += 1
        body["id"] = _state.next_id
        try:
            reply, fds = _state.ask(kind, body)
        except Exception as exc:  # noqa: BLE001 - a broken channel is a broken network
            _state.active = False  # the channel's framing is lost: ask nothing more
            raise BrokerError(errno.ENETUNREACH, _NO_NETWORK + f"the parent's socket broker "
                              f"did not answer: {exc})") from None
        fd = fds[0] if fds else None
        for extra in fds[1:]:
            os.close(extra)
        if reply.get("id") != body["id"] or (fd is not None) != bool(reply.get("fd")):
            if fd is not None:
                os.close(fd)
            raise BrokerError(errno.EPROTO, "the socket broker's reply does not match the request")
        if reply.get("exhausted") and reply.get("denied"):
            _state.exhausted = _verdict(reply)
    if reply.get("denied"):
        _deny(_verdict(reply), str(reply.get("message", "")))
    return reply, fd


def _verdict(reply: dict[str, Any]) -> Verdict:
    return Verdict("block", str(reply.get("rule", "broker")), str(reply.get("reason", "")))


def _deny(verdict: Verdict, message: str = "") -> None:
    """A policy refusal: EACCES (``GuardDenied`` is a PermissionError) naming the rule."""
    raise GuardDenied(verdict, message or f"FailCore blocked it: {verdict.rule}: {verdict.reason}")


def _resolver_error(reply: dict[str, Any]) -> None:
    message = str(reply.get("message", ""))
    if "gai" in reply:
        raise socket.gaierror(int(reply["gai"]), message)
    if "herror" in reply:
        raise socket.herror(int(reply["herror"]), message)
    if "errno" in reply:
        raise OSError(int(reply["errno"]), message or os.strerror(int(reply["errno"])))


# --- connect ----------------------------------------------------------------------------


def _brokered(sock: socket.socket) -> bool:
    return (sock.family in _INET and sock.type == socket.SOCK_STREAM
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
        if exc.errno != errno.ENETUNREACH or sock.family not in _INET:
            raise
        raise OSError(errno.ENETUNREACH, _NO_NETWORK + "only TCP connects and name lookups "
                      "are brokered through the parent, UDP and raw sockets are not)") from None


def connect_request(family: int, proto: int, address: Any) -> dict[str, Any] | None:
    """The ``broker.connect`` body for a TCP socket connecting to ``address``, or None
    where CPython itself refuses the address (its own call then raises, resolving
    nothing: the namespace has no network either way)."""
    size = (2,) if family == socket.AF_INET else (2, 3, 4)
    if not isinstance(address, tuple) or len(address) not in size:
        return None
    host = _text(address[0])
    try:
        port, *extra = (operator.index(x) for x in address[1:])
    except TypeError:
        return None
    if host is None or not _sendable(host):
        return None
    if not 0 <= port <= 65535:
        raise OverflowError("connect(): port must be 0-65535.")
    flowinfo, scope_id = (list(extra) + [0, 0])[:2]
    if not (0 <= flowinfo <= 0xFFFFF and 0 <= scope_id < 2**32):
        return None
    return {"family": int(family), "proto": int(proto), "host": host, "port": port,
            "flowinfo": flowinfo, "scope_id": scope_id}


def _sendable(host: str) -> bool:
    return len(host) <= protocol.BROKER_MAX_HOST and "\0" not in host


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
    reply, fd = _request(protocol.BROKER_CONNECT, fields)
    if fd is None:
        if "gai" in reply:
            _resolver_error(reply)
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
    if self.family in _INET and self.type == socket.SOCK_STREAM:
        options = _options.setdefault(self, {})
        if len(options) < _MAX_OPTIONS or (level, optname) in options:
            kept = value if isinstance(value, int) or value is None else bytes(value)
            options[(level, optname)] = (level, optname, kept, *optlen)


# --- name lookups ----------------------------------------------------------------------------


def _text(host: Any) -> str | None:
    if isinstance(host, (bytes, bytearray)):
        try:
            return bytes(host).decode("ascii")
        except UnicodeDecodeError:
            return None
    return host if isinstance(host, str) else None


def _numeric(host: str, families: tuple[int, ...] = _INET) -> bool:
    """A host CPython and libc read without a resolver (inet_pton forms, or none)."""
    if host in ("", "<broadcast>"):
        return True
    text = host.split("%", 1)[0]
    for family in families:
        try:
            socket.inet_pton(family, text)
            return True
        except (OSError, ValueError):
            pass
    return False


def lookup_request(host: str, port: Any, family: int, type: int, proto: int,
                   flags: int) -> dict[str, Any]:
    """The ``broker.resolve`` body for ``getaddrinfo``; raises what libc would for
    arguments it refuses (so nothing ill-formed is ever sent)."""
    if isinstance(port, (bytes, bytearray)):
        port = bytes(port).decode("ascii", "replace")
    if port is not None and not isinstance(port, (int, str)):
        raise TypeError("getaddrinfo() argument 2 must be integer or string")
    if isinstance(port, int):
        port = int(port)  # True is port 1 to CPython, and a plain int on the wire
    if isinstance(port, int) and not 0 <= port <= 65535 or isinstance(port, str) and not (
            0 < len(port) <= protocol.BROKER_MAX_SERVICE and port.isascii() and "\0" not in port):
        raise socket.gaierror(socket.EAI_SERVICE, "Servname not supported for ai_socktype")
    if int(family) not in (0, *protocol.BROKER_FAMILIES):
        raise socket.gaierror(socket.EAI_FAMILY, "ai_family not supported")
    if int(type) not in protocol.BROKER_SOCKTYPES:
        raise socket.gaierror(socket.EAI_SOCKTYPE, "ai_socktype not supported")
    if int(flags) & ~protocol.BROKER_AI_FLAGS or not 0 <= int(proto) < 256:
        raise socket.gaierror(socket.EAI_BADFLAGS, "Bad value for ai_flags")
    return {"op": "getaddrinfo", "host": host, "port": port, "family": int(family),
            "type": int(type), "proto": int(proto), "flags": int(flags)}


def _getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
                 flags: int = 0) -> list[tuple[Any, ...]]:
    text = _text(host)
    if host is None or text is None or _numeric(text) or not _sendable(text):
        # Nothing to look up (or a host CPython or libc refuses): the local call cannot
        # send a query, AI_NUMERICHOST makes sure of it.
        numeric = flags | socket.AI_NUMERICHOST if host is not None else flags
        return _orig_getaddrinfo(host, port, family, type, proto, numeric)
    reply, _ = _request(protocol.BROKER_RESOLVE, lookup_request(text, port, family, type,
                                                                proto, flags))
    if "addrinfo" not in reply:
        _resolver_error(reply)
    return [(_enum(socket.AddressFamily, f), _enum(socket.SocketKind, t), p, canon, tuple(sa))
            for f, t, p, canon, sa in reply["addrinfo"]]


def _enum(cls: Any, value: int) -> Any:
    try:
        return cls(value)
    except ValueError:
        return value


def _gethostbyname(hostname: Any) -> str:
    text = _text(hostname)
    if text is None or _numeric(text, (socket.AF_INET,)):
        return _orig_gethostbyname(hostname)
    return str(_getaddrinfo(text, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])


def _gethostbyname_ex(hostname: Any) -> tuple[str, list[str], list[str]]:
    text = _text(hostname)
    if text is None or _numeric(text, (socket.AF_INET,)):
        return _orig_gethostbyname_ex(hostname)
    infos = _getaddrinfo(text, None, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_CANONNAME)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    return (infos[0][3] or text), [], addresses


def reverse_request(op: str, host: str, port: int | None = None, flags: int = 0) -> dict[str, Any]:
    """The ``broker.resolve`` body for ``gethostbyaddr`` / ``getnameinfo`` (checked by the
    callers: a host CPython accepts, a port and NI_* flags libc accepts)."""
    return {"op": op, "host": host, "port": port, "family": 0, "type": 0, "proto": 0,
            "flags": int(flags)}


def _reverse(op: str, host: str, port: int | None = None, flags: int = 0) -> dict[str, Any]:
    reply, _ = _request(protocol.BROKER_RESOLVE, reverse_request(op, host, port, flags))
    return reply


def _gethostbyaddr(ip_address: Any) -> tuple[str, list[str], list[str]]:
    text = _text(ip_address)
    if text is None or not _sendable(text):
        return _orig_gethostbyaddr(ip_address)  # CPython's own error
    reply = _reverse("gethostbyaddr", text)
    if "hostent" not in reply:
        _resolver_error(reply)
    name, aliases, addresses = reply["hostent"]
    return str(name), list(aliases), list(addresses)


def _getnameinfo(sockaddr: Any, flags: int) -> tuple[str, str]:
    if not isinstance(flags, int) or flags & socket.NI_NUMERICHOST or not isinstance(sockaddr, tuple) \
            or len(sockaddr) not in (2, 3, 4) or not isinstance(sockaddr[1], int) \
            or _text(sockaddr[0]) is None:
        return _orig_getnameinfo(sockaddr, flags)  # numeric: /etc/services at most, no query
    host = str(_text(sockaddr[0]))
    if not _numeric(host) or host in ("", "<broadcast>") or not 0 <= sockaddr[1] <= 65535:
        return _orig_getnameinfo(sockaddr, flags | socket.NI_NUMERICHOST)  # CPython refuses it
    if flags & ~protocol.BROKER_NI_FLAGS:
        raise socket.gaierror(socket.EAI_BADFLAGS, "Bad value for ai_flags")
    reply = _reverse("getnameinfo", host, int(sockaddr[1]), flags)
    if "nameinfo" not in reply:
        _resolver_error(reply)
    name, service = reply["nameinfo"]
    return str(name), str(service)
