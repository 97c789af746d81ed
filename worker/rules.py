"""Pure decision functions shared by both enforcement layers.

The parent's pre-check (layer 1) and the worker's guards (layer 3) judge with the
same code, so a URL refused before dispatch is refused for the same reason at
connect time. Nothing here does I/O except resolving paths (``os.path.realpath`` in
``check_path``, a PATH lookup in ``check_exec``); never DNS. Standard library only.
IP parsing and range tables live in ``_addresses``, what one net rule covers (``public``,
net_safe's containment rule) in ``_net_match``, the ``Grants`` type with its wire format
and subset order in ``grants`` (re-exported here). One home per decision: the worker's
guards, the parent's pre-check, the socket broker, the watchdog and replay all call these.

INTERFACE CONTRACT (other modules code against these names; keep them stable):
  Verdict, NetRule, FsRule, Grants, GuardEvent
  parse_ip, special_range, is_public, check_connect, check_host, check_resolve,
  check_address, check_path, check_exec, check_fork, default_verdict, env_matches, worse
  (helpers for the guards: check_resolved_path, real_path, RULE_IMPLICIT_READ, RULE_SCRATCH,
  RULE_LITERAL; for warnings: covers_address, blocked_inside, PUBLIC)
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from urllib.parse import unquote

from failcore_worker._addresses import is_public, parse_ip, special_range
from failcore_worker._net_match import (
    PUBLIC,
    blocked_inside,
    candidates,
    covers_address,
    covers_name,
    is_address_rule,
    rule_target,
)
from failcore_worker.grants import (
    SEVERITY,
    Action,
    FsRule,
    Grants,
    NetRule,
    Verdict,
    env_matches,
    under,
    worse,
)
from failcore_worker.protocol import GuardEvent

__all__ = [
    "Action", "IPAddress", "Verdict", "NetRule", "FsRule", "Grants", "GuardEvent",
    "parse_ip", "special_range", "is_public", "check_connect", "check_host", "check_resolve",
    "check_address", "check_path", "check_resolved_path", "real_path", "check_exec",
    "env_matches", "covers_address", "blocked_inside", "PUBLIC", "RULE_IMPLICIT_READ",
    "RULE_SCRATCH", "RULE_LITERAL", "SEVERITY", "under", "worse", "default_verdict",
    "check_fork",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Rules of the verdicts for the worker's own, routine file access; the guards leave
# these out of the trace so it shows what the tool did, not what the import system did.
RULE_IMPLICIT_READ = "implicit read"
RULE_SCRATCH = "scratch dir"



# --- network -------------------------------------------------------------------------

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_INTERNAL_NAMES = _LOOPBACK_NAMES | {
    "metadata", "metadata.google.internal", "instance-data", "localtest.me", "lvh.me",
}
# Names that only resolve inside a network, or to whatever address they spell
# (wildcard DNS services used to smuggle internal addresses past name filters).
_INTERNAL_SUFFIXES = (
    ".localhost", ".internal", ".local", ".localdomain", ".home.arpa", ".in-addr.arpa",
    ".ip6.arpa", ".nip.io", ".sslip.io", ".xip.io", ".localtest.me", ".lvh.me",
)
# WHATWG: a host whose last label is a number is an IPv4 address or an error.
_ENDS_NUMERIC = re.compile(r"(?:^|\.)(?:0x[0-9a-f]*|[0-9]+)\Z")
_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
_LOOPBACKS = (ipaddress.IPv4Address("127.0.0.1"), ipaddress.IPv6Address("::1"))


def _in_ports(rule: NetRule, port: int) -> bool:
    return rule.port_lo <= port <= rule.port_hi


def _cap_host(ip: IPAddress | str) -> str:
    return f"[{ip}]" if isinstance(ip, ipaddress.IPv6Address) else str(ip)


def _source(rule: NetRule) -> str:
    return rule.source or f"net:connect:{rule.host}:{rule.port_lo}-{rule.port_hi}"


def _allow(rule: NetRule, what: str) -> Verdict:
    source = _source(rule)
    return Verdict("allow", f"capability {source}", f"{what} is covered by {source}")


def default_verdict(grants: Grants, what: str, add: str) -> Verdict:
    """What an operation no capability covers gets: the tool's ``default_policy``.
    ``what`` says what was asked, ``add`` the capability that would grant it."""
    if grants.default == "allow":
        return Verdict("allow", "default_policy=ALLOW", f"{what}; allowed by the tool's default")
    rule = "default_policy=BLOCK" if grants.default == "block" else "default_policy=WARN"
    return Verdict(grants.default, rule, f"{what}; add {add}")


def _near_misses(grants: Grants, addr: IPAddress, port: int) -> list[str]:
    """Rules on this port that contain ``addr`` yet do not cover it (for messages)."""
    cands = candidates(addr)
    missed = []
    for rule in grants.net:
        kind, nets, _ = rule_target(rule.host)
        if _in_ports(rule, port) and kind == "net" and any(
                c.version == n.version and c in n for c in cands for n in nets):
            missed.append(_source(rule))
    return missed


def _public_rules(grants: Grants, port: int) -> list[NetRule]:
    return [r for r in grants.net if _in_ports(r, port) and rule_target(r.host)[0] == "public"]


def check_connect(grants: Grants, ip: str, port: int, names: Sequence[str] = ()) -> Verdict:
    """Judge a connection to the resolved address ``ip``:``port``.

    ``names`` are the host names that resolved to ``ip`` in this process; a connect to
    an address nobody resolved gets none, so name capabilities cannot cover it. With
    ``block_ranges`` a special address needs a capability naming it by an IP or a CIDR
    lying inside its range (or "localhost" for loopback): a name resolving there is
    exactly the DNS trick net_safe exists to stop, and a CIDR merely containing the
    range (``0.0.0.0/0``) covers only its public part. ``public`` covers public
    addresses only, with or without ``block_ranges``.
    """
    addr = parse_ip(ip)
    if addr is None:
        return Verdict("block", "net: invalid address",
                       f"{ip!r} is not an IP address; connections are judged on resolved addresses")
    target = f"{_cap_host(addr)}:{port}"
    for rule in grants.net:
        if _in_ports(rule, port) and covers_address(rule.host, addr, grants.block_ranges):
            return _allow(rule, target)
    special = special_range(addr)
    public = _public_rules(grants, port) if special is not None else []
    if special is not None and grants.block_ranges:
        cidr, label = special
        missed = _near_misses(grants, addr, port)
        note = (f"; {', '.join(missed)} contains it, but only a grant lying inside a blocked "
                "range opens it" if missed else "")
        note += f"; {_source(public[0])} covers public addresses only" if public else ""
        return Verdict(
            "block", f"net_safe: {cidr} ({label})",
            f"{target} is in {cidr} ({label}), which net_safe blocks whatever name led "
            f"there{note}; to allow it, grant the address itself: add "
            f"net:connect:{_cap_host(addr)}:{port}")
    clean = [n.lower().rstrip(".") for n in names]
    for rule in grants.net:
        if _in_ports(rule, port) and covers_name(rule.host, clean):
            return _allow(rule, f"{target} ({', '.join(clean)})")
    shown = f"names {', '.join(clean)}" if clean else "no name resolved to it in this worker"
    if public and special is not None:
        shown += (f"; {_source(public[0])} covers only public addresses and this one is in "
                  f"{special[0]} ({special[1]})")
    return default_verdict(grants, f"no capability covers {target} ({shown})",
                    f"net:connect:{clean[0] if clean else _cap_host(addr)}:{port}")


def check_address(grants: Grants, ip: str, port: int) -> Verdict | None:
    """``check_connect`` for an observer that sees only the address (the watchdog).

    None when a name capability might have covered the connection (its names are not
    known from outside); otherwise the verdict ``check_connect`` gives with no names.
    """
    verdict = check_connect(grants, ip, port)
    if verdict.allowed or verdict.rule.startswith("net"):
        return verdict
    named = any(_in_ports(r, port) and rule_target(r.host)[0] in ("name", "suffix")
                for r in grants.net)
    return None if named else verdict


def _normalise_host(host: str) -> str:
    h = host
    for _ in range(4):  # bounded: percent-encoding may be nested
        decoded = unquote(h)
        if decoded == h:
            break
        h = decoded
    h = unicodedata.normalize("NFKC", h).translate(_DOTS).strip().lower()
    h = h.rpartition("@")[2]
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    return h.rstrip(".")


def check_host(grants: Grants, host: str, port: int) -> Verdict:
    """Layer 1: judge a host as written in a URL (before DNS).

    The host is percent-decoded, NFKC-normalised (fullwidth digits and dots are what
    IDNA turns them into), lowercased and stripped of brackets and trailing dots; an
    address in any encoding is judged like a connect to it. Names are judged by the
    capabilities only: DNS is never consulted here, the worker judges what they
    resolve to.
    """
    h = _normalise_host(host)
    ip = parse_ip(h)
    if ip is not None:
        return check_connect(grants, str(ip), port)
    if not h:
        return Verdict("block", "net: invalid host", f"{host!r} names no host")
    hp = f"{h}:{port}"
    loopback = h in _LOOPBACK_NAMES or h.endswith(".localhost")
    if loopback:  # deterministic: /etc/hosts, so a loopback grant by IP covers it
        for rule in grants.net:
            if _in_ports(rule, port) and any(
                    covers_address(rule.host, a, grants.block_ranges) for a in _LOOPBACKS):
                return _allow(rule, hp)
    exact = [r for r in grants.net if _in_ports(r, port) and rule_target(r.host) == ("name", (), h)]
    if exact:
        return _allow(exact[0], hp)
    odd = ":" in h or bool(_ENDS_NUMERIC.search(h))
    internal = loopback or h in _INTERNAL_NAMES or h.endswith(_INTERNAL_SUFFIXES)
    if grants.block_ranges:
        if odd:
            return Verdict("block", "net_safe: malformed address",
                           f"{host!r} looks like an IP address but is not a valid one; "
                           "resolvers and URL parsers disagree on such hosts, so net_safe refuses it")
        if internal:
            return Verdict("block", f"net_safe: internal name {h}",
                           f"{h} resolves to internal or arbitrary addresses; to allow it, name it "
                           f"exactly: add net:connect:{h}:{port}")
    for rule in grants.net:
        if _in_ports(rule, port) and covers_name(rule.host, (h,)):
            return _allow(rule, hp)
    public = _public_rules(grants, port)
    if public and not (odd or internal):
        source = _source(public[0])
        return Verdict("allow", f"capability {source}",
                       f"{hp} is judged on the address it resolves to, which {source} "
                       "covers only if it is public")
    note = (f" ({_source(public[0])} covers public addresses, and {h} is internal or not a "
            "valid address)" if public else "")
    return default_verdict(grants, f"no capability covers {hp}{note}", f"net:connect:{h}:{port}")


# Rule of the verdict on resolving an address literal: no query is sent, nothing to record.
RULE_LITERAL = "resolve: address literal"


def check_resolve(grants: Grants, name: str, port: int) -> Verdict:
    """Judge a DNS lookup of ``name`` (for a connection to ``port``) before it is sent.

    A lookup is a data channel of its own: the query reaches whoever serves the name.
    A tool with no net capability resolves nothing; a name net_safe refuses is refused;
    with only name rules, a name no rule covers can never be connected to, so it is not
    looked up. With an address rule (an IP, a CIDR, ``public``, "localhost") any other
    name may resolve into it, so the lookup happens and the connect decides on the
    address. Resolving an address literal sends no query (rule ``RULE_LITERAL``) but is
    refused early where its connect would be refused by net_safe.
    """
    if parse_ip(name) is not None:
        verdict = check_host(grants, name, port)
        if verdict.action == "block" and verdict.rule.startswith("net_safe"):
            return verdict
        return Verdict("allow", RULE_LITERAL, "an address literal is judged at connect")
    if not grants.net and grants.default == "block":
        return Verdict("block", "default_policy=BLOCK",
                       f"this tool has no net capability, so DNS lookups (a data channel of "
                       f"their own) are refused; add net:connect:{name}")
    verdict = check_host(grants, name, port)
    if verdict.action == "block" and (verdict.rule.startswith("net_safe") or not any(
            is_address_rule(r.host) for r in grants.net)):
        return verdict
    return Verdict("allow", "resolve: judged at connect",
                   "names are judged on the addresses they resolve to")


# --- files ---------------------------------------------------------------------------

# Grant paths are resolved once per process and pinned: the worker warms this cache
# before tool code runs, so a symlink planted later at a granted path cannot widen it.
_resolve_base = lru_cache(maxsize=2048)(os.path.realpath)


def real_path(path: str, cwd: str | None = None, follow_symlinks: bool = True) -> str | None:
    """The path the kernel would act on (None if malformed). With ``follow_symlinks``
    False the last component is kept as is (unlink, rename and friends act on a link)."""
    if not path or "\0" in path:
        return None
    joined = path if os.path.isabs(path) else os.path.join(cwd or os.getcwd(), path)
    if follow_symlinks or joined.endswith("/"):
        return os.path.realpath(joined)
    head, tail = os.path.split(joined)
    if tail in (".", ".."):
        return os.path.realpath(joined)
    return os.path.join(os.path.realpath(head), tail)


def check_path(grants: Grants, path: str, write: bool, cwd: str | None = None,
               *, follow_symlinks: bool = True) -> Verdict:
    """Judge access to ``path`` on its realpath.

    Relative paths are joined to ``cwd`` (the per-call scratch dir, read+write) or the
    process's working directory. Symlinks, dangling ones included, are resolved as far
    as they exist, so a link out of a granted tree is judged where it points.
    """
    real = real_path(path, cwd, follow_symlinks)
    if real is None:
        return Verdict("block", "fs: invalid path", f"{path!r} is empty or contains a NUL byte")
    return check_resolved_path(grants, real, write, (cwd,) if cwd else (), shown=path)


def check_resolved_path(grants: Grants, real: str, write: bool,
                        scratch: Sequence[str] = (), shown: str = "") -> Verdict:
    """``check_path`` for a path already resolved, with any number of scratch dirs."""
    if not write and any(under(real, _resolve_base(d)) for d in grants.implicit_read):
        return Verdict("allow", RULE_IMPLICIT_READ, f"{real} is in a directory every worker reads")
    if any(under(real, _resolve_base(d)) for d in scratch):
        return Verdict("allow", RULE_SCRATCH, f"{real} is in this call's scratch directory")
    verb, cap = ("writing", "write") if write else ("reading", "read")
    what = real if not shown or shown == real else f"{real} (from {shown})"
    if grants.fs_root is not None and not under(real, _resolve_base(grants.fs_root)):
        return Verdict("block", f"fs_safe: outside {grants.fs_root}",
                       f"{verb} {what} is outside the fs_safe root {grants.fs_root}; "
                       "move it under the root or widen fs_safe(root=...)")
    read_only: FsRule | None = None
    for rule in grants.fs:
        if under(real, _resolve_base(rule.path)):
            if rule.write or not write:
                source = rule.source or f"fs:{'write' if rule.write else 'read'}:{rule.path}"
                return Verdict("allow", f"capability {source}", f"{verb} {what} is covered by {source}")
            read_only = rule
    if read_only is not None:
        return default_verdict(grants, f"{read_only.source or 'fs:read:' + read_only.path} does not grant "
                        f"writing {what}", f"fs:write:{real}")
    return default_verdict(grants, f"no capability covers {verb} {what}",
                    f"fs:{cap}:{real} (or a directory above it)")


# --- processes and environment -----------------------------------------------------------


def _resolve_program(program: str) -> str | None:
    if "/" not in program:
        found = shutil.which(program)
        if found is None:
            return None
        program = found
    return os.path.realpath(program)


def check_exec(grants: Grants, program: str) -> Verdict:
    """Judge running ``program`` as a subprocess.

    A bare name is looked up on PATH; both sides are compared on their realpath, so a
    symlink to a granted binary is that binary and a same-named file elsewhere is not.
    """
    if grants.deny_exec:
        return Verdict("block", "strict: exec denied",
                       f"running {program!r} is refused: strict() denies every subprocess")
    resolved = _resolve_program(program) if program else None
    for granted in grants.exec:
        same = ("/" not in program and program == granted) or (
            resolved is not None and resolved == _resolve_program(granted))
        if same:
            return Verdict("allow", f"capability proc:exec:{granted}",
                           f"{program} is covered by proc:exec:{granted}")
    shown = program if resolved in (None, program) else f"{program} ({resolved})"
    return default_verdict(grants, f"no capability covers running {shown}",
                           f"proc:exec:{resolved or program}")


def check_fork(grants: Grants) -> Verdict:
    """Judge a bare ``fork``: only a tool that may run programs may fork."""
    if grants.deny_exec:
        return Verdict("block", "strict: exec denied", "strict() denies fork and every subprocess")
    if grants.exec:
        return Verdict("allow", "fork: exec granted", "the tool may run subprocesses")
    return default_verdict(grants, "no capability covers fork (only proc:exec grants may fork)",
                           "proc:exec:PROGRAM for the program the child runs")


