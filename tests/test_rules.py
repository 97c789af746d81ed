"""failcore_worker.rules: the pure decision functions both enforcement layers judge with."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
from pathlib import Path

import pytest

from failcore_worker.rules import (
    FsRule,
    Grants,
    NetRule,
    Verdict,
    check_connect,
    check_exec,
    check_host,
    check_path,
    env_matches,
    parse_ip,
    special_range,
)

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


# --- parse_ip -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1", V4("127.0.0.1")),
    ("127.1", V4("127.0.0.1")),
    ("10.1.1", V4("10.1.0.1")),
    ("2130706433", V4("127.0.0.1")),
    ("0x7f000001", V4("127.0.0.1")),
    ("0X7F000001", V4("127.0.0.1")),
    ("0x7f.0.0.1", V4("127.0.0.1")),
    ("0x7f.1", V4("127.0.0.1")),
    ("0177.0.0.1", V4("127.0.0.1")),
    ("017700000001", V4("127.0.0.1")),
    ("0177.0x0.0.01", V4("127.0.0.1")),
    ("0x00000000000000007f000001", V4("127.0.0.1")),
    ("127.0.0.1.", V4("127.0.0.1")),
    (" 127.0.0.1 ", V4("127.0.0.1")),
    ("0", V4("0.0.0.0")),
    ("0x", V4("0.0.0.0")),
    ("169.254.43518", V4("169.254.169.254")),
    ("[::1]", V6("::1")),
    ("::1", V6("::1")),
    ("fe80::1%eth0", V6("fe80::1")),
    ("[fe80::1%25eth0]", V6("fe80::1")),
    ("::ffff:127.0.0.1", V6("::ffff:7f00:1")),
    ("::ffff:7f00:1", V6("::ffff:7f00:1")),
    ("[::ffff:169.254.169.254]", V6("::ffff:a9fe:a9fe")),
])
def test_parse_ip_accepts_every_resolver_form(text: str, expected: object) -> None:
    assert parse_ip(text) == expected


@pytest.mark.parametrize("text", [
    "example.com", "localhost", "", ".", "1.2.3.4.5", "256.0.0.1", "08.0.0.1", "0x1g.0.0.1",
    "1..1", "4294967296", "127.0.0.1x", "::g", "[127.0.0.1", "١٢٧.٠.٠.١", "127.0.0.1..",
    "9" * 5000,
])
def test_parse_ip_refuses_names_and_garbage(text: str) -> None:
    assert parse_ip(text) is None


# --- special_range ------------------------------------------------------------------------

@pytest.mark.parametrize("text, cidr, word", [
    ("127.0.0.1", "127.0.0.0/8", "loopback"),
    ("10.2.3.4", "10.0.0.0/8", "private"),
    ("172.31.255.255", "172.16.0.0/12", "private"),
    ("192.168.1.1", "192.168.0.0/16", "private"),
    ("169.254.169.254", "169.254.0.0/16", "cloud metadata"),
    ("100.100.100.200", "100.64.0.0/10", "CGNAT"),
    ("224.0.0.1", "224.0.0.0/4", "multicast"),
    ("240.1.2.3", "240.0.0.0/4", "reserved"),
    ("255.255.255.255", "255.255.255.255/32", "broadcast"),
    ("0.0.0.0", "0.0.0.0/32", "unspecified"),
    ("0.1.2.3", "0.0.0.0/8", "this network"),
    ("198.19.0.1", "198.18.0.0/15", "benchmarking"),
    ("192.0.2.1", "192.0.2.0/24", "documentation"),
    ("198.51.100.7", "198.51.100.0/24", "documentation"),
    ("203.0.113.9", "203.0.113.0/24", "documentation"),
    ("192.0.0.192", "192.0.0.0/24", "IETF"),
    ("192.88.99.1", "192.88.99.0/24", "6to4 relay"),
    ("::1", "::1/128", "loopback"),
    ("::", "::/128", "unspecified"),
    ("fc00::1", "fc00::/7", "unique local"),
    ("fd00:ec2::254", "fd00:ec2::/32", "metadata"),
    ("fe80::1", "fe80::/10", "link-local"),
    ("fec0::1", "fec0::/10", "site-local"),
    ("ff02::1", "ff00::/8", "multicast"),
    ("2001:db8::1", "2001:db8::/32", "documentation"),
    ("100::1", "100::/64", "discard"),
    ("4000::1", "4000::/3", "reserved"),
    # embedded IPv4, classified as the IPv4 it reaches
    ("::ffff:169.254.169.254", "169.254.0.0/16", "IPv4-mapped"),
    ("::ffff:7f00:1", "127.0.0.0/8", "IPv4-mapped"),
    ("::10.0.0.1", "10.0.0.0/8", "IPv4-compatible"),
    ("64:ff9b::a9fe:a9fe", "169.254.0.0/16", "NAT64"),
    ("64:ff9b:1:a9fe:a9:fe00::", "169.254.0.0/16", "NAT64"),
    ("64:ff9b:1::a9fe:a9fe", "169.254.0.0/16", "NAT64"),
    ("2002:a9fe:a9fe::1", "169.254.0.0/16", "6to4"),
    ("2002:7f00:1::", "127.0.0.0/8", "6to4"),
    ("2001:0:4136:e378:8000:63bf:5601:5601", "169.254.0.0/16", "Teredo"),
    ("::ffff:0:a9fe:a9fe", "169.254.0.0/16", "IPv4-translated"),
    # special whatever they embed
    ("::8.8.8.8", "::/96", "IPv4-compatible"),
    ("64:ff9b:1:808:8:800::", "64:ff9b:1::/48", "NAT64 local-use"),
])
def test_special_range(text: str, cidr: str, word: str) -> None:
    ip = parse_ip(text)
    assert ip is not None
    found = special_range(ip)
    assert found is not None and found[0] == cidr and word in found[1], found


def test_link_local_label_names_cloud_metadata() -> None:
    found = special_range(V4("169.254.169.254"))
    assert found == ("169.254.0.0/16", "link-local (cloud metadata)")
    mapped = special_range(V6("::ffff:a9fe:a9fe"))
    assert mapped is not None and "IPv4-mapped" in mapped[1] and "cloud metadata" in mapped[1]


@pytest.mark.parametrize("text", [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8",
    "64:ff9b::8.8.8.8", "2002:808:808::1", "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
])
def test_public_addresses_are_not_special(text: str) -> None:
    ip = parse_ip(text)
    assert ip is not None and special_range(ip) is None


# --- check_connect ------------------------------------------------------------------------

SAFE = Grants(block_ranges=True)


def rule(host: str, lo: int = 0, hi: int = 65535) -> NetRule:
    return NetRule(host, lo, hi, source=f"net:connect:{host}:{lo}-{hi}")


def test_connect_special_range_blocked_with_actionable_reason() -> None:
    v = check_connect(SAFE, "169.254.169.254", 80)
    assert v == Verdict("block", "net_safe: 169.254.0.0/16 (link-local (cloud metadata))", v.reason)
    assert "add net:connect:169.254.169.254:80" in v.reason


def test_connect_special_allowed_only_by_ip_rule() -> None:
    by_name = Grants(net=(rule("metadata.evil.com"),), block_ranges=True)
    assert check_connect(by_name, "169.254.169.254", 80, ["metadata.evil.com"]).action == "block"
    wildcard = Grants(net=(rule("*"),), block_ranges=True)
    assert check_connect(wildcard, "10.0.0.1", 80).action == "block"
    by_ip = Grants(net=(rule("10.0.0.5", 5432, 5432),), block_ranges=True)
    assert check_connect(by_ip, "10.0.0.5", 5432).action == "allow"
    assert check_connect(by_ip, "10.0.0.5", 5433).action == "block"
    assert check_connect(by_ip, "10.0.0.6", 5432).action == "block"
    by_cidr = Grants(net=(rule("10.0.0.0/24"),), block_ranges=True)
    assert check_connect(by_cidr, "10.0.0.77", 1).action == "allow"
    assert check_connect(by_cidr, "::ffff:10.0.0.77", 1).action == "allow"  # embedded v4
    assert check_connect(by_cidr, "64:ff9b::a00:4d", 1).action == "allow"
    assert check_connect(by_cidr, "10.0.1.1", 1).action == "block"


def test_connect_localhost_rule_covers_loopback() -> None:
    g = Grants(net=(rule("localhost", 8000, 8000),), block_ranges=True)
    assert check_connect(g, "127.0.0.1", 8000).allowed
    assert check_connect(g, "::1", 8000).allowed
    assert check_connect(g, "::ffff:127.0.0.1", 8000).allowed
    assert not check_connect(g, "127.0.0.1", 8001).allowed
    assert not check_connect(g, "10.0.0.1", 8000).allowed


def test_connect_mapped_rule_covers_plain_v4() -> None:
    g = Grants(net=(rule("::ffff:127.0.0.1"),), block_ranges=True)
    assert check_connect(g, "127.0.0.1", 1).allowed


def test_connect_relays_do_not_borrow_the_v4_grant() -> None:
    # A 6to4 or Teredo address reaches a relay, not the IPv4 host: no borrowed grant.
    g = Grants(net=(rule("8.8.8.8"),))
    assert check_connect(g, "8.8.8.8", 53).allowed
    assert check_connect(g, "::ffff:8.8.8.8", 53).allowed
    assert not check_connect(g, "2002:808:808::1", 53).allowed


def test_connect_names() -> None:
    g = Grants(net=(rule("api.example.com", 443, 443), rule("*.cdn.example.net")))
    assert check_connect(g, "93.184.216.34", 443, ["API.Example.COM."]).rule.startswith("capability")
    assert not check_connect(g, "93.184.216.34", 80, ["api.example.com"]).allowed
    assert not check_connect(g, "93.184.216.34", 443).allowed  # nobody resolved it
    assert check_connect(g, "1.2.3.4", 1, ["a.b.cdn.example.net"]).allowed
    assert not check_connect(g, "1.2.3.4", 1, ["cdn.example.net"]).allowed  # apex
    assert not check_connect(g, "1.2.3.4", 1, ["evilcdn.example.net"]).allowed


def test_connect_dns_name_cannot_reach_special_range_under_net_safe() -> None:
    g = Grants(net=(rule("api.example.com"),), block_ranges=True)
    v = check_connect(g, "127.0.0.1", 443, ["api.example.com"])
    assert v.action == "block" and v.rule.startswith("net_safe: 127.0.0.0/8")


def test_connect_defaults() -> None:
    v = check_connect(Grants(), "93.184.216.34", 443, ["example.com"])
    assert v.action == "block" and v.rule == "default_policy=BLOCK"
    assert "add net:connect:example.com:443" in v.reason
    assert check_connect(Grants(default="warn"), "1.2.3.4", 1).action == "warn"
    assert check_connect(Grants(default="allow"), "1.2.3.4", 1).action == "allow"
    # net_safe still wins over an ALLOW default
    assert check_connect(Grants(default="allow", block_ranges=True), "10.0.0.1", 1).action == "block"
    v6 = check_connect(Grants(), "2606:4700::1", 443)
    assert "net:connect:[2606:4700::1]:443" in v6.reason


def test_connect_invalid_address() -> None:
    assert check_connect(Grants(default="allow"), "example.com", 80).action == "block"


# --- check_host ---------------------------------------------------------------------------

def test_host_ip_encodings_judged_like_connect() -> None:
    for host in ("0x7f000001", "2130706433", "127.1", "[::ffff:127.0.0.1]", "%31%32%37.0.0.1",
                 "127.0.0.1."):
        v = check_host(SAFE, host, 80)
        assert v.action == "block" and v.rule.startswith("net_safe: 127.0.0.0/8"), host


@pytest.mark.parametrize("host", [
    "localhost", "LOCALHOST.", "foo.localhost", "metadata.google.internal", "metadata",
    "instance-data", "db.corp.internal", "printer.local", "169.254.169.254.nip.io",
])
def test_host_internal_names_need_an_exact_capability(host: str) -> None:
    v = check_host(SAFE, host, 80)
    assert v.action == "block" and v.rule.startswith("net_safe"), v
    named = Grants(net=(rule(host.lower().rstrip(".")),), block_ranges=True)
    assert check_host(named, host, 80).allowed
    suffixed = Grants(net=(rule("*.internal"),), block_ranges=True)
    if host.endswith(".internal"):
        assert not check_host(suffixed, host, 80).allowed


def test_host_loopback_ip_grant_covers_localhost_name() -> None:
    g = Grants(net=(rule("127.0.0.1", 8080, 8080),), block_ranges=True)
    assert check_host(g, "localhost", 8080).allowed
    assert not check_host(g, "localhost", 8081).allowed


def test_host_malformed_numeric_refused_under_net_safe() -> None:
    for host in ("1.2.3.4.5", "08.0.0.1", "0x7g.1", "::zz", "a.b.0x10"):
        v = check_host(SAFE, host, 80)
        assert v.action == "block" and v.rule == "net_safe: malformed address", host


def test_host_names_and_default() -> None:
    g = Grants(net=(rule("api.example.com", 443, 443), rule("*.example.org")))
    assert check_host(g, "API.example.com", 443).allowed
    assert check_host(g, "api.example.com.", 443).allowed
    assert not check_host(g, "api.example.com", 80).allowed
    assert check_host(g, "www.example.org", 1).allowed
    assert not check_host(g, "example.org", 1).allowed
    assert not check_host(g, "good@evil.com", 443).allowed
    v = check_host(g, "evil.com", 443)
    assert v.rule == "default_policy=BLOCK" and "add net:connect:evil.com:443" in v.reason
    assert check_host(Grants(), "", 80).action == "block"


def test_host_fullwidth_forms_are_normalised() -> None:
    assert check_host(SAFE, "１２７。０。０。１", 80).rule.startswith("net_safe: 127.0.0.0/8")
    assert check_host(SAFE, "ｌｏｃａｌｈｏｓｔ", 80).rule.startswith("net_safe: internal")


# --- check_path ---------------------------------------------------------------------------

@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "sub" / "f.txt").write_text("x")
    (tmp_path / "out").mkdir()
    (tmp_path / "secret").write_text("s")
    (tmp_path / "data" / "esc").symlink_to(tmp_path / "secret")
    (tmp_path / "data" / "dangling").symlink_to(tmp_path / "nowhere" / "file")
    (tmp_path / "scratch").mkdir()
    return tmp_path


def fs_grants(root: Path, **kw: object) -> Grants:
    rules = (FsRule(str(root / "data"), False, f"fs:read:{root / 'data'}"),
             FsRule(str(root / "out"), True, f"fs:write:{root / 'out'}"))
    return Grants(fs=rules, **kw)  # type: ignore[arg-type]


def test_path_rules(tree: Path) -> None:
    g = fs_grants(tree)
    assert check_path(g, str(tree / "data/sub/f.txt"), False).rule == f"capability fs:read:{tree / 'data'}"
    v = check_path(g, str(tree / "data/sub/f.txt"), True)
    assert v.action == "block" and "does not grant writing" in v.reason and "fs:write:" in v.reason
    assert check_path(g, str(tree / "out/new.txt"), True).allowed
    assert check_path(g, str(tree / "out/new.txt"), False).allowed  # write implies read
    v = check_path(g, str(tree / "secret"), False)
    assert v.rule == "default_policy=BLOCK" and f"add fs:read:{tree / 'secret'}" in v.reason


def test_path_symlinks_dotdot_and_relative(tree: Path) -> None:
    g = fs_grants(tree)
    assert not check_path(g, str(tree / "data/esc"), False).allowed
    assert not check_path(g, str(tree / "data/dangling"), True).allowed
    assert not check_path(g, str(tree / "data/../secret"), False).allowed
    assert not check_path(g, str(tree / "data/nonexistent/../../secret"), False).allowed
    assert check_path(g, "sub/f.txt", False, cwd=str(tree / "data")).allowed
    assert not check_path(g, "../secret", False, cwd=str(tree / "data")).allowed


def test_path_scratch_and_implicit(tree: Path) -> None:
    g = fs_grants(tree, implicit_read=(str(tree / "secret"),))
    scratch = str(tree / "scratch")
    assert check_path(g, "a/b/c.txt", True, cwd=scratch).rule == "scratch dir"
    assert check_path(g, str(tree / "secret"), False).rule == "implicit read"
    assert not check_path(g, str(tree / "secret"), True).allowed


def test_path_fs_root(tree: Path) -> None:
    g = fs_grants(tree, fs_root=str(tree / "data"), default="allow",
                  implicit_read=(str(tree / "secret"),))
    assert check_path(g, str(tree / "data/sub/f.txt"), False).allowed
    v = check_path(g, str(tree / "out/x"), True)
    assert v.action == "block" and v.rule == f"fs_safe: outside {tree / 'data'}"
    assert check_path(g, str(tree / "secret"), False).allowed  # implicit read
    assert check_path(g, "x", True, cwd=str(tree / "scratch")).allowed  # scratch
    assert check_path(g, str(tree / "data/new"), True).action == "allow"  # default inside


def test_path_nofollow_judges_the_link_itself(tree: Path) -> None:
    g = fs_grants(tree)
    (tree / "out" / "link").symlink_to(tree / "secret")
    assert not check_path(g, str(tree / "out/link"), True).allowed
    assert check_path(g, str(tree / "out/link"), True, follow_symlinks=False).allowed


def test_path_invalid() -> None:
    assert check_path(Grants(default="allow"), "a\0b", False).action == "block"
    assert check_path(Grants(default="allow"), "", False).action == "block"


# --- check_exec ---------------------------------------------------------------------------

def test_exec(tmp_path: Path) -> None:
    true = shutil.which("true")
    assert true is not None
    g = Grants(exec=(true,))
    assert check_exec(g, "true").allowed
    assert check_exec(g, os.path.realpath(true)).allowed
    link = tmp_path / "t"
    link.symlink_to(true)
    assert check_exec(g, str(link)).allowed  # same binary
    fake = tmp_path / "true"
    fake.write_text("#!/bin/sh\n")
    assert not check_exec(g, str(fake)).allowed  # same name, other file
    v = check_exec(Grants(), "true")
    assert v.rule == "default_policy=BLOCK" and "proc:exec:" in v.reason
    assert check_exec(Grants(exec=("git-nonexistent-x",)), "git-nonexistent-x").allowed
    strict = check_exec(Grants(exec=(true,), deny_exec=True), "true")
    assert strict.action == "block" and strict.rule == "strict: exec denied"


def test_env_matches() -> None:
    def allowed(name: str) -> bool:
        return any(env_matches(p, name) for p in ("API_TOKEN", "AWS_*"))

    assert allowed("API_TOKEN") and allowed("AWS_REGION")
    assert not allowed("API_TOKEN2") and not allowed("AWS") and not allowed("HOME")


# --- Grants on the wire and their order -----------------------------------------------------

FULL = Grants(
    net=(NetRule("api.example.com", 443, 443, "net:connect:api.example.com:443"),
         NetRule("10.0.0.0/8", 0, 65535, "net:connect:10.0.0.0/8")),
    fs=(FsRule("/srv/data", False, "fs:read:/srv/data"), FsRule("/srv/out", True, "fs:write:/srv/out")),
    exec=("/usr/bin/git",), env=("API_*",), default="warn", block_ranges=True,
    fs_root="/srv", deny_exec=False, implicit_read=("/usr/lib/python3",),
)


def test_wire_round_trip_is_exact() -> None:
    wire = FULL.to_wire()
    again = Grants.from_wire(json.loads(json.dumps(wire)))
    assert again == FULL and again.implicit_read == FULL.implicit_read
    assert Grants.from_wire(Grants().to_wire()) == Grants()


@pytest.mark.parametrize("patch", [
    {"bogus": 1}, {"default": "maybe"}, {"net": [{"host": "a", "port_lo": "1"}]},
    {"net": [{"host": "a", "port_lo": 9, "port_hi": 1}]}, {"fs": [{"path": "rel", "write": True}]},
    {"fs": [{"path": "/a", "write": "yes"}]}, {"exec": ["ok", 3]}, {"block_ranges": 1},
    {"fs_root": 5}, {"net": [{"host": "a", "extra": 1}]},
])
def test_from_wire_refuses_malformed(patch: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Grants.from_wire({**Grants().to_wire(), **patch})


def test_subset() -> None:
    assert FULL.is_subset_of(FULL)
    assert Grants(block_ranges=True, fs_root="/srv").is_subset_of(FULL)
    narrower = Grants(
        net=(NetRule("10.1.0.0/16", 80, 80),), fs=(FsRule("/srv/out/x", False),),
        exec=(), env=("API_KEY",), default="block", block_ranges=True, fs_root="/srv/out")
    assert narrower.is_subset_of(FULL)
    assert not FULL.is_subset_of(narrower)
    base = Grants(block_ranges=True, fs_root="/srv")
    assert not Grants(fs_root="/srv").is_subset_of(base)  # block_ranges dropped
    assert not Grants(block_ranges=True).is_subset_of(base)  # fs_root dropped
    assert not Grants(block_ranges=True, fs_root="/").is_subset_of(base)  # widened
    assert not Grants(default="allow").is_subset_of(Grants(default="warn"))
    assert not Grants().is_subset_of(Grants(deny_exec=True))
    assert not Grants(net=(NetRule("api.example.com", 1, 65535),)).is_subset_of(FULL)  # ports
    assert not Grants(fs=(FsRule("/srv/data", True),)).is_subset_of(FULL)  # read -> write
    assert not Grants(fs=(FsRule("/srv/database", False),)).is_subset_of(FULL)  # prefix trick
    assert not Grants(env=("API*",)).is_subset_of(FULL)
    wild = Grants(net=(NetRule("*.example.com"),))
    assert Grants(net=(NetRule("a.example.com"),)).is_subset_of(wild)
    assert Grants(net=(NetRule("*.b.example.com"),)).is_subset_of(wild)
    assert not Grants(net=(NetRule("example.com"),)).is_subset_of(wild)
    assert not Grants(net=(NetRule("*.example.com"),)).is_subset_of(Grants(net=(NetRule("a.example.com"),)))
    assert not Grants(net=(NetRule("10.0.0.1"),)).is_subset_of(Grants(net=(NetRule("*.example.com"),)))
