"""``net:connect:public`` and net_safe's containment rule, in every layer that judges them.

Pure decisions only (no socket is opened here): ``test_seed_example.py`` runs the same
rules against tripwire listeners inside a network namespace.
"""

from __future__ import annotations

import ipaddress
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rules_properties import blocked_v4, v4_encoding, v6_embedding

from failcore._policy import Policy
from failcore._watchdog import connection_violation
from failcore_worker import _guard_judge
from failcore_worker._guard_judge import GuardDenied
from failcore_worker.rules import (
    Grants,
    GuardEvent,
    NetRule,
    check_address,
    check_connect,
    check_host,
    check_resolve,
    covers_address,
    is_public,
    parse_ip,
)

SUPERNETS = ["0.0.0.0/0", "::/0", "169.0.0.0/8", "10.0.0.0/7", "::ffff:0:0/96",
             "64:ff9b::/96", "2002::/16", "2001::/32", "::/3", "0.0.0.0/1", "128.0.0.0/1"]
METADATA = ipaddress.IPv4Address("169.254.169.254")
PRIVATE = ipaddress.IPv4Address("10.0.0.5")


def rule(host: str, lo: int = 0, hi: int = 65535) -> NetRule:
    return NetRule(host, lo, hi, f"net:connect:{host}")


# --- public ---------------------------------------------------------------------------

PUBLIC_ADDRESSES = ["8.8.8.8", "93.184.216.34", "140.82.112.3", "2606:4700::1111",
                    "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1",
                    "2001:0:4136:e378:8000:63bf:f7f7:f7f7"]


@pytest.mark.parametrize("block_ranges", [False, True])
@pytest.mark.parametrize("ip", PUBLIC_ADDRESSES)
def test_public_covers_public_addresses_on_any_port(ip: str, block_ranges: bool) -> None:
    g = Grants(net=(rule("public"),), block_ranges=block_ranges)
    for port in (80, 443, 5432):
        verdict = check_connect(g, ip, port)
        assert verdict.allowed and verdict.rule == "capability net:connect:public", verdict


@settings(max_examples=300)
@given(data=st.data(), ip=blocked_v4(), block_ranges=st.booleans(),
       host=st.sampled_from(["public", "public@0.0.0.0/0", "public@::/0",
                             "public@::ffff:0:0/96"]))
def test_public_never_covers_a_blocked_address_in_any_encoding(
        data: st.DataObject, ip: ipaddress.IPv4Address, block_ranges: bool, host: str) -> None:
    """Whatever the session policy: with net_safe and without (``Session()``)."""
    g = Grants(net=(rule(host),), block_ranges=block_ranges)
    for text in (data.draw(v4_encoding(ip)), data.draw(v6_embedding(ip))):
        addr = parse_ip(text)
        assert addr is not None and not is_public(addr)
        assert not check_connect(g, str(addr), 80).allowed, text
        assert not check_host(g, text if ":" not in text else f"[{text}]", 80).allowed, text


def test_public_port_and_default_messages() -> None:
    g = Grants(net=(rule("public", 443, 443),))
    assert check_connect(g, "8.8.8.8", 443).allowed
    assert not check_connect(g, "8.8.8.8", 80).allowed
    verdict = check_connect(g, "10.0.0.5", 443)
    assert verdict.rule == "default_policy=BLOCK"
    assert "covers only public addresses" in verdict.reason and "10.0.0.0/8" in verdict.reason
    safe = Grants(net=(NetRule("public", 0, 65535, "net:connect:public (default)"),),
                  block_ranges=True)
    verdict = check_connect(safe, "169.254.169.254", 80)
    assert verdict.rule.startswith("net_safe: 169.254.0.0/16")
    assert "net:connect:public (default) covers public addresses only" in verdict.reason


def test_public_and_names_at_layer_1() -> None:
    """Names pass the pre-check (the worker judges where they resolve); names that are
    internal by definition or resolve to loopback do not."""
    for block_ranges in (False, True):
        g = Grants(net=(rule("public"),), block_ranges=block_ranges)
        ok = check_host(g, "api.github.com", 443)
        assert ok.allowed and "covers only if it is public" in ok.reason
        for host in ("localhost", "metadata.google.internal", "printer.local", "1.2.3.4.5"):
            assert not check_host(g, host, 80).allowed, (host, block_ranges)


def test_public_beside_a_named_host() -> None:
    g = Grants(net=(rule("public", 443, 443), rule("db.internal", 5432, 5432)))
    assert check_connect(g, "10.0.0.7", 5432, ["db.internal"]).allowed  # named: unchanged
    assert not check_connect(g, "10.0.0.7", 5432).allowed
    assert not check_connect(g, "10.0.0.7", 443, ["db.internal"]).allowed
    assert check_connect(g, "140.82.112.3", 443, ["api.github.com"]).allowed


def test_resolve_is_allowed_for_public() -> None:
    g = Grants(net=(rule("public"),), block_ranges=True)
    assert check_resolve(g, "api.github.com", 443).allowed
    assert not check_resolve(g, "metadata.google.internal", 80).allowed
    assert not check_resolve(g, "169.254.169.254", 80).allowed
    assert not check_resolve(Grants(net=(rule("api.github.com"),)), "example.com", 443).allowed
    assert not check_resolve(Grants(), "example.com", 443).allowed
    assert check_resolve(Grants(net=(rule("10.0.0.0/8"),)), "example.com", 443).allowed


# --- is_public against ipaddress.is_global ---------------------------------------------------

def _embedding(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """(form, IPv4 host) for the IPv6 forms that carry an IPv4 address, by RFC layout."""
    n = int(ip)
    low = ipaddress.IPv4Address(n & 0xFFFFFFFF)
    forms = {0xFFFF: "mapped", 0x64FF9B << 64: "nat64", 0: "compatible", 0xFFFF << 16: "siit"}
    if n >> 32 in forms and n > 1:
        return forms[n >> 32], low
    if n >> 112 == 0x2002:
        return "6to4", ipaddress.IPv4Address((n >> 80) & 0xFFFFFFFF)
    if n >> 96 == 0x20010000:
        return "teredo", ipaddress.IPv4Address(~n & 0xFFFFFFFF)
    if n >> 80 == 0x64FF9B0001:
        return "nat64-local", low
    return None


def deliberate_difference(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``is_public`` may disagree with ``ipaddress``'s ``is_global`` for ``ip``.

    The stdlib's tables differ between Python versions and answer "may this address
    appear on the internet"; ``is_public`` answers "may a tool with the public-internet
    grant connect there", so it is stricter about ranges no public service lives in and
    looks through IPv6 forms that deliver to (or through a relay for) an IPv4 host.
    """
    if ip.is_multicast:
        return "multicast: no TCP service lives there"
    if isinstance(ip, ipaddress.IPv4Address):
        if ip in ipaddress.IPv4Network("192.0.0.0/24") or \
                ip in ipaddress.IPv4Network("192.88.99.0/24"):
            return "IETF assignments and the deprecated 6to4 relay anycast: all blocked"
        return None
    found = _embedding(ip)
    if found is not None:
        form, inner = found
        if form in ("compatible", "siit", "nat64-local"):
            return None if is_public(ip) else "deprecated or local-use embedding: always blocked"
        if is_public(ip) == is_public(inner):
            return f"{form} form judged by its IPv4 host {inner} (looked through)"
        return None
    if int(ip) >> 125 != 1:
        return "IPv6 outside global unicast 2000::/3 is unallocated: blocked"
    if any(ip in ipaddress.IPv6Network(c) for c in ("3fff::/20", "5f00::/16", "2001:20::/28",
                                                   "2001:10::/28", "2001::/23")):
        return "newer IANA entries (documentation 3fff::/20, SRv6, ORCHIDv2) or 2001::/23"
    return None


@st.composite
def interesting_addresses(draw: st.DrawFn) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    kind = draw(st.sampled_from(["any", "v4", "blocked", "embedded", "v6-global"]))
    if kind == "any":
        return draw(st.ip_addresses())
    if kind == "v4":
        return draw(st.ip_addresses(v=4))
    if kind == "blocked":
        return draw(blocked_v4())
    if kind == "v6-global":
        return ipaddress.IPv6Address((1 << 125) | draw(st.integers(0, 2**125 - 1)))
    v4 = draw(st.one_of(blocked_v4(), st.ip_addresses(v=4)))
    text = draw(v6_embedding(cast(ipaddress.IPv4Address, v4)))
    return ipaddress.IPv6Address(text)


@settings(max_examples=2000)
@given(interesting_addresses())
def test_is_public_agrees_with_is_global_but_for_documented_differences(
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    if is_public(ip) != ip.is_global:
        assert deliberate_difference(ip) is not None, (ip, is_public(ip), ip.is_global)
    found = _embedding(ip) if isinstance(ip, ipaddress.IPv6Address) else None
    if found is not None and found[0] in ("mapped", "nat64", "6to4", "teredo"):
        assert is_public(ip) == is_public(found[1]), ip  # exactly as public as its host


# --- containment ----------------------------------------------------------------------

@settings(max_examples=400)
@given(data=st.data(), supernet=st.sampled_from(SUPERNETS),
       target=st.sampled_from([METADATA, PRIVATE]))
def test_a_supernet_grant_never_opens_a_blocked_range_under_net_safe(
        data: st.DataObject, supernet: str, target: ipaddress.IPv4Address) -> None:
    g = Grants(net=(rule(supernet),), block_ranges=True)
    for text in (str(target), data.draw(v4_encoding(target)), data.draw(v6_embedding(target))):
        addr = parse_ip(text)
        assert addr is not None
        verdict = check_connect(g, str(addr), 80)
        assert not verdict.allowed and verdict.rule.startswith("net_safe"), (supernet, text)
        assert not check_host(g, f"[{text}]" if ":" in text else text, 80).allowed


@pytest.mark.parametrize("supernet, public_inside", [
    ("0.0.0.0/0", "8.8.8.8"), ("::/0", "2606:4700::1111"), ("169.0.0.0/8", "169.1.2.3"),
    ("10.0.0.0/7", "11.0.0.1"), ("::ffff:0:0/96", "::ffff:8.8.8.8"),
    ("2002::/16", "2002:808:808::1"),
])
def test_a_supernet_still_covers_its_public_part(supernet: str, public_inside: str) -> None:
    g = Grants(net=(rule(supernet),), block_ranges=True)
    assert check_connect(g, public_inside, 443).allowed
    message = check_connect(g, "10.0.0.5" if ":" not in supernet else "::ffff:10.0.0.5", 80)
    if not message.allowed and "contains it" in message.reason:
        assert f"net:connect:{supernet}" in message.reason


@pytest.mark.parametrize("grant, target", [
    ("127.0.0.1", "127.0.0.1"), ("10.1.2.0/24", "10.1.2.3"), ("::1", "::1"),
    ("localhost", "127.0.0.1"), ("localhost", "::1"), ("169.254.169.254", "169.254.169.254"),
    ("169.254.169.254", "::ffff:169.254.169.254"), ("169.254.169.254", "64:ff9b::a9fe:a9fe"),
    ("::ffff:10.1.2.0/120", "10.1.2.3"), ("::ffff:10.1.2.0/120", "::ffff:10.1.2.3"),
    ("2002:a9fe:a9fe::/48", "2002:a9fe:a9fe::1"), ("fc00::/7", "fc00::1"),
    ("fd00:ec2::254", "fd00:ec2::254"), ("0.0.0.0/8", "0.1.2.3"),
])
def test_a_grant_inside_a_blocked_range_opens_it(grant: str, target: str) -> None:
    g = Grants(net=(rule(grant),), block_ranges=True)
    assert check_connect(g, target, 8080).allowed, (grant, target)


def test_containment_is_net_safe_only_and_public_is_always_public() -> None:
    """Without net_safe a CIDR covers what it contains (as written); public does not."""
    for ip in ("10.0.0.5", "169.254.169.254", "::ffff:169.254.169.254"):
        addr = parse_ip(ip)
        assert addr is not None
        assert covers_address("0.0.0.0/0" if ":" not in ip else "::/0", addr, False)
        assert not covers_address("0.0.0.0/0" if ":" not in ip else "::/0", addr, True)
        assert not covers_address("public", addr, False)
    assert not covers_address("fc00::/7", ipaddress.IPv6Address("fd00:ec2::254"), True)


# --- one decision, every layer ---------------------------------------------------------

LAYER_HOSTS = SUPERNETS + ["public", "public@0.0.0.0/0", "10.0.0.0/8", "10.1.2.0/24",
                           "127.0.0.1", "::1", "localhost", "169.254.169.254", "8.8.8.0/24",
                           "api.example.com", "*.example.com", "fc00::/7"]
LAYER_TARGETS = ["8.8.8.8", "10.0.0.5", "10.1.2.3", "127.0.0.1", "169.254.169.254", "::1",
                 "::ffff:169.254.169.254", "::ffff:10.1.2.3", "::ffff:8.8.8.8",
                 "64:ff9b::a9fe:a9fe", "2002:a9fe:a9fe::1", "2002:808:808::1",
                 "2001:0:4136:e378:8000:63bf:5601:5601", "fd00:ec2::254", "2606:4700::1111"]


@st.composite
def layer_grants(draw: st.DrawFn) -> Grants:
    hosts = draw(st.lists(st.sampled_from(LAYER_HOSTS), max_size=3))
    ports = draw(st.sampled_from([(0, 65535), (80, 80), (443, 443)]))
    return Grants(net=tuple(rule(h, *ports) for h in hosts),
                  default=draw(st.sampled_from(["block", "warn"])),
                  block_ranges=draw(st.booleans()))


def _worker_guard(g: Grants, ip: str, port: int) -> str:
    """The worker's connect guard, in this process (no guards installed here)."""
    saved = _guard_judge.state.grants
    _guard_judge.state.grants = g
    try:
        _guard_judge._judge_ip("net.connect", ip, port, ip)
        return _guard_judge.state.events[-1]["action"]
    except GuardDenied:
        return "block"
    finally:
        _guard_judge.state.grants = saved
        _guard_judge.state.events.clear()


@settings(max_examples=500)
@given(layer_grants(), st.sampled_from(LAYER_TARGETS), st.sampled_from([80, 443]),
       st.data())
def test_worker_precheck_watchdog_and_replay_agree(g: Grants, ip: str, port: int,
                                                   data: st.DataObject) -> None:
    worker = _worker_guard(g, ip, port)
    addr = parse_ip(ip)
    assert addr is not None
    shown = data.draw(v4_encoding(addr)) if isinstance(addr, ipaddress.IPv4Address) else f"[{ip}]"
    findings = Policy().precheck(g, {"url": f"http://{shown}:{port}/x"})
    precheck = findings[0][1].action if findings else "allow"
    event = cast(GuardEvent, {"op": "net.connect", "host": ip, "port": port, "names": []})
    replay = Policy().rejudge(event, g).action
    assert worker == precheck == replay, (g, ip, port, worker, precheck, replay)
    violation = connection_violation(g, ip, port)
    assert (violation is not None) <= (worker == "block")
    if check_address(g, ip, port) is not None:  # decided by the address alone
        assert (violation is not None) == (worker == "block"), (g, ip, port, violation)


def test_watchdog_leaves_name_grants_and_resolver_queries_alone() -> None:
    named = Grants(net=(rule("api.example.com"),))
    assert connection_violation(named, "93.184.216.34", 443) is None  # names unknown outside
    assert connection_violation(named, "10.0.0.5", 443) is None
    public = Grants(net=(rule("public"),), block_ranges=True)
    found = connection_violation(public, "169.254.169.254", 80)
    assert found is not None and "net_safe: 169.254.0.0/16" in found
    supernet = Grants(net=(rule("0.0.0.0/0"),), block_ranges=True)
    assert connection_violation(supernet, "10.0.0.5", 5432) is not None
    assert connection_violation(supernet, "8.8.8.8", 5432) is None


def test_replay_rejudges_resolutions_like_the_worker() -> None:
    names_only = Grants(net=(rule("api.example.com"),))
    event: dict[str, Any] = {"op": "net.resolve", "host": "evil.example.net", "port": 443}
    assert Policy().rejudge(cast(GuardEvent, event), names_only).action == "block"
    public = Grants(net=(rule("public"),))
    assert Policy().rejudge(cast(GuardEvent, event), public).action == "allow"
