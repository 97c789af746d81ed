"""The capability grammar: parsing, canonical form, errors, set algebra, conversion."""

from __future__ import annotations

import ipaddress
import os

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from failcore._capabilities import (
    Capability,
    Env,
    FsRead,
    FsWrite,
    NetConnect,
    ProcExec,
    parse_capabilities,
    parse_capability,
    to_rules,
)
from failcore._capability_meet import covers, meet
from failcore._errors import CapabilityError, RegistrationError
from failcore._metadata import SideEffect
from failcore_worker.rules import FsRule, NetRule

VALID = [
    ("net:connect:api.github.com:443", NetConnect("api.github.com", 443, 443), None),
    ("net:connect:API.GitHub.com.:443", NetConnect("api.github.com", 443, 443),
     "net:connect:api.github.com:443"),
    ("net:connect:example.com", NetConnect("example.com", 0, 65535), None),
    ("net:connect:example.com:*", NetConnect("example.com"), "net:connect:example.com"),
    ("net:connect:*.github.com:8000-8100", NetConnect("*.github.com", 8000, 8100), None),
    ("net:connect:127.0.0.1:8080", NetConnect("127.0.0.1", 8080, 8080), None),
    ("net:connect:10.0.0.0/8", NetConnect("10.0.0.0/8"), None),
    ("net:connect:[::1]:8080", NetConnect("::1", 8080, 8080), None),
    ("net:connect:[0:0::1]", NetConnect("::1"), "net:connect:[::1]"),
    ("net:connect:[fd00::]/8:443", NetConnect("fd00::/8", 443, 443), None),
    ("net:connect:[::1]/128", NetConnect("::1/128"), None),
    ("net:connect:my_host-1.internal:1-65535", NetConnect("my_host-1.internal", 1, 65535), None),
    ("net:connect:public", NetConnect("public"), None),
    ("net:connect:PUBLIC:443", NetConnect("public", 443, 443), "net:connect:public:443"),
    ("net:connect:public@0.0.0.0/0:443", NetConnect("public@0.0.0.0/0", 443, 443), None),
    ("net:connect:public@[::]/0", NetConnect("public@::/0"), None),
    ("net:connect:public@8.8.8.0/24", NetConnect("8.8.8.0/24"), "net:connect:8.8.8.0/24"),
    ("net:connect:public.example.com", NetConnect("public.example.com"), None),
    ("fs:read:/srv/data", FsRead("/srv/data"), None),
    ("fs:read:/srv//data/./x/", FsRead("/srv/data/x"), "fs:read:/srv/data/x"),
    ("fs:write:/", FsWrite("/"), None),
    ("fs:read:/data/My Files", FsRead("/data/My Files"), None),
    ("fs:read:/a:b", FsRead("/a:b"), None),
    ("env:API_TOKEN", Env("API_TOKEN"), None),
    ("env:AWS_*", Env("AWS_*"), None),
    ("proc:exec:git", ProcExec("git"), None),
    ("proc:exec:/usr/bin/git", ProcExec("/usr/bin/git"), None),
    ("proc:exec:python3.11", ProcExec("python3.11"), None),
]


@pytest.mark.parametrize(("text", "expected", "canonical"), VALID)
def test_parse_valid(text: str, expected: Capability, canonical: str | None) -> None:
    cap = parse_capability(text)
    assert cap == expected
    assert str(cap) == (canonical or text)
    assert parse_capability(str(cap)) == cap
    assert parse_capability(cap) is cap


def test_side_effects() -> None:
    assert parse_capability("net:connect:a.com").side_effect is SideEffect.NETWORK
    assert parse_capability("fs:read:/a").side_effect is SideEffect.FILESYSTEM
    assert parse_capability("fs:write:/a").side_effect is SideEffect.FILESYSTEM
    assert parse_capability("env:A").side_effect is SideEffect.ENVIRONMENT
    assert parse_capability("proc:exec:git").side_effect is SideEffect.PROCESS


INVALID = [
    ("bogus:thing", "unknown kind 'bogus'"),
    ("nocolon", "expected KIND:"),
    ("net:listen:a.com", "unknown net action 'listen'"),
    ("fs:delete:/a", "unknown fs action 'delete'"),
    ("proc:spawn:git", "unknown proc action 'spawn'"),
    ("net:connect:", "HOST is empty"),
    ("net:connect::443", "HOST is empty"),
    ("net:connect:a.com:", "PORT after ':' is empty"),
    ("net:connect:a.com:0", "PORT 0 is out of range 1-65535"),
    ("net:connect:a.com:65536", "PORT 65536 is out of range"),
    ("net:connect:a.com:99999999", "must be a number"),
    ("net:connect:a.com:90-80", "backwards (90 > 80)"),
    ("net:connect:a.com:http", "must be a number, a range 'a-b' or '*'"),
    ("net:connect:a.com:-5", "must be a number"),
    ("net:connect:10.0.0.1/8", "host bits set; did you mean 10.0.0.0/8?"),
    ("net:connect:10.0.0.0/33", "is not valid"),
    ("net:connect:10.0.0.0/x", "bad prefix length"),
    ("net:connect:[fd00::1]/8", "host bits set"),
    ("net:connect:a.*.com", "wildcard in the middle"),
    ("net:connect:*", "or write 'public' for every public address"),
    ("net:connect:public@10.0.0.0/8", "holds no public address"),
    ("net:connect:public@example.com", "'public@' takes an IP or a CIDR"),
    ("net:connect:public:", "PORT after ':' is empty"),
    ("net:connect:public:0", "out of range"),
    ("net:connect:**.a.com", "wildcard in the middle"),
    ("net:connect:a..com", "bad label ''"),
    ("net:connect:-a.com", "bad label '-a'"),
    ("net:connect:127.1", "non-standard form"),
    ("net:connect:0x7f000001", "non-standard form"),
    ("net:connect:2130706433", "non-standard form"),
    ("net:connect:010.0.0.1", "non-standard form"),
    ("net:connect:1.2.3.4.5", "malformed IPv4"),
    ("net:connect:::1", "must be bracketed"),
    ("net:connect:[::1", "without a closing ']'"),
    ("net:connect:[nothex]", "is not an IPv6 address"),
    ("net:connect:[fe80::1%eth0]", "zone ids"),
    ("net:connect:[::1]x", "unexpected 'x'"),
    ("net:connect:bücher.de", "not a valid DNS name"),
    ("fs:read:data/x", "is relative"),
    ("fs:read:./x", "is relative"),
    ("fs:read:~/x", "not expanded"),
    ("fs:read:", "PATH is empty"),
    ("fs:read:/a/../etc", "contains '..'"),
    ("fs:read:/a\x00b", "NUL byte"),
    (" fs:read:/a", "whitespace"),
    ("fs:read:/a ", "whitespace"),
    ("fs:read:/a\tb", "whitespace"),
    ("fs:read:/a\nb", "whitespace"),
    ("env:1ABC", "must be a variable name"),
    ("env:A-B", "must be a variable name"),
    ("env:A*B", "must be a variable name"),
    ("env:*", "must be a variable name"),
    ("env:", "must be a variable name"),
    ("env:A B", "must be a variable name"),
    ("proc:exec:bin/git", "is relative"),
    ("proc:exec:", "must be an absolute path or a bare name"),
    ("proc:exec:..", "must be an absolute path or a bare name"),
    ("proc:exec:git;rm", "must be an absolute path or a bare name"),
    ("net:connect:a.com\x7f", "control character"),
]


@pytest.mark.parametrize(("text", "message"), INVALID)
def test_parse_invalid(text: str, message: str) -> None:
    with pytest.raises(CapabilityError) as info:
        parse_capability(text)
    msg = str(info.value)
    assert message in msg
    assert repr(text) in msg  # quotes the input
    assert "example: '" in msg  # shows a valid one


def test_error_is_a_registration_and_value_error() -> None:
    with pytest.raises(RegistrationError):
        parse_capability("x:y")
    with pytest.raises(ValueError):
        parse_capability("x:y")


def test_non_string_refused() -> None:
    with pytest.raises(CapabilityError, match="expected a string.*got int"):
        parse_capability(5)  # type: ignore[arg-type]


def test_net_example_matches_kind() -> None:
    with pytest.raises(CapabilityError, match="example: 'env:API_TOKEN'"):
        parse_capability("env:-")


def test_parse_capabilities_dedupes_and_refuses_a_bare_string() -> None:
    caps = parse_capabilities(["env:A", "env:A", FsRead("/x"), "fs:read:/x/"])
    assert caps == (Env("A"), FsRead("/x"))
    with pytest.raises(CapabilityError, match=r"write \['env:A'\]"):
        parse_capabilities("env:A")


def test_to_rules(tmp_path: os.PathLike[str]) -> None:
    real = os.path.join(tmp_path, "real")
    os.mkdir(real)
    link = os.path.join(tmp_path, "link")
    os.symlink(real, link)
    net, fs, exe, env = to_rules([
        "net:connect:api.github.com:443", "net:connect:[::1]", f"fs:write:{link}",
        f"fs:read:{real}", "proc:exec:git", "env:AWS_*", "env:AWS_*",
    ])
    assert net == (
        NetRule("api.github.com", 443, 443, source="net:connect:api.github.com:443"),
        NetRule("::1", 0, 65535, source="net:connect:[::1]"),
    )
    real_resolved = os.path.realpath(real)
    assert fs == (
        FsRule(real_resolved, True, source=f"fs:write:{link}"),
        FsRule(real_resolved, False, source=f"fs:read:{real}"),
    )
    assert exe == ("git",)
    assert env == ("AWS_*",)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("net:connect:*.github.com", "net:connect:api.github.com:443", "net:connect:api.github.com:443"),
        ("net:connect:*.github.com:443", "net:connect:*.api.github.com", "net:connect:*.api.github.com:443"),
        ("net:connect:*.github.com", "net:connect:github.com", None),
        ("net:connect:a.com:80-90", "net:connect:a.com:85-100", "net:connect:a.com:85-90"),
        ("net:connect:a.com:80", "net:connect:a.com:81", None),
        ("net:connect:10.0.0.0/8", "net:connect:10.1.0.0/16:22", "net:connect:10.1.0.0/16:22"),
        ("net:connect:10.0.0.0/8", "net:connect:10.0.0.5", "net:connect:10.0.0.5"),
        ("net:connect:10.0.0.0/8", "net:connect:[::1]", None),
        ("net:connect:10.0.0.0/8", "net:connect:example.com", None),
        ("fs:read:/data", "fs:write:/data/x", "fs:read:/data/x"),
        ("fs:write:/", "fs:write:/data", "fs:write:/data"),
        ("fs:read:/data", "fs:read:/database", None),
        ("env:AWS_*", "env:AWS_KEY", "env:AWS_KEY"),
        ("env:AWS_*", "env:AWS_S*", "env:AWS_S*"),
        ("env:AWS_*", "env:GCP_KEY", None),
        ("proc:exec:git", "proc:exec:git", "proc:exec:git"),
        ("proc:exec:git", "proc:exec:/usr/bin/git", None),
        ("env:A", "fs:read:/A", None),
        ("net:connect:public", "net:connect:public:443", "net:connect:public:443"),
        ("net:connect:public", "net:connect:0.0.0.0/0:443", "net:connect:public@0.0.0.0/0:443"),
        ("net:connect:public", "net:connect:[::]/0", "net:connect:public@[::]/0"),
        ("net:connect:public", "net:connect:8.8.8.0/24", "net:connect:8.8.8.0/24"),
        ("net:connect:public", "net:connect:10.0.0.0/8", None),
        ("net:connect:public", "net:connect:10.0.0.0/7", "net:connect:public@10.0.0.0/7"),
        ("net:connect:public", "net:connect:169.254.169.254", None),
        ("net:connect:public", "net:connect:api.github.com:443", None),
        ("net:connect:public", "net:connect:*.github.com", None),
        ("net:connect:public@0.0.0.0/0", "net:connect:10.0.0.0/7", "net:connect:public@10.0.0.0/7"),
        ("net:connect:public@0.0.0.0/0", "net:connect:public@10.0.0.0/7:22",
         "net:connect:public@10.0.0.0/7:22"),
        ("net:connect:public@0.0.0.0/0", "net:connect:public@[::]/0", None),
    ],
)
def test_meet(a: str, b: str, expected: str | None) -> None:
    ca, cb = parse_capability(a), parse_capability(b)
    want = None if expected is None else parse_capability(expected)
    assert meet(ca, cb) == want
    assert meet(cb, ca) == want
    assert covers(ca, cb) == (want == cb)


# -- properties ------------------------------------------------------------------------

_label = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z]", fullmatch=True)
_names = st.lists(_label, min_size=1, max_size=4).map(".".join)
_v4 = st.ip_addresses(v=4).map(str)
_v6 = st.ip_addresses(v=6).map(lambda a: f"[{a}]")


@st.composite
def _cidrs(draw: st.DrawFn) -> str:
    addr = draw(st.ip_addresses())
    prefix = draw(st.integers(0, addr.max_prefixlen))
    net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    return f"{net}" if net.version == 4 else f"[{net.network_address}]/{prefix}"


_hosts = st.one_of(_names, _names.map(lambda n: "*." + n), _v4, _v6, _cidrs())


@st.composite
def _ports(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["none", "one", "range"]))
    if kind == "none":
        return ""
    lo = draw(st.integers(1, 65535))
    if kind == "one":
        return f":{lo}"
    return f":{lo}-{draw(st.integers(lo, 65535))}"


_segment = st.from_regex(r"[A-Za-z0-9_.@+-]{1,8}", fullmatch=True).filter(
    lambda s: s not in (".", "..")
)
_paths = st.lists(_segment, min_size=0, max_size=5).map(lambda p: "/" + "/".join(p))
_capability_text = st.one_of(
    st.builds(lambda h, p: f"net:connect:{h}{p}", _hosts, _ports()),
    _paths.map(lambda p: f"fs:read:{p}"),
    _paths.map(lambda p: f"fs:write:{p}"),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}\*?", fullmatch=True).map(lambda n: f"env:{n}"),
    st.from_regex(r"[a-z][a-z0-9._+-]{0,10}", fullmatch=True).map(lambda n: f"proc:exec:{n}"),
    _paths.filter(lambda p: p != "/").map(lambda p: f"proc:exec:{p}"),
)


_net_hosts = st.sampled_from([
    "public", "public@0.0.0.0/0", "public@[::]/0", "0.0.0.0/0", "[::]/0", "10.0.0.0/7",
    "10.0.0.0/8", "169.0.0.0/8", "8.8.8.0/24", "[::ffff:0:0]/96", "[2002::]/16",
    "127.0.0.1", "api.example.com"])
_probes = st.sampled_from([
    "8.8.8.8", "10.0.0.5", "11.0.0.1", "169.254.169.254", "169.1.1.1", "127.0.0.1",
    "::ffff:8.8.8.8", "::ffff:169.254.169.254", "2606:4700::1111", "2002:a9fe:a9fe::1",
    "2002:808:808::1"])


@given(_net_hosts, _net_hosts, _probes, st.booleans())
@example("public@[::]/0", "[::ffff:0:0]/96", "8.8.8.8", False)  # ::/0 holds every mapped form
@example("[::]/0", "[::ffff:0:0]/96", "10.0.0.5", False)
def test_meet_with_public_is_exact_on_addresses(a: str, b: str, ip: str, block: bool) -> None:
    """meet(a, b) covers exactly the addresses both cover; with public involved this holds
    under net_safe too (public is public-only either way). Allow-list patterns are
    capabilities: under net_safe a grant inside a blocked range opens it even when the
    allow entry it came from (a supernet) would not, so the general case is block=False."""
    from failcore_worker.rules import covers_address, parse_ip

    ca, cb = parse_capability(f"net:connect:{a}"), parse_capability(f"net:connect:{b}")
    assert isinstance(ca, NetConnect) and isinstance(cb, NetConnect)
    block = block and "public" in a + b
    addr = parse_ip(ip)
    assert addr is not None
    both = covers_address(ca.host, addr, block) and covers_address(cb.host, addr, block)
    m = meet(ca, cb)
    got = isinstance(m, NetConnect) and covers_address(m.host, addr, block)
    assert got <= both, (a, b, ip, block, m)  # sound: never more than both grant
    families = {"6" if "[" in h else "4" for h in (a, b) if h not in ("public", "api.example.com")}
    if len(families) < 2:  # an IPv4 and an IPv6 block never meet (see _capability_meet)
        assert got == both, (a, b, ip, block, m)


@given(_capability_text)
def test_round_trip(text: str) -> None:
    cap = parse_capability(text)
    assert parse_capability(str(cap)) == cap
    assert str(parse_capability(str(cap))) == str(cap)
    assert covers(cap, cap)


@given(st.one_of(
    st.text(max_size=60),
    st.builds(lambda p, t: p + t,
              st.sampled_from(["net:connect:", "fs:read:", "fs:write:", "env:", "proc:exec:",
                               "net:connect:[", "net:connect:a.com:"]),
              st.text(max_size=40)),
))
def test_arbitrary_text_only_raises_capability_error(text: str) -> None:
    try:
        cap = parse_capability(text)
    except CapabilityError:
        return
    assert parse_capability(str(cap)) == cap
