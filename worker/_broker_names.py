"""The socket broker's name lookups, worker side: every query is asked of the parent.

Private to ``failcore_worker._broker``, which installs these over the ``socket`` module's
resolver functions. A lookup is a DNS query, a data channel of its own, so the parent
judges it before making it; numeric hosts (and arguments libc or CPython refuse) are
answered here, where the call cannot send a query. Replies are turned back into exactly
what the stdlib functions return (enums included), and resolver failures into the same
``gaierror`` / ``herror``. The request builders are public so that tests can check that
what the worker sends is always well formed.
"""

from __future__ import annotations

import socket
from typing import Any

from failcore_worker import protocol
from failcore_worker._broker_channel import numeric, request, resolver_error, sendable, text

orig_getaddrinfo = socket.getaddrinfo
_orig_gethostbyname = socket.gethostbyname
_orig_gethostbyname_ex = socket.gethostbyname_ex
_orig_gethostbyaddr = socket.gethostbyaddr
_orig_getnameinfo = socket.getnameinfo


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


def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0,
                flags: int = 0) -> list[tuple[Any, ...]]:
    name = text(host)
    if host is None or name is None or numeric(name) or not sendable(name):
        # Nothing to look up (or a host CPython or libc refuses): the local call cannot
        # send a query, AI_NUMERICHOST makes sure of it.
        local = flags | socket.AI_NUMERICHOST if host is not None else flags
        return orig_getaddrinfo(host, port, family, type, proto, local)
    reply, _ = request(protocol.BROKER_RESOLVE, lookup_request(name, port, family, type,
                                                               proto, flags))
    if "addrinfo" not in reply:
        resolver_error(reply)
    return [(_enum(socket.AddressFamily, f), _enum(socket.SocketKind, t), p, canon, tuple(sa))
            for f, t, p, canon, sa in reply["addrinfo"]]


def _enum(cls: Any, value: int) -> Any:
    try:
        return cls(value)
    except ValueError:
        return value


def gethostbyname(hostname: Any) -> str:
    name = text(hostname)
    if name is None or numeric(name, (socket.AF_INET,)):
        return _orig_gethostbyname(hostname)
    return str(getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])


def gethostbyname_ex(hostname: Any) -> tuple[str, list[str], list[str]]:
    name = text(hostname)
    if name is None or numeric(name, (socket.AF_INET,)):
        return _orig_gethostbyname_ex(hostname)
    infos = getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM, 0, socket.AI_CANONNAME)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    return (infos[0][3] or name), [], addresses


def reverse_request(op: str, host: str, port: int | None = None, flags: int = 0) -> dict[str, Any]:
    """The ``broker.resolve`` body for ``gethostbyaddr`` / ``getnameinfo`` (checked by the
    callers: a host CPython accepts, a port and NI_* flags libc accepts)."""
    return {"op": op, "host": host, "port": port, "family": 0, "type": 0, "proto": 0,
            "flags": int(flags)}


def _reverse(op: str, host: str, port: int | None = None, flags: int = 0) -> dict[str, Any]:
    reply, _ = request(protocol.BROKER_RESOLVE, reverse_request(op, host, port, flags))
    return reply


def gethostbyaddr(ip_address: Any) -> tuple[str, list[str], list[str]]:
    name = text(ip_address)
    if name is None or not sendable(name):
        return _orig_gethostbyaddr(ip_address)  # CPython's own error
    reply = _reverse("gethostbyaddr", name)
    if "hostent" not in reply:
        resolver_error(reply)
    found, aliases, addresses = reply["hostent"]
    return str(found), list(aliases), list(addresses)


def getnameinfo(sockaddr: Any, flags: int) -> tuple[str, str]:
    if not isinstance(flags, int) or flags & socket.NI_NUMERICHOST \
            or not isinstance(sockaddr, tuple) or len(sockaddr) not in (2, 3, 4) \
            or not isinstance(sockaddr[1], int) or text(sockaddr[0]) is None:
        return _orig_getnameinfo(sockaddr, flags)  # numeric: /etc/services at most, no query
    host = str(text(sockaddr[0]))
    if not numeric(host) or host in ("", "<broadcast>") or not 0 <= sockaddr[1] <= 65535:
        return _orig_getnameinfo(sockaddr, flags | socket.NI_NUMERICHOST)  # CPython refuses it
    if flags & ~protocol.BROKER_NI_FLAGS:
        raise socket.gaierror(socket.EAI_BADFLAGS, "Bad value for ai_flags")
    reply = _reverse("getnameinfo", host, int(sockaddr[1]), flags)
    if "nameinfo" not in reply:
        resolver_error(reply)
    found, service = reply["nameinfo"]
    return str(found), str(service)
