"""The set algebra on capabilities: ``meet`` (what two grant in common) and ``covers``.

The session policy intersects a tool's capabilities with its allow list and tests them
against its deny list with these two functions, so what a policy lets a tool hold is
decided here and nowhere else.

The exact semantics for hosts, the one part with choices in it:

* names never meet addresses: whether ``api.github.com`` is inside ``0.0.0.0/0`` would
  need DNS, and the answer could change after the check, so they share nothing;
* ``*.example.com`` meets ``a.example.com`` as ``a.example.com``; CIDRs meet as the
  smaller when one holds the other, else nothing (an IPv4 and an IPv6 block share only
  the IPv6 forms of the IPv4 one, which its grant reaches anyway: they meet as nothing,
  the one place the result is smaller than the exact intersection);
* ``public`` (every globally routable address) meets a CIDR as **the public part of that
  CIDR**: the CIDR itself when it is all public (``8.8.8.0/24``), nothing when it holds
  no public address (``10.0.0.0/8``), and ``public@CIDR`` when it mixes both
  (``public`` and ``0.0.0.0/0`` meet as ``public@0.0.0.0/0``: every public IPv4
  address). Two ``public`` scopes meet as their scopes do. ``public`` meets no name.
"""

from __future__ import annotations

import ipaddress

from failcore._capabilities import (
    PUBLIC,
    Capability,
    Env,
    FsRead,
    FsWrite,
    NetConnect,
    ProcExec,
    public_host,
)

__all__ = ["meet", "covers"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def meet(a: Capability, b: Capability) -> Capability | None:
    """The capability granting exactly what both ``a`` and ``b`` grant, or None if nothing.

    Filesystem: the deeper path, write only if both write. Network: the narrower host
    (see the module docstring) and the common port range.
    """
    if isinstance(a, NetConnect) and isinstance(b, NetConnect):
        lo, hi = max(a.port_lo, b.port_lo), min(a.port_hi, b.port_hi)
        host = _host_meet(a.host, b.host)
        return None if host is None or lo > hi else NetConnect(host, lo, hi)
    if isinstance(a, FsRead | FsWrite) and isinstance(b, FsRead | FsWrite):
        path = _path_meet(a.path, b.path)
        if path is None:
            return None
        both_write = isinstance(a, FsWrite) and isinstance(b, FsWrite)
        return FsWrite(path) if both_write else FsRead(path)
    if isinstance(a, Env) and isinstance(b, Env):
        for x, y in ((a.name, b.name), (b.name, a.name)):
            if x == y or (x.endswith("*") and y.startswith(x[:-1])):
                return Env(y)
        return None
    if isinstance(a, ProcExec) and isinstance(b, ProcExec):
        return a if a == b else None
    return None


def covers(pattern: Capability, cap: Capability) -> bool:
    """True when everything ``cap`` grants is also granted by ``pattern``."""
    return meet(pattern, cap) == cap


def _path_meet(a: str, b: str) -> str | None:
    """The deeper of two paths when one contains the other, else None."""
    if a == b or b.startswith(a.rstrip("/") + "/"):
        return b
    if a.startswith(b.rstrip("/") + "/"):
        return a
    return None


def _network(host: str) -> Network | None:
    try:
        return ipaddress.ip_network(host, strict=True)
    except ValueError:
        return None


def _net_meet(a: Network, b: Network) -> Network | None:
    if a.version != b.version:
        return None
    if a.subnet_of(b):  # type: ignore[arg-type]
        return a
    if b.subnet_of(a):  # type: ignore[arg-type]
        return b
    return None


def _public_scope(host: str) -> tuple[bool, Network | None]:
    """(is public, scope): ``public`` has no scope, ``public@CIDR`` that CIDR."""
    if host == PUBLIC:
        return True, None
    if host.startswith(PUBLIC + "@"):
        return True, _network(host[len(PUBLIC) + 1:])
    return False, None


def _public_meet(a: str, b: str) -> str | None:
    (pa, sa), (pb, sb) = _public_scope(a), _public_scope(b)
    if not pa:
        (pa, sa), (pb, sb), a, b = (pb, sb), (pa, sa), b, a
    other = sb if pb else _network(b)
    if not pb and other is None:
        return None  # a name or a wildcard: public addresses are not names
    if sa is None or other is None:
        scope = sa if other is None else other
    else:
        scope = _net_meet(sa, other)
        if scope is None:
            return None
    return public_host(scope)


def _host_meet(a: str, b: str) -> str | None:
    if _public_scope(a)[0] or _public_scope(b)[0]:
        return _public_meet(a, b)
    na, nb = _network(a), _network(b)
    if na is not None or nb is not None:
        if na is None or nb is None:
            return None  # a name and an address: unknowable without DNS, so no overlap
        both = _net_meet(na, nb)
        return None if both is None else (a if both is na else b)
    if a == b:
        return a
    for wide, narrow in ((a, b), (b, a)):
        if wide.startswith("*.") and narrow.endswith(wide[1:]) and narrow != wide:
            return narrow
    return None
