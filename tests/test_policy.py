"""Session policies: composition, capability intersection, layer-1 pre-check, re-judging,
policy files and the presets built from the shipped files."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from failcore import presets
from failcore._capabilities import Env, FsRead, FsWrite, NetConnect, ProcExec, parse_capability
from failcore._errors import PolicyError
from failcore._metadata import DefaultPolicy
from failcore._policy import (
    CapabilityVerdict,
    Policy,
    check_policy_file,
    load_policy,
)
from failcore._precheck import MAX_DEPTH, MAX_NODES
from failcore_worker import rules
from failcore_worker.rules import Grants, Verdict

REPO = Path(__file__).resolve().parent.parent


# -- composition -----------------------------------------------------------------------


def test_compose_is_most_restrictive(tmp_path: Path) -> None:
    inner = tmp_path / "a" / "b"
    a = Policy(name="a", block_ranges=True, warn_only=True, fs_root=str(tmp_path),
               allow=(parse_capability("net:connect:*.github.com"),
                      parse_capability("fs:read:/data")),
               deny=(Env("AWS_*"),))
    b = Policy(name="b", warn_only=False, deny_exec=True, fs_root=str(inner),
               allow=(parse_capability("net:connect:api.github.com:443"),
                      parse_capability("env:HOME")),
               deny=(ProcExec("git"),))
    for c in (a.compose(b), a | b, b | a):
        assert c.block_ranges and c.deny_exec and not c.warn_only
        assert c.fs_root == os.path.realpath(inner)
        assert c.allow == (NetConnect("api.github.com", 443, 443),)
        assert set(c.deny) == {Env("AWS_*"), ProcExec("git")}
    assert (a | b).name == "a+b"
    assert (a | Policy(name="c", warn_only=True)).warn_only


def test_compose_allow_none_means_unrestricted() -> None:
    a = Policy(allow=(Env("A"),))
    assert (a | Policy()).allow == (Env("A"),)
    assert (Policy() | a).allow == (Env("A"),)
    assert (Policy() | Policy()).allow is None
    assert (a | Policy(allow=(Env("B"),))).allow == ()  # disjoint allow lists: nothing


def test_compose_refuses_disjoint_roots(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    with pytest.raises(PolicyError, match="disjoint"):
        presets.fs_safe(tmp_path / "x") | presets.fs_safe(tmp_path / "y")


def test_compose_several_and_strings_parsed() -> None:
    p = Policy(name="p", allow=["env:A*"], deny=["proc:exec:git"])  # type: ignore[arg-type]
    assert p.allow == (Env("A*"),) and p.deny == (ProcExec("git"),)
    q = Policy(name="q").compose(Policy(name="r"), Policy(name="s", deny_exec=True))
    assert q.name == "q+r+s" and q.deny_exec


def test_relative_fs_root_refused() -> None:
    with pytest.raises(PolicyError, match="must be an absolute path"):
        Policy(fs_root="data")


# -- intersect / grants ----------------------------------------------------------------


def _refusals(verdicts: tuple[Verdict, ...]) -> dict[str, str]:
    return {v.capability: v.rule for v in verdicts if isinstance(v, CapabilityVerdict)}


def test_intersect_names_each_rule(tmp_path: Path) -> None:
    policy = presets.strict(tmp_path) | Policy(
        name="lists", allow=[  # type: ignore[arg-type]
            "net:connect:*.github.com:443", "fs:read:/", "fs:write:/", "env:APP_*"],
        deny=["env:APP_SECRET"])  # type: ignore[arg-type]
    root = os.path.realpath(tmp_path)
    granted, verdicts = policy.intersect([
        "proc:exec:/usr/bin/git", f"fs:read:{root}/data", "fs:write:/etc",
        "net:connect:api.github.com:443", "net:connect:example.com:443",
        "env:APP_SECRET", "env:APP_*", "env:APP_NAME",
    ])
    assert granted == (FsRead(f"{root}/data"), NetConnect("api.github.com", 443, 443),
                       Env("APP_NAME"))
    refused = _refusals(verdicts)
    assert refused == {
        "proc:exec:/usr/bin/git": "strict: exec denied",
        "fs:write:/etc": f"fs_safe: outside {root}",
        "net:connect:example.com:443": "policy allow: net:connect:example.com:443 not allowed",
        "env:APP_SECRET": "policy deny: env:APP_SECRET",
        "env:APP_*": "policy deny: env:APP_SECRET",  # overlaps a deny: refused whole
    }
    assert all(v.action == "block" for v in verdicts)
    assert all(v.reason for v in verdicts)


def test_intersect_narrows_with_a_warning(tmp_path: Path) -> None:
    root = os.path.realpath(tmp_path)
    policy = presets.fs_safe(tmp_path) | Policy(
        name="ports", allow=["net:connect:*.github.com:443", "fs:write:/"])  # type: ignore[arg-type]
    granted, verdicts = policy.intersect(["fs:write:/", "net:connect:*.github.com"])
    assert granted == (FsWrite(root), NetConnect("*.github.com", 443, 443))
    assert [v.action for v in verdicts] == ["warn", "warn"]
    assert verdicts[0].rule == "policy narrowed: fs:write:/"


def test_warn_only_grants_everything_with_warnings() -> None:
    policy = Policy(name="audit", warn_only=True, deny_exec=True, deny=(Env("X"),))
    granted, verdicts = policy.intersect(["proc:exec:git", "env:X", "env:Y"])
    assert granted == (ProcExec("git"), Env("X"), Env("Y"))
    assert [(v.action, v.rule) for v in verdicts] == [
        ("warn", "strict: exec denied (warn_only)"), ("warn", "policy deny: env:X (warn_only)")]


def test_grants_carry_policy_rules(tmp_path: Path) -> None:
    g = presets.strict(tmp_path).grants(
        ["net:connect:api.github.com:443", "proc:exec:git", "env:HOME"], DefaultPolicy.WARN)
    assert g.default == "warn" and g.block_ranges and g.deny_exec
    assert g.fs_root == os.path.realpath(tmp_path)
    assert g.exec == () and g.env == ("HOME",)
    assert g.net == (rules.NetRule("api.github.com", 443, 443,
                                   source="net:connect:api.github.com:443"),)
    assert presets.allow_all().grants([], "allow").default == "allow"
    audit = presets.net_safe(strict=False).grants([], DefaultPolicy.BLOCK)
    assert not audit.block_ranges and audit.default == "block"
    with pytest.raises(PolicyError, match="BLOCK, WARN, ALLOW"):
        Policy().grants([], "maybe")


# -- precheck: the walk, with stand-in decision functions ------------------------------


@pytest.fixture()
def judged(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, Any]]]:
    """Replace check_host/check_path with recorders that block everything."""
    calls: list[tuple[str, Any]] = []

    def host(grants: Grants, host: str, port: int) -> Verdict:
        calls.append(("host", (host, port)))
        return Verdict("block", f"fake host {host}:{port}", "r")

    def path(grants: Grants, path: str, write: bool, cwd: str | None = None) -> Verdict:
        calls.append(("path", path))
        return Verdict("block", f"fake path {path}", "r")

    monkeypatch.setattr(rules, "check_host", host, raising=False)
    monkeypatch.setattr(rules, "check_path", path, raising=False)
    yield calls


def test_precheck_finds_targets_nested_anywhere(judged: list[tuple[str, Any]]) -> None:
    @dataclasses.dataclass
    class Job:
        target: str

    args = {
        "payload": {"urls": ["https://a.example/x", "ftp://b.example", {"deep": [("gopher://c/",)]}],
                    "note": "see http://inline.example in text", "n": 5, None: b"/etc/shadow"},
        "weird-name": {"http://key.example/": 1},
        "tags": {"ws://d.example:9000"},
        "job": Job("/etc/passwd"),
        "rel": "../../secret",
        "home": "~/.ssh/id_rsa",
        "win": "..\\..\\boot.ini",
        "plain": "hello world",
        "enc": "%2e%2e%2fetc%2fpasswd",
    }
    fs_tool = Grants(fs=(rules.FsRule("/data", False),))
    findings = dict(Policy().precheck(fs_tool, args))
    assert set(findings) == {
        "payload.urls[0]", "payload.urls[1]", "payload.urls[2].deep[0][0]", "payload[None]",
        "weird-name['http://key.example/'] (key)", "tags[0]", "job.target", "rel", "home",
        "win", "enc",
    }
    assert ("host", ("a.example", 443)) in judged
    assert ("host", ("b.example", 21)) in judged
    assert ("host", ("d.example", 9000)) in judged
    assert ("path", os.path.expanduser("~/.ssh/id_rsa")) in judged
    assert ("path", "../../boot.ini") in judged
    assert ("path", "../etc/passwd") in judged


def test_precheck_plain_paths_only_for_fs_tools(judged: list[tuple[str, Any]]) -> None:
    args = {"route": "/repos/x/y", "home": "~/x", "up": "../../admin", "u": "http://h.example/"}
    findings = dict(Policy().precheck(Grants(), args))  # a network-only tool
    assert set(findings) == {"up", "u"}
    findings = dict(presets.fs_safe("/srv").precheck(Grants(), args))
    assert set(findings) == {"route", "home", "up", "u"}


def test_precheck_url_parser_disagreements(judged: list[tuple[str, Any]]) -> None:
    Policy().precheck(Grants(), {
        "a": "http://good.example@169.254.169.254/",
        "b": "http:\\\\10.0.0.1\\x",
        "c": "https:///127.0.0.1/",
        "d": "  HTTP://Upper.Example:8080  ",
        "e": "http://[::1]:81/",
        "f": "http://169.254.169.254\\@good.example/",
        "g": "http://169.254.\n169.254/",
    })
    hosts = {h for kind, h in judged if kind == "host"}
    for expected in [("169.254.169.254", 80), ("10.0.0.1", 80), ("127.0.0.1", 443),
                     ("upper.example", 8080), ("::1", 81), ("good.example", 80)]:
        assert expected in hosts
    assert sum(1 for h in hosts if h == ("169.254.169.254", 80)) == 1


def test_precheck_malformed_url_blocked(judged: list[tuple[str, Any]]) -> None:
    findings = Policy().precheck(Grants(), {"u": "http://a.example:99999/", "v": "http://[::1/"})
    assert [(w, v.rule) for w, v in findings] == [
        ("u", "precheck: malformed URL"), ("v", "precheck: malformed URL")]


def test_precheck_unsafe_schemes_under_net_safe(judged: list[tuple[str, Any]]) -> None:
    findings = dict(presets.net_safe().precheck(Grants(), {
        "a": "file:///etc/passwd", "b": "gopher://127.0.0.1:6379/_x", "c": "dict://h:11211/"}))
    assert findings["a"].rule == "net_safe: file:// URLs are blocked"
    assert findings["b"].rule == "net_safe: gopher:// URLs are blocked"
    assert findings["c"].rule == "net_safe: dict:// URLs are blocked"
    assert judged == []  # refused on the scheme alone
    Policy().precheck(Grants(), {"a": "file:///etc/passwd", "b": "file://localhost/etc/x%20y"})
    assert judged == [("path", "/etc/passwd"), ("path", "/etc/x y")]


def test_precheck_lets_ordinary_values_through(monkeypatch: pytest.MonkeyPatch) -> None:
    def allow(*args: Any, **kwargs: Any) -> Verdict:
        return Verdict("allow", "fake", "")

    monkeypatch.setattr(rules, "check_host", allow, raising=False)
    monkeypatch.setattr(rules, "check_path", allow, raising=False)
    args = {"url": "https://api.github.com/repos", "path": "/srv/data/x", "n": [1, 2.5, None],
            "text": "a/b c:d", "mailto": "mailto:x@y.z", "urn": "urn:isbn:123", "dots": "a..b"}
    assert Policy().precheck(Grants(), args) == []


def test_precheck_depth_bound(judged: list[tuple[str, Any]]) -> None:
    deep: Any = "http://bottom.example/"
    for _ in range(MAX_DEPTH + 10):
        deep = [deep]
    findings = Policy().precheck(Grants(), {"x": deep})
    assert len(findings) == 1
    where, verdict = findings[0]
    assert verdict.action == "block" and verdict.rule == "precheck: arguments nested too deeply"
    assert where == "x" + "[0]" * (MAX_DEPTH - 1)
    assert judged == []


def test_precheck_cycle_and_node_bound(judged: list[tuple[str, Any]]) -> None:
    loop: list[Any] = []
    loop.append(loop)
    loop.append(loop)  # 2**64 paths without the bounds
    findings = Policy().precheck(Grants(), {"loop": loop})
    assert findings[-1][1].rule == "precheck: arguments too large to inspect"
    big = {"items": ["x"] * (MAX_NODES + 5)}
    findings = Policy().precheck(Grants(), big)
    assert [v.rule for _, v in findings] == ["precheck: arguments too large to inspect"]


def test_precheck_warn_only_downgrades_policy_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    def host(grants: Grants, host: str, port: int) -> Verdict:
        if grants.block_ranges:
            return Verdict("block", "net_safe: 10.0.0.0/8 (private)", "r")
        return Verdict("allow", "capability", "")

    monkeypatch.setattr(rules, "check_host", host, raising=False)
    findings = presets.net_safe(strict=False).precheck(Grants(), {"u": "http://10.0.0.1/"})
    assert [(v.action, v.rule) for _, v in findings] == [
        ("warn", "net_safe: 10.0.0.0/8 (private) (warn_only)")]
    findings = presets.net_safe(strict=True).precheck(Grants(), {"u": "http://10.0.0.1/"})
    assert [v.action for _, v in findings] == ["block"]


# -- precheck and rejudge with the real decision functions (failcore_worker.rules) --------------


def test_precheck_real_rules_block_metadata_and_allow_granted() -> None:
    policy = presets.net_safe()
    grants = policy.grants(["net:connect:api.github.com:443"], DefaultPolicy.BLOCK)
    findings = dict(policy.precheck(grants, {"req": {"urls": [
        "https://api.github.com/repos", "http://169.254.169.254/latest/meta-data/"]}}))
    assert list(findings) == ["req.urls[1]"]
    assert findings["req.urls[1]"].action == "block"
    assert findings["req.urls[1]"].rule.startswith("net_safe: 169.254.0.0/16")


def test_precheck_real_rules_fs_root(tmp_path: Path) -> None:
    (tmp_path / "ok.txt").write_text("x")
    policy = presets.fs_safe(tmp_path)
    grants = policy.grants([f"fs:read:{tmp_path}"], DefaultPolicy.BLOCK)
    findings = dict(policy.precheck(grants, {"a": str(tmp_path / "ok.txt"), "b": "/etc/passwd",
                                             "c": str(tmp_path / ".." / ".." / "etc")}))
    assert set(findings) == {"b", "c"}
    root = os.path.realpath(tmp_path)
    assert findings["b"].rule == f"fs_safe: outside {root}"


def test_rejudge_real_rules(tmp_path: Path) -> None:
    grants = Grants(default="allow")
    strict = presets.strict(tmp_path)
    assert strict.rejudge({"op": "net.connect", "host": "169.254.169.254", "port": 80},
                          grants).rule.startswith("net_safe: 169.254.0.0/16")
    assert strict.rejudge({"op": "proc.exec", "program": "/bin/sh"}, grants).rule == (
        "strict: exec denied")
    v = strict.rejudge({"op": "fs.open", "path": "/etc/passwd", "write": False}, grants)
    assert v.action == "block" and v.rule.startswith("fs_safe: outside")
    audit = presets.net_safe(strict=False)
    v = audit.rejudge({"op": "net.connect", "host": "10.0.0.1", "port": 80}, grants)
    assert v.action == "warn" and v.rule.endswith("(warn_only)")
    assert presets.allow_all().rejudge(
        {"op": "net.connect", "host": "10.0.0.1", "port": 80}, grants).action == "allow"


def test_rejudge_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, Any]] = []

    def rec(name: str) -> Any:
        def f(grants: Grants, *args: Any) -> Verdict:
            seen.append((name, args))
            return Verdict("allow", name, "")
        return f

    for name in ("check_connect", "check_host", "check_path", "check_exec"):
        monkeypatch.setattr(rules, name, rec(name), raising=False)
    monkeypatch.setattr(rules, "parse_ip", lambda t: None if "." not in t or t[0].isalpha() else t, raising=False)
    p, g = Policy(), Grants()
    p.rejudge({"op": "net.connect", "host": "10.0.0.1", "port": 80, "names": ["a"]}, g)
    p.rejudge({"op": "net.connect", "host": "internal.example", "port": 80}, g)
    p.rejudge({"op": "fs.open", "path": "/x", "write": True}, g)
    p.rejudge({"op": "fs.modify", "path": "/y"}, g)
    p.rejudge({"op": "proc.exec", "program": "git"}, g)
    assert seen == [("check_connect", ("10.0.0.1", 80, ["a"])),
                    ("check_host", ("internal.example", 80)),
                    ("check_path", ("/x", True)), ("check_path", ("/y", True)),
                    ("check_exec", ("git",))]
    kept = p.rejudge({"op": "ctypes", "action": "block", "rule": "ctypes denied",
                      "reason": "r"}, g)
    assert (kept.action, kept.rule) == ("block", "ctypes denied")


# -- policy files ----------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_load_policy_full(tmp_path: Path) -> None:
    _write(tmp_path / "base.toml", '[policy]\nblock_ranges = true\ndeny = ["env:AWS_*"]\n')
    f = _write(tmp_path / "mine.toml", f"""
[policy]
name = "mine"
description = "for tests"
fs_root = "{tmp_path}"
deny_exec = true
warn_only = false
allow = ["net:connect:*.github.com:443", "fs:read:/data"]
include = ["base.toml"]
""")
    p = load_policy(f)
    assert p.name == "mine"
    assert p.block_ranges and p.deny_exec and not p.warn_only
    assert p.fs_root == os.path.realpath(tmp_path)
    assert p.allow == (NetConnect("*.github.com", 443, 443), FsRead("/data"))
    assert p.deny == (Env("AWS_*"),)
    assert check_policy_file(f) == []
    assert load_policy(tmp_path / "base.toml").name == "base"  # defaults to the file stem


@pytest.mark.parametrize(
    ("body", "messages"),
    [
        ('[policy]\nblock_range = true\n', ["unknown key 'policy.block_range'", "keys: allow"]),
        ('[policy]\nblock_ranges = "yes"\n', ["'policy.block_ranges' must be true or false, got 'yes'"]),
        ('[policy]\nallow = "net:connect:a.com"\n', ["'policy.allow' must be a list of strings"]),
        ('[policy]\ndeny = ["env:OK", "net:connect:a.*.com"]\n',
         ["'policy.deny[1]'", "wildcard in the middle"]),
        ('[policy]\nfs_root = "data"\n', ["'policy.fs_root' must be an absolute path"]),
        ('[policy]\nname = 5\n', ["'policy.name' must be a string"]),
        ('[other]\nx = 1\n', ["unknown top-level key(s) other", "missing the [policy] table"]),
        ('[policy\n', ["not valid TOML"]),
        ('[policy]\ninclude = ["missing.toml"]\n', ["key 'policy.include'", "no such policy file"]),
        ('[policy]\nwarn_only = 1\ndeny_exec = 0\n', ["'policy.warn_only'", "'policy.deny_exec'"]),
    ],
)
def test_load_policy_errors(tmp_path: Path, body: str, messages: list[str]) -> None:
    f = _write(tmp_path / "bad.toml", body)
    with pytest.raises(PolicyError) as info:
        load_policy(f)
    for message in messages:
        assert message in str(info.value)
    assert str(f) in str(info.value)
    problems = check_policy_file(f)
    assert problems and all(str(tmp_path) in p for p in problems)


def test_include_cycle_and_disjoint_roots(tmp_path: Path) -> None:
    _write(tmp_path / "a.toml", '[policy]\ninclude = ["b.toml"]\n')
    _write(tmp_path / "b.toml", '[policy]\ninclude = ["a.toml"]\n')
    with pytest.raises(PolicyError, match="include cycle"):
        load_policy(tmp_path / "a.toml")
    _write(tmp_path / "r1.toml", '[policy]\nfs_root = "/srv/one"\n')
    _write(tmp_path / "r2.toml", '[policy]\nfs_root = "/srv/two"\ninclude = ["r1.toml"]\n')
    with pytest.raises(PolicyError, match="disjoint"):
        load_policy(tmp_path / "r2.toml")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such policy file"):
        load_policy(tmp_path / "nope.toml")


# -- the shipped files and the presets -------------------------------------------------


def _rules_of(p: Policy) -> tuple[Any, ...]:
    return (p.block_ranges, p.warn_only, p.fs_root, p.deny_exec, p.allow, p.deny)


@pytest.mark.parametrize("name", ["net_safe.toml", "fs_safe.toml", "strict.toml"])
def test_shipped_files_are_clean(name: str) -> None:
    assert check_policy_file(REPO / "policies" / name) == []
    assert "#" in (REPO / "policies" / name).read_text()  # commented for users


def test_presets_match_shipped_files(tmp_path: Path) -> None:
    shipped = REPO / "policies"
    net = load_policy(shipped / "net_safe.toml")
    assert _rules_of(presets.net_safe()) == _rules_of(net)
    assert net.block_ranges and not net.warn_only
    assert _rules_of(presets.net_safe(strict=False)) == _rules_of(
        dataclasses.replace(net, warn_only=True))
    fs = load_policy(shipped / "fs_safe.toml")
    assert _rules_of(presets.fs_safe(tmp_path)) == _rules_of(
        dataclasses.replace(fs, fs_root=str(tmp_path)))
    st = load_policy(shipped / "strict.toml")
    assert st.deny_exec and st.block_ranges and st.fs_root is None
    assert _rules_of(presets.strict()) == _rules_of(st)
    assert _rules_of(presets.strict(tmp_path)) == _rules_of(st | presets.fs_safe(tmp_path))
    assert presets.strict(tmp_path).name == f"strict(root={tmp_path})"
    assert presets.net_safe().name == "net_safe(strict=True)"
    assert _rules_of(presets.allow_all()) == (False, False, None, False, None, ())
