"""Properties of failcore_worker.rules: encodings, round trips, the subset order, path confinement."""

from __future__ import annotations

import ipaddress
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from failcore_worker.rules import (
    FsRule,
    Grants,
    NetRule,
    check_connect,
    check_exec,
    check_host,
    check_path,
    env_matches,
    parse_ip,
    special_range,
)

SAFE = Grants(block_ranges=True)
BLOCKED_V4 = [
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
    "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
]


@st.composite
def blocked_v4(draw: st.DrawFn) -> ipaddress.IPv4Address:
    net = ipaddress.IPv4Network(draw(st.sampled_from(BLOCKED_V4)))
    offset = draw(st.integers(0, net.num_addresses - 1))
    return net.network_address + offset


def _part(value: int, style: str) -> str:
    return {"dec": str(value), "hex": hex(value), "HEX": f"0X{value:X}", "oct": f"0{value:o}",
            "zhex": f"0x000{value:x}", "zoct": f"000{value:o}"}[style]


STYLES = st.sampled_from(["dec", "hex", "HEX", "oct", "zhex", "zoct"])


@st.composite
def v4_encoding(draw: st.DrawFn, ip: ipaddress.IPv4Address) -> str:
    """One of the textual forms inet_aton / WHATWG accept for ``ip``."""
    n = int(ip)
    b = ip.packed
    parts = draw(st.integers(1, 4))
    if parts == 1:
        fields = [n]
    elif parts == 2:
        fields = [b[0], n & 0xFFFFFF]
    elif parts == 3:
        fields = [b[0], b[1], n & 0xFFFF]
    else:
        fields = list(b)
    text = ".".join(_part(f, draw(STYLES)) for f in fields)
    return text + draw(st.sampled_from(["", "."]))


@st.composite
def v6_embedding(draw: st.DrawFn, ip: ipaddress.IPv4Address) -> str:
    n = int(ip)
    form = draw(st.sampled_from(["mapped", "mapped-hex", "nat64", "6to4", "teredo", "translated"]))
    if form == "mapped":
        return f"::ffff:{ip}"
    if form == "mapped-hex":
        return str(ipaddress.IPv6Address((0xFFFF << 32) | n))
    if form == "nat64":
        return str(ipaddress.IPv6Address((0x64FF9B << 96) | n))
    if form == "6to4":
        return str(ipaddress.IPv6Address((0x2002 << 112) | (n << 80) | draw(st.integers(0, 2**80 - 1))))
    if form == "teredo":
        server = draw(st.integers(0, 2**32 - 1))
        return str(ipaddress.IPv6Address((0x20010000 << 96) | (server << 64) | (~n & 0xFFFFFFFF)))
    return str(ipaddress.IPv6Address((0xFFFF << 48) | n))


@given(data=st.data(), ip=blocked_v4())
def test_every_v4_encoding_classifies_like_the_canonical_form(data: st.DataObject,
                                                              ip: ipaddress.IPv4Address) -> None:
    canonical = special_range(ip)
    assert canonical is not None
    text = data.draw(v4_encoding(ip))
    assert parse_ip(text) == ip, text
    verdict = check_host(SAFE, text, 80)
    assert verdict.action == "block" and verdict.rule.startswith(f"net_safe: {canonical[0]}"), text


@given(data=st.data(), ip=blocked_v4())
def test_every_v6_embedding_classifies_like_the_v4(data: st.DataObject,
                                                   ip: ipaddress.IPv4Address) -> None:
    canonical = special_range(ip)
    assert canonical is not None
    text = data.draw(v6_embedding(ip))
    parsed = parse_ip(text)
    assert parsed is not None
    found = special_range(parsed)
    assert found is not None and found[0] == canonical[0], (text, found)
    for host in (text, f"[{text}]"):
        verdict = check_connect(SAFE, str(parsed), 443) if host == text else check_host(SAFE, host, 443)
        assert verdict.action == "block" and canonical[0] in verdict.rule


@given(st.ip_addresses())
def test_parse_ip_round_trips_canonical_text(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    assert parse_ip(str(ip)) == ip
    assert parse_ip(f"[{ip}]") == ip if ip.version == 6 else True
    special_range(ip)  # never raises


@given(st.ip_addresses(v=6))
def test_ipv6_outside_global_unicast_is_special(ip: ipaddress.IPv6Address) -> None:
    found = special_range(ip)
    top = int(ip) >> 125
    if top != 1:  # not in 2000::/3
        embedded_public = (int(ip) >> 32) in (0xFFFF, 0x64FF9B << 64) and found is None
        assert found is not None or embedded_public


@given(st.text(max_size=40))
def test_parse_ip_and_check_host_never_crash(text: str) -> None:
    parse_ip(text)
    assert check_host(SAFE, text, 80).action in ("allow", "warn", "block")


# --- the subset order ----------------------------------------------------------------------

HOSTS = ["a.example.com", "b.example.com", "*.example.com", "example.com", "10.0.0.0/8",
         "10.1.0.0/16", "10.1.2.3", "127.0.0.1", "localhost", "*", "0.0.0.0/0", "10.0.0.0/7",
         "8.8.8.0/24", "public", "public@0.0.0.0/0", "public@10.0.0.0/7", "::/0",
         "::ffff:10.0.0.0/104", "2002::/16", "0.0.0.0/8"]
PATHS = ["/srv", "/srv/a", "/srv/a/b", "/srvx", "/opt"]
PORTS = [(0, 65535), (443, 443), (80, 443), (8080, 8080)]


@st.composite
def grants(draw: st.DrawFn) -> Grants:
    net = tuple(NetRule(h, lo, hi) for h, (lo, hi) in draw(st.lists(
        st.tuples(st.sampled_from(HOSTS), st.sampled_from(PORTS)), max_size=3)))
    fs = tuple(FsRule(p, w) for p, w in draw(st.lists(
        st.tuples(st.sampled_from(PATHS), st.booleans()), max_size=3)))
    return Grants(
        net=net, fs=fs,
        exec=tuple(draw(st.lists(st.sampled_from(["/bin/true", "/bin/false"]), max_size=2))),
        env=tuple(draw(st.lists(st.sampled_from(["A", "A_*", "A_B", "B"]), max_size=2))),
        default=draw(st.sampled_from(["block", "warn", "allow"])),
        block_ranges=draw(st.booleans()),
        fs_root=draw(st.sampled_from([None, "/srv", "/srv/a"])),
        deny_exec=draw(st.booleans()),
    )


@given(grants())
def test_subset_is_reflexive_and_wire_round_trips(g: Grants) -> None:
    assert g.is_subset_of(g)
    assert Grants.from_wire(g.to_wire()) == g


@given(grants(), grants(), grants())
def test_subset_is_transitive(a: Grants, b: Grants, c: Grants) -> None:
    if a.is_subset_of(b) and b.is_subset_of(c):
        assert a.is_subset_of(c)


PROBE_IPS = ["10.1.2.3", "10.9.9.9", "127.0.0.1", "93.184.216.34", "::ffff:10.1.2.3",
             "8.8.8.8", "::ffff:8.8.8.8", "11.0.0.1", "169.254.169.254", "2002:a9fe:a9fe::1",
             "2002:808:808::1", "0.1.2.3", "0.0.0.0", "64:ff9b::a0a:a0a"]
PROBE_NAMES = [(), ("a.example.com",), ("example.com",), ("x.a.example.com",)]
PROBE_PATHS = ["/srv/a/b/c", "/srv/a/x", "/srv/q", "/srvx/y", "/opt/z", "/etc/passwd"]


@st.composite
def widened(draw: st.DrawFn, small: Grants) -> Grants:
    """Grants with every right of ``small`` and possibly more."""
    more = draw(grants())
    ranks = ["block", "warn", "allow"]
    roots = [None, "/srv"] + ([small.fs_root] if small.fs_root else [])
    root = draw(st.sampled_from(roots)) if small.fs_root else None
    return Grants(
        net=small.net + more.net, fs=small.fs + more.fs, exec=small.exec + more.exec,
        env=small.env + more.env,
        default=draw(st.sampled_from(ranks[ranks.index(small.default):])),  # type: ignore[arg-type]
        block_ranges=small.block_ranges and draw(st.booleans()),
        fs_root=root, deny_exec=small.deny_exec and draw(st.booleans()),
    )


@given(st.data(), grants(), st.sampled_from(PROBE_IPS), st.sampled_from([80, 443, 8080]),
       st.sampled_from(PROBE_NAMES), st.sampled_from(PROBE_PATHS), st.booleans(),
       st.sampled_from(["A", "A_B", "A_C", "B", "C"]))
def test_subset_is_sound(data: st.DataObject, small: Grants, ip: str, port: int,
                         names: tuple[str, ...], path: str, write: bool, env: str) -> None:
    """A widened grant set contains the original, and allows whatever the original allows."""
    big = data.draw(widened(small))
    assert small.is_subset_of(big)
    for a, b in ((small, big), (big, small)) if big.is_subset_of(small) else ((small, big),):
        if check_connect(a, ip, port, names).allowed:
            assert check_connect(b, ip, port, names).allowed
        if check_path(a, path, write).allowed:
            assert check_path(b, path, write).allowed
        if check_exec(a, "/bin/true").allowed:
            assert check_exec(b, "/bin/true").allowed
        if any(env_matches(p, env) for p in a.env):
            assert any(env_matches(p, env) for p in b.env)


@settings(max_examples=1000)
@given(grants(), grants(), st.sampled_from(PROBE_IPS), st.sampled_from(PROBE_NAMES),
       st.sampled_from(PROBE_PATHS))
def test_random_pairs_in_the_order_are_sound(a: Grants, b: Grants, ip: str,
                                             names: tuple[str, ...], path: str) -> None:
    if a.is_subset_of(b):
        if check_connect(a, ip, 443, names).allowed:
            assert check_connect(b, ip, 443, names).allowed
        if check_path(a, path, True).allowed:
            assert check_path(b, path, True).allowed


# --- path confinement ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def maze() -> Iterator[Path]:
    """root/{a/, f, a/f} and outside/{c/, f, c/f}; every dir also holds links ``in`` ->
    root/a, ``out`` -> outside/c and ``back`` -> ``..``, so most walks exist for real."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(os.path.realpath(tmp))
        root, outside = base / "deep" / "root", base / "outside"
        dirs = [root, root / "a", outside, outside / "c", base / "deep"]
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        for d in dirs:
            (d / "f").write_text(str(d))
            (d / "in").symlink_to(root / "a")
            (d / "out").symlink_to(outside / "c")
            (d / "back").symlink_to("..")
        yield root


@settings(max_examples=300, suppress_health_check=[HealthCheck.filter_too_much])
@given(steps=st.lists(st.sampled_from(["..", ".", "in", "out", "back", "a", ""]), max_size=7))
def test_path_judged_inside_exactly_when_the_kernel_lands_inside(maze: Path, steps: list[str]) -> None:
    path = str(maze) + "/" + "/".join(steps) + "/f"
    try:
        landed = os.stat(path)
    except OSError:
        assume(False)
        return
    inside = {(s.st_dev, s.st_ino) for s in (os.stat(maze / "f"), os.stat(maze / "a" / "f"))}
    judged = check_path(Grants(fs=(FsRule(str(maze), False),)), path, False).allowed
    assert judged == ((landed.st_dev, landed.st_ino) in inside), path


@given(depth=st.integers(0, 6), ups=st.integers(0, 9),
       tail=st.lists(st.sampled_from(["x", "y", "z"]), min_size=1, max_size=3))
def test_dotdot_never_escapes_a_root(tmp_path_factory: pytest.TempPathFactory, depth: int, ups: int,
                                     tail: list[str]) -> None:
    root = "/nonexistent-failcore-root/r"
    path = root + "/d" * depth + "/.." * ups + "/" + "/".join(tail)
    really_inside = ups <= depth
    g = Grants(fs_root=root, default="allow")
    assert check_path(g, path, True).allowed == really_inside, path


@pytest.mark.parametrize("small_blocks, big_blocks", [(True, True), (True, False), (False, False)])
def test_rule_order_is_sound_for_every_pair_of_hosts(small_blocks: bool, big_blocks: bool) -> None:
    """Exhaustive over HOSTS: whenever one rule is within another, every probe the first
    allows, the second allows (the containment rule and ``public`` included)."""
    within = 0
    for a in HOSTS:
        for b in HOSTS:
            small = Grants(net=(NetRule(a),), block_ranges=small_blocks)
            big = Grants(net=(NetRule(b),), block_ranges=big_blocks)
            if not small.is_subset_of(big):
                continue
            within += 1
            for ip in PROBE_IPS:
                for names in PROBE_NAMES:
                    if check_connect(small, ip, 443, names).allowed:
                        assert check_connect(big, ip, 443, names).allowed, (a, b, ip, names)
    assert within > len(HOSTS)  # not only the reflexive pairs


@pytest.mark.parametrize("inner, outer, blocks, expected", [
    ("public@0.0.0.0/0", "public", True, True),
    ("8.8.8.0/24", "public", False, True),
    ("10.0.0.0/7", "public", True, True),     # under net_safe it covers only 11.0.0.0/8
    ("10.0.0.0/7", "public", False, False),   # without it, 10.0.0.0/8 as well
    ("10.1.0.0/16", "10.0.0.0/8", True, True),
    ("10.1.0.0/16", "10.0.0.0/7", True, False),  # the inner opens 10.1/16, the outer does not
    ("10.1.0.0/16", "10.0.0.0/7", False, True),
    ("public", "0.0.0.0/0", False, False),
    ("public@0.0.0.0/0", "0.0.0.0/0", True, True),
])
def test_rule_order_examples(inner: str, outer: str, blocks: bool, expected: bool) -> None:
    small = Grants(net=(NetRule(inner),), block_ranges=blocks)
    big = Grants(net=(NetRule(outer),), block_ranges=blocks)
    assert small.is_subset_of(big) == expected
