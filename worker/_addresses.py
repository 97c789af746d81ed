"""IP address parsing in every encoding resolvers accept, and special-range classification.

Private to ``failcore_worker.rules`` (which re-exports ``parse_ip`` and ``special_range``). Kept
apart because it is the part most worth property-testing and the tables are long.

Why so lenient a parser: an SSRF filter that understands fewer spellings of an address
than the library that connects is a filter with holes. ``inet_aton`` (and the WHATWG URL
parser) accept ``127.1``, ``0x7f.1``, ``017700000001`` and ``2130706433``; so do we.
Why look through IPv6: ``::ffff:169.254.169.254`` and ``64:ff9b::a9fe:a9fe`` reach the
same host as the IPv4 address they embed.
"""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

IPv4 = ipaddress.IPv4Address
IPv6 = ipaddress.IPv6Address
IPAddress = IPv4 | IPv6

_M32 = 0xFFFFFFFF
_V4_PART = re.compile(r"0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*")
_MAX_DIGITS = {16: 8, 8: 11, 10: 10}  # more significant digits than this cannot fit in 32 bits

LINK_LOCAL = "link-local (cloud metadata)"

# (cidr, label), most specific first. Sources: IANA IPv4/IPv6 Special-Purpose Address
# Registries (RFC 6890 and updates), plus the blocks cloud providers use for metadata.
_V4_TABLE = (
    ("0.0.0.0/32", "unspecified"),
    ("255.255.255.255/32", "broadcast"),
    ("0.0.0.0/8", "this network"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "CGNAT shared address space"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", LINK_LOCAL),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation (TEST-NET-1)"),
    ("192.88.99.0/24", "6to4 relay anycast (deprecated)"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation (TEST-NET-2)"),
    ("203.0.113.0/24", "documentation (TEST-NET-3)"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
)
_V6_TABLE = (
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("100::/64", "discard-only"),
    ("2001:2::/48", "benchmarking"),
    ("2001:10::/28", "ORCHID (deprecated)"),
    ("2001:20::/28", "ORCHIDv2"),
    ("2001:db8::/32", "documentation"),
    ("3fff::/20", "documentation"),
    ("5f00::/16", "SRv6 SIDs"),
    ("fd00:ec2::/32", "unique local (AWS cloud metadata fd00:ec2::254)"),
    ("fc00::/7", "unique local (private)"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local (deprecated)"),
    ("ff00::/8", "multicast"),
)


def _compile(table: tuple[tuple[str, str], ...]) -> tuple[tuple[int, int, str, str], ...]:
    out = []
    for cidr, label in table:
        net = ipaddress.ip_network(cidr)
        out.append((int(net.network_address), int(net.netmask), cidr, label))
    return tuple(out)


_V4 = _compile(_V4_TABLE)
_V6 = _compile(_V6_TABLE)

# Embeddings where the IPv6 address *is* the IPv4 host (a translator or the kernel
# delivers to it): a capability naming the IPv4 address also covers these forms.
TRANSLATED = frozenset({"IPv4-mapped", "IPv4-compatible", "IPv4-translated", "NAT64"})


def _parse_v4(text: str) -> IPv4 | None:
    """inet_aton / WHATWG rules: 1-4 parts, each decimal, 0x-hex or 0-octal; the last
    part fills the remaining bytes."""
    parts = text.split(".")
    if len(parts) > 1 and parts[-1] == "":
        parts.pop()  # one trailing dot, as in a fully qualified name
    if not 1 <= len(parts) <= 4:
        return None
    values: list[int] = []
    for part in parts:
        if not _V4_PART.fullmatch(part):
            return None
        if part[:2] in ("0x", "0X"):
            base, digits = 16, part[2:]
        elif len(part) > 1 and part[0] == "0":
            base, digits = 8, part[1:]
        else:
            base, digits = 10, part
        digits = digits.lstrip("0")
        if len(digits) > _MAX_DIGITS[base]:
            return None
        values.append(int(digits or "0", base))
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for i, v in enumerate(head):
        number |= v << (24 - 8 * i)
    return IPv4(number)


def parse_ip(text: str) -> IPAddress | None:
    """Parse ``text`` as an IP address in any form a resolver or a URL parser accepts.

    Accepts dotted quads and their 1-3 part, decimal, hex, octal and mixed forms, a
    trailing dot, brackets, IPv6 zone ids (dropped: the zone does not change which
    range the address is in) and IPv4-in-IPv6 notation. Returns None for a DNS name
    (or anything else). Percent-decoding is the caller's job.
    """
    t = text.strip()
    if len(t) > 2 and t[0] == "[" and t[-1] == "]":
        t = t[1:-1]
    if ":" in t:
        t = t.split("%", 1)[0]
        try:
            return IPv6(t)
        except ValueError:
            return None
    if not t.isascii():
        return None
    return _parse_v4(t)


def embedded_v4(ip: IPv6) -> tuple[str, str, IPv4] | None:
    """(kind, prefix, IPv4) for an IPv6 address that embeds an IPv4 address, else None.

    ``kind`` is one of ``TRANSLATED`` (the IPv6 address reaches the IPv4 host itself)
    or "6to4" / "Teredo" (it reaches a relay for that host).
    """
    n = int(ip)
    top96 = n >> 32
    if top96 == 0xFFFF:
        return "IPv4-mapped", "::ffff:0:0/96", IPv4(n & _M32)
    if top96 == 0 and n > 1:
        return "IPv4-compatible", "::/96", IPv4(n & _M32)
    if top96 == 0xFFFF << 16:
        return "IPv4-translated", "::ffff:0:0:0/96", IPv4(n & _M32)
    if top96 == 0x64FF9B << 64:
        return "NAT64", "64:ff9b::/96", IPv4(n & _M32)
    if n >> 80 == 0x64FF9B0001:
        # RFC 6052 /48 layout puts the IPv4 in bits 48-63 and 72-87; a /96-style
        # suffix is also seen in the wild, so a special IPv4 in either place counts.
        rfc = IPv4(((n >> 64) & 0xFFFF) << 16 | ((n >> 40) & 0xFFFF))
        low = IPv4(n & _M32)
        for candidate in (rfc, low):
            if int(candidate) and _classify_v4(candidate) is not None:
                return "NAT64", "64:ff9b:1::/48", candidate
        return "NAT64", "64:ff9b:1::/48", rfc
    if n >> 112 == 0x2002:
        return "6to4", "2002::/16", IPv4((n >> 80) & _M32)
    if n >> 96 == 0x20010000:
        return "Teredo", "2001::/32", IPv4(~n & _M32)
    return None


# Embeddings that are special whatever IPv4 they carry.
_SPECIAL_EMBEDDING = {
    "::/96": "IPv4-compatible (deprecated)",
    "::ffff:0:0:0/96": "IPv4-translated (SIIT)",
    "64:ff9b:1::/48": "NAT64 local-use",
}


def _classify_v4(ip: IPv4) -> tuple[str, str] | None:
    n = int(ip)
    for net, mask, cidr, label in _V4:
        if n & mask == net:
            return cidr, label
    return None


def special_range(ip: IPAddress) -> tuple[str, str] | None:
    """(cidr, label) of the special range ``ip`` falls in, looking through embedded IPv4.

    An embedded special IPv4 reports the IPv4 block, e.g. ``("169.254.0.0/16",
    "link-local (cloud metadata) via IPv4-mapped ::ffff:0:0/96")``. IPv6 outside
    global unicast 2000::/3 that matches nothing more specific is "reserved".
    """
    if isinstance(ip, IPv4):
        return _classify_v4(ip)
    n = int(ip)
    if n <= 1:
        return _V6_TABLE[n]
    inner = embedded_v4(ip)
    if inner is not None:
        kind, prefix, v4 = inner
        found = _classify_v4(v4)
        if found is not None:
            return found[0], f"{found[1]} via {kind} {prefix}"
        if prefix in _SPECIAL_EMBEDDING:
            return prefix, _SPECIAL_EMBEDDING[prefix]
        if kind in ("IPv4-mapped", "NAT64"):
            return None  # reaches the public IPv4 host itself
    for net, mask, cidr, label in _V6:
        if n & mask == net:
            return cidr, label
    if n >> 125 != 1:
        block = ipaddress.IPv6Network(((n >> 125) << 125, 3))
        return str(block), "reserved (outside global unicast 2000::/3)"
    return None


# --- public addresses and address blocks ----------------------------------------------------

IPv4Net = ipaddress.IPv4Network
IPv6Net = ipaddress.IPv6Network
Net = IPv4Net | IPv6Net


def is_public(ip: IPAddress) -> bool:
    """True when ``ip`` is globally routable: in no special range, looking through every
    IPv4 embedding (mapped, compatible, translated, NAT64, 6to4, Teredo). This is what
    ``net:connect:public`` covers."""
    return special_range(ip) is None


# IPv6 blocks where every address embeds an IPv4 one in its low 32 bits (kind, prefix).
_LOW32 = (
    (0xFFFF << 32, "IPv4-mapped", "::ffff:0:0/96"),
    (0xFFFF << 48, "IPv4-translated", "::ffff:0:0:0/96"),
    (0x64FF9B << 96, "NAT64", "64:ff9b::/96"),
)
# Wholly special whatever they embed (see _SPECIAL_EMBEDDING), or all outside 2000::/3.
_ALL_SPECIAL_V6 = tuple(ipaddress.IPv6Network(c) for c in (
    "::/96", "::ffff:0:0:0/96", "64:ff9b:1::/48", "4000::/2", "8000::/1"))
_EMBEDDING_V6 = tuple(ipaddress.IPv6Network(c) for c in (
    "::ffff:0:0/96", "64:ff9b::/96", "2002::/16", "2001::/32"))
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")
_V4_NETS = tuple(ipaddress.IPv4Network(c) for c, _ in _V4_TABLE)
_V6_NETS = tuple(ipaddress.IPv6Network(c) for c, _ in _V6_TABLE)


@lru_cache(maxsize=256)
def parse_network(cidr: str) -> Net:
    return ipaddress.ip_network(cidr, strict=False)


def embedded_network(net: IPv6Net) -> tuple[str, str, IPv4Net] | None:
    """(kind, prefix, IPv4 block) when every address of ``net`` embeds an IPv4 address the
    same way and those addresses are exactly that block; None otherwise.

    The IPv6 counterpart of ``embedded_v4`` for address blocks: ``::ffff:10.0.0.0/104``
    is ("IPv4-mapped", "::ffff:0:0/96", 10.0.0.0/8); a 6to4 block ``2002:a9fe::/32``
    is ("6to4", "2002::/16", 169.254.0.0/16); a Teredo block longer than /96 maps to the
    inverted client bits. NAT64 local-use (64:ff9b:1::/48) is wholly special, so it is
    never projected.
    """
    first, p = int(net.network_address), net.prefixlen
    for base, kind, prefix in _LOW32:
        if p >= 96 and first >> 32 == base >> 32:
            return kind, prefix, IPv4Net((first & _M32, p - 96))
    if p >= 96 and first >> 32 == 0 and first > 1:  # not "::" or "::1", special themselves
        return "IPv4-compatible", "::/96", IPv4Net((first & _M32, p - 96))
    if p >= 16 and first >> 112 == 0x2002:
        return "6to4", "2002::/16", IPv4Net(((first >> 80) & _M32, min(p - 16, 32)))
    if p >= 96 and first >> 96 == 0x20010000:
        last = int(net.broadcast_address)
        return "Teredo", "2001::/32", IPv4Net((~last & _M32, p - 96))
    return None


def network_inside(net: Net, ip: IPAddress) -> bool:
    """True when the whole of ``net`` lies in the special range ``ip`` is in.

    This is net_safe's containment rule: a grant opens a blocked address only when the
    grant lies inside the blocked range (``10.1.2.0/24`` inside ``10.0.0.0/8``), never
    when it merely contains it (``0.0.0.0/0``). For an IPv6 address that embeds a special
    IPv4 one, ``net`` must be inside that IPv4 range: as IPv4 (a grant naming the IPv4
    block covers its translated forms), or as IPv6 embedding it the same way.
    """
    found = special_range(ip)
    if found is None:
        return False
    cidr = parse_network(found[0])
    if cidr.version == net.version:
        return net.subnet_of(cidr)  # type: ignore[arg-type]
    if isinstance(net, IPv6Net) and isinstance(ip, IPv6) and isinstance(cidr, IPv4Net):
        inner, block = embedded_v4(ip), embedded_network(net)
        return (inner is not None and block is not None and inner[:2] == block[:2]
                and block[2].subnet_of(cidr))
    return False


def network_publicness(net: Net) -> str:
    """"all", "none" or "some": how much of ``net`` is public (see ``is_public``).

    Exact for IPv4 and for IPv6 blocks inside an embedding; for other IPv6 blocks an
    overlap with an embedding region counts as "some" (such a block always holds both).
    """
    if net.num_addresses == 1:
        return "all" if is_public(net.network_address) else "none"
    if isinstance(net, IPv4Net):
        if any(net.subnet_of(s) for s in _V4_NETS):
            return "none"
        return "some" if any(net.overlaps(s) for s in _V4_NETS) else "all"
    block = embedded_network(net)
    if block is not None:
        if block[1] in _SPECIAL_EMBEDDING:
            return "none"
        return network_publicness(block[2])
    if any(net.subnet_of(s) for s in _V6_NETS + _ALL_SPECIAL_V6):
        return "none"
    if not net.subnet_of(_GLOBAL_UNICAST) or any(
            net.overlaps(s) for s in _V6_NETS + _EMBEDDING_V6):
        return "some"
    return "all"


def blocked_ranges_in(net: Net) -> list[tuple[str, str]]:
    """The special ranges ``net`` contains without lying inside them: what a grant of
    ``net`` would reopen if containment were enough (``0.0.0.0/0`` lists every IPv4 one)."""
    found: list[tuple[str, str]] = []
    if isinstance(net, IPv4Net):
        table: tuple[tuple[str, str], ...] = _V4_TABLE
    else:
        block = embedded_network(net)
        if block is not None:
            kind, prefix, v4 = block
            return [(c, f"{label} via {kind} {prefix}") for c, label in blocked_ranges_in(v4)]
        table = _V6_TABLE + tuple(
            (str(e), f"{kind} forms of the blocked IPv4 ranges") for e, kind in zip(
                _EMBEDDING_V6, ("IPv4-mapped", "NAT64", "6to4", "Teredo"), strict=True))
    for cidr, label in table:
        special = parse_network(cidr)
        if net.overlaps(special) and not net.subnet_of(special):  # type: ignore[arg-type]
            found.append((cidr, label))
    if isinstance(net, IPv6Net) and not net.subnet_of(_GLOBAL_UNICAST) and not any(
            net.subnet_of(s) for s in _V6_NETS + _ALL_SPECIAL_V6):
        found.append(("outside 2000::/3", "reserved (outside global unicast 2000::/3)"))
    return found
