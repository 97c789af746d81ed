"""What one ``net:connect`` rule covers: addresses, names, and other rules.

Private to ``failcore_worker.rules`` (and ``grants``, which orders rules by what they
cover). Two decisions live here, once, because every layer asks them (the worker's
guards, the parent's pre-check, the watchdog and ``failcore replay --policy`` all judge
through ``rules.check_connect`` / ``check_host``, which call ``covers_address``):

* **public**: the host ``public`` covers exactly the globally routable addresses
  (``_addresses.is_public``), whatever the session policy; ``public@CIDR`` covers the
  public part of that block (what a policy's allow list makes of ``public`` and a CIDR).
* **containment**: under net_safe (``block_ranges``) an IP or CIDR rule opens a blocked
  address only when the rule lies *inside* the blocked range the address is in
  (``10.1.2.0/24`` opens 10.1.2.3; ``0.0.0.0/0``, ``10.0.0.0/7`` and ``::/0`` do not open
  10.0.0.5, in any encoding). A rule that merely contains a blocked range covers only its
  public part. Without net_safe a CIDR covers everything it contains, as written.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

from failcore_worker._addresses import (
    TRANSLATED,
    IPAddress,
    Net,
    blocked_ranges_in,
    embedded_v4,
    network_inside,
    network_publicness,
    parse_ip,
    special_range,
)

PUBLIC = "public"
_LOOPBACK_NAME = "localhost"


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


@lru_cache(maxsize=1024)
def rule_target(host: str) -> tuple[str, tuple[Net, ...], str]:
    """(kind, networks, name) for a rule's host.

    kind is "any" (``*``), "net" (an IP or CIDR; an IPv4-mapped block also yields the
    IPv4 block it maps), "public" (networks: its scope, empty for all of it), "suffix"
    (``*.example.com``, name ``.example.com``) or "name".
    """
    h = host.strip().lower().replace("[", "").replace("]", "").rstrip(".")
    if h == "*":
        return "any", (), ""
    if h.startswith("*."):
        return "suffix", (), h[1:]
    if h == PUBLIC:
        return "public", (), ""
    if h.startswith(PUBLIC + "@"):
        kind, scope, _ = rule_target(h[len(PUBLIC) + 1:])
        # A scope that is not an address block names nothing: cover nothing.
        return "public", scope if kind == "net" else (ipaddress.IPv4Network("0.0.0.0/32"),), ""
    net: Net | None = None
    if "/" in h:
        try:
            net = ipaddress.ip_network(h, strict=False)
        except ValueError:
            return "name", (), h  # matches nothing a resolver returns
    else:
        ip = parse_ip(h)
        if ip is not None:
            net = ipaddress.ip_network(ip)
    if net is None:
        return "name", (), h
    nets: tuple[Net, ...] = (net,)
    if isinstance(net, ipaddress.IPv6Network):
        # An IPv6 block reaches the IPv4 hosts whose mapped forms (::ffff:a.b.c.d) it holds:
        # a block inside ::ffff:0:0/96 maps part of IPv4, one containing it maps all of it.
        if net.prefixlen >= 96 and int(net.network_address) >> 32 == 0xFFFF:
            nets += (ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF,
                                            net.prefixlen - 96)),)
        elif net.supernet_of(_MAPPED):
            nets += (ipaddress.IPv4Network("0.0.0.0/0"),)
    return "net", nets, ""


def candidates(ip: IPAddress) -> tuple[IPAddress, ...]:
    """``ip`` plus the IPv4 host it reaches when it is a translated IPv6 form."""
    return _facts(ip)[0]


@lru_cache(maxsize=1024)
def _facts(ip: IPAddress) -> tuple[tuple[IPAddress, ...], tuple[str, str] | None]:
    """(candidates, special range) of an address: asked once per rule per connect."""
    cands: tuple[IPAddress, ...] = (ip,)
    if isinstance(ip, ipaddress.IPv6Address):
        inner = embedded_v4(ip)
        if inner is not None and inner[0] in TRANSLATED:
            cands = (ip, inner[2])
    return cands, special_range(ip)


def _in(nets: Sequence[Net], cands: Sequence[IPAddress]) -> list[Net]:
    return [n for n in nets for c in cands if c.version == n.version and c in n]


def covers_address(host: str, ip: IPAddress, block_ranges: bool) -> bool:
    """True when a rule for ``host`` covers a connection to ``ip`` (ports aside).

    THE containment rule (see the module docstring): with ``block_ranges`` a special
    address is covered only by a rule lying inside its special range; ``public`` never
    covers a special address; "localhost" covers the loopback addresses.
    """
    kind, nets, name = rule_target(host)
    cands, special = _facts(ip)
    if kind == "public":
        return special is None and (not nets or bool(_in(nets, cands)))
    if kind == "net":
        matched = _in(nets, cands)
        if not matched:
            return False
        if not block_ranges or special is None:
            return True
        return any(network_inside(n, ip) for n in matched)
    return name == _LOOPBACK_NAME and any(c.is_loopback for c in cands)


def covers_name(host: str, names: Sequence[str]) -> bool:
    """True when a name rule covers one of ``names`` (lowercase, no trailing dot)."""
    kind, _, name = rule_target(host)
    if kind == "any":
        return True
    if kind == "suffix":
        return any(n.endswith(name) for n in names)
    return kind == "name" and name in names


def is_address_rule(host: str) -> bool:
    """True when the rule may cover an address no rule names, so a name the rules do
    not cover may still have to be resolved (the connect then decides)."""
    kind, _, name = rule_target(host)
    return kind in ("net", "public") or name == _LOOPBACK_NAME


def _ends(nets: Sequence[Net]) -> list[IPAddress]:
    return [a for n in nets for a in (n.network_address, n.broadcast_address)]


def _opens_special(host: str, nets: Sequence[Net], block_ranges: bool) -> list[IPAddress]:
    """Special addresses of ``nets`` the rule covers, one per special range it opens.

    Every special address a rule lying inside a range opens is in that same range, and
    the tables nest only at a range's first or last address, so a block's two ends find
    each range it opens (the subset property tests hold this to check_connect).
    """
    return [a for a in _ends(nets)
            if special_range(a) is not None and covers_address(host, a, block_ranges)]


def rule_within(inner: str, outer: str, inner_blocks: bool, outer_blocks: bool) -> bool:
    """True when every address or name rule ``inner`` covers, ``outer`` covers too
    (each under its own ``block_ranges``). Conservative: False when unsure."""
    ikind, inets, iname = rule_target(inner)
    okind, onets, oname = rule_target(outer)
    if okind == "any":  # every name, and every address net_safe does not block
        if not outer_blocks or ikind in ("any", "public", "suffix"):
            return True
        if ikind == "name":
            return iname != _LOOPBACK_NAME
        return not _opens_special(inner, inets, inner_blocks)
    if okind == "suffix":
        return ikind in ("name", "suffix") and (iname.endswith(oname) and iname != oname[1:])
    if okind == "name":
        return ikind == "name" and iname == oname
    if ikind not in ("net", "public") or (ikind == "public" and not inets):
        return okind == "public" and ikind == "public" and not onets
    # An IPv4-mapped block covers exactly what the IPv4 block it maps covers (see
    # candidates), so that IPv4 block (its last network) stands for it; any other block
    # must lie, network by network, inside the outer rule (::/0 also maps all of IPv4).
    mapped = inets[0].version == 6 and inets[0].subnet_of(_MAPPED)
    inside = all(any(i.version == o.version and i.subnet_of(o)  # type: ignore[arg-type]
                     for o in onets) for i in (inets[-1:] if mapped else inets))
    if okind == "public":
        if onets and not inside:
            return False
        if ikind == "public":
            return True
        if not inner_blocks:
            return all(network_publicness(n) == "all" for n in inets)
        return not _opens_special(inner, inets, inner_blocks)
    if not inside:
        return False
    if ikind == "public" or not outer_blocks:
        return True
    if not inner_blocks:
        return all(network_publicness(n) == "all" for n in inets)
    return all(covers_address(outer, a, outer_blocks)
               for a in _opens_special(inner, inets, inner_blocks))


def blocked_inside(host: str) -> list[tuple[str, str]]:
    """The blocked ranges an IP/CIDR rule contains without lying inside them: what it
    does NOT open under net_safe (``failcore policy check`` warns about them)."""
    kind, nets, _ = rule_target(host)
    return blocked_ranges_in(nets[0]) if kind == "net" else []
