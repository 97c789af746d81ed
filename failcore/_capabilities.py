"""The capability vocabulary (SPEC section 4): parse, print, compare, convert.

A capability is written as a string (``net:connect:api.github.com:443``) and held as a
frozen object whose ``str()`` is the canonical spelling, so ``parse_capability(str(c)) ==
c`` always holds and two spellings of the same grant compare equal. The grammar is
deliberately narrow: anything ambiguous (``127.1``, an unbracketed IPv6 address, a
relative path, ``a.*.com``) is refused with an error that quotes the input, names the
part that is wrong and shows a valid example, because a capability that means something
other than what its author thought is worse than none.

``to_rules`` converts to the ``failcore_worker.rules`` types every enforcement layer
judges with; the set algebra on capabilities (``meet``/``covers``) lives in
``_capability_meet``.

``net:connect:public[:PORT]`` is the public internet: globally routable addresses only
(see ``failcore_worker.rules.is_public``), with the name lookups that needs. The scoped
form ``net:connect:public@CIDR[:PORT]`` (the public part of a block) is what a policy's
allow list makes of ``public`` and a CIDR that mixes public and blocked addresses.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from failcore._errors import CapabilityError
from failcore._metadata import SideEffect
from failcore_worker._addresses import network_publicness
from failcore_worker.rules import PUBLIC, FsRule, NetRule

__all__ = [
    "Capability", "NetConnect", "FsRead", "FsWrite", "Env", "ProcExec",
    "parse_capability", "parse_capabilities", "to_rules", "PUBLIC", "display_host",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_EXAMPLES = {
    "net": "'net:connect:api.example.com:443' or 'net:connect:public:443'",
    "fs": "'fs:read:/srv/data'",
    "env": "'env:API_TOKEN' or 'env:AWS_*'",
    "proc": "'proc:exec:/usr/bin/git' or 'proc:exec:git'",
}
_ALL_EXAMPLES = ", ".join(_EXAMPLES.values())
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\*?")
_PROGRAM = re.compile(r"[A-Za-z0-9._+-]+")
_PORT = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class Capability:
    """Base of every capability; ``str()`` is the canonical, re-parseable form."""

    @property
    def side_effect(self) -> SideEffect:
        raise NotImplementedError


@dataclass(frozen=True)
class NetConnect(Capability):
    """``net:connect:HOST[:PORT]``. ``host`` is a lowercase DNS name, ``*.suffix``, an IP
    (IPv6 without brackets), a CIDR, ``public`` or ``public@CIDR``; ports ``0-65535``
    mean ``*``."""

    host: str
    port_lo: int = 0
    port_hi: int = 65535

    @property
    def side_effect(self) -> SideEffect:
        return SideEffect.NETWORK

    def network(self) -> Network | None:
        """The address block this host names, or None for a DNS name, wildcard or public."""
        return _network(self.host)

    def __str__(self) -> str:
        host = display_host(self.host)
        if (self.port_lo, self.port_hi) == (0, 65535):
            return f"net:connect:{host}"
        if self.port_lo == self.port_hi:
            return f"net:connect:{host}:{self.port_lo}"
        return f"net:connect:{host}:{self.port_lo}-{self.port_hi}"


@dataclass(frozen=True)
class FsRead(Capability):
    """``fs:read:PATH``: PATH (a file, or a directory and everything below it)."""

    path: str

    @property
    def side_effect(self) -> SideEffect:
        return SideEffect.FILESYSTEM

    def __str__(self) -> str:
        return f"fs:read:{self.path}"


@dataclass(frozen=True)
class FsWrite(Capability):
    """``fs:write:PATH``: create, modify and delete under PATH (implies read)."""

    path: str

    @property
    def side_effect(self) -> SideEffect:
        return SideEffect.FILESYSTEM

    def __str__(self) -> str:
        return f"fs:write:{self.path}"


@dataclass(frozen=True)
class Env(Capability):
    """``env:NAME`` or ``env:PREFIX_*``: the variable(s) passed into the worker."""

    name: str

    @property
    def side_effect(self) -> SideEffect:
        return SideEffect.ENVIRONMENT

    def __str__(self) -> str:
        return f"env:{self.name}"


@dataclass(frozen=True)
class ProcExec(Capability):
    """``proc:exec:PROGRAM``: an absolute path or a bare name looked up on PATH."""

    program: str

    @property
    def side_effect(self) -> SideEffect:
        return SideEffect.PROCESS

    def __str__(self) -> str:
        return f"proc:exec:{self.program}"


def _fail(text: str, problem: str, kind: str | None = None) -> CapabilityError:
    example = _EXAMPLES.get(kind or "", _ALL_EXAMPLES)
    return CapabilityError(f"invalid capability {text!r}: {problem}; example: {example}")


def parse_capability(text: str | Capability) -> Capability:
    """Parse one capability string (or pass a Capability through). Raises CapabilityError."""
    if isinstance(text, Capability):
        return text
    if not isinstance(text, str):
        raise CapabilityError(
            f"invalid capability {text!r}: expected a string like {_EXAMPLES['net']}, "
            f"got {type(text).__name__}"
        )
    if "\x00" in text:
        raise _fail(text, "it contains a NUL byte")
    if text != text.strip() or any(c.isspace() and c != " " for c in text):
        raise _fail(text, "it contains leading/trailing whitespace or a tab/newline; remove it")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise _fail(text, "it contains a control character")
    kind, sep, rest = text.partition(":")
    if not sep:
        raise _fail(text, "expected KIND:..., with KIND one of net, fs, env, proc")
    if kind == "net":
        action, sep, target = rest.partition(":")
        if action != "connect" or not sep:
            raise _fail(text, f"unknown net action {action!r} (only 'connect')", "net")
        return _parse_net(text, target)
    if kind == "fs":
        action, sep, path = rest.partition(":")
        if action not in ("read", "write") or not sep:
            raise _fail(text, f"unknown fs action {action!r} (use 'read' or 'write')", "fs")
        norm = _abs_path(text, path, "PATH", "fs")
        return FsRead(norm) if action == "read" else FsWrite(norm)
    if kind == "env":
        if not _ENV.fullmatch(rest):
            raise _fail(
                text, f"NAME {rest!r} must be a variable name, optionally ending in '*'", "env"
            )
        return Env(rest)
    if kind == "proc":
        action, sep, program = rest.partition(":")
        if action != "exec" or not sep:
            raise _fail(text, f"unknown proc action {action!r} (only 'exec')", "proc")
        if "/" in program:
            return ProcExec(_abs_path(text, program, "PROGRAM", "proc"))
        if not _PROGRAM.fullmatch(program) or program in (".", ".."):
            raise _fail(text, f"PROGRAM {program!r} must be an absolute path or a bare name", "proc")
        return ProcExec(program)
    raise _fail(text, f"unknown kind {kind!r} (use net, fs, env or proc)")


def parse_capabilities(items: Iterable[str | Capability]) -> tuple[Capability, ...]:
    """Parse several capabilities, dropping exact duplicates and keeping the order."""
    if isinstance(items, str):
        raise CapabilityError(
            f"capabilities must be a list of strings, got the single string {items!r}; "
            f"write [{items!r}]"
        )
    seen: dict[Capability, None] = {}
    for item in items:
        seen.setdefault(parse_capability(item), None)
    return tuple(seen)


def _abs_path(text: str, path: str, part: str, kind: str) -> str:
    if not path:
        raise _fail(text, f"{part} is empty", kind)
    if path.startswith("~"):
        raise _fail(text, f"{part} {path!r} starts with '~', which is not expanded; "
                    "write the absolute path", kind)
    if not path.startswith("/"):
        raise _fail(text, f"{part} {path!r} is relative; capabilities need an absolute path", kind)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _fail(text, f"{part} {path!r} contains '..'; write the path it means", kind)
    return "/" + "/".join(parts)


def _network(host: str) -> Network | None:
    try:
        return ipaddress.ip_network(host, strict=True)
    except ValueError:
        return None


def display_host(host: str) -> str:
    """A rule host as written in a capability: IPv6 bracketed, ``public@`` kept."""
    if host.startswith(PUBLIC + "@"):
        return f"{PUBLIC}@{display_host(host[len(PUBLIC) + 1:])}"
    net = _network(host)
    if net is None or net.version == 4:
        return host
    addr = str(net.network_address)
    single = net.prefixlen == net.max_prefixlen and "/" not in host
    return f"[{addr}]" if single else f"[{addr}]/{net.prefixlen}"


def public_host(scope: Network | None) -> str | None:
    """The canonical host for the public part of ``scope`` (all of it when None): a
    plain CIDR when the block is all public, None when it holds no public address."""
    if scope is None:
        return PUBLIC
    how = network_publicness(scope)
    if how == "none":
        return None
    host = str(scope.network_address) if scope.num_addresses == 1 else str(scope)
    return host if how == "all" else f"{PUBLIC}@{host}"


def _parse_public(text: str, after: str) -> NetConnect:
    """``public`` followed by ``after``: nothing, ``:PORT`` or ``@CIDR[:PORT]``."""
    if not after.startswith("@"):
        if after == ":":
            raise _fail(text, "PORT after ':' is empty", "net")
        lo, hi = _parse_port(text, after[1:] if after else "*")
        return NetConnect(PUBLIC, lo, hi)
    scoped = _parse_net(text, after[1:])
    scope = _network(scoped.host)
    if scope is None:
        raise _fail(text, f"'public@' takes an IP or a CIDR (public@0.0.0.0/0), "
                    f"not {after[1:]!r}", "net")
    host = public_host(scope)
    if host is None:
        raise _fail(text, f"{display_host(scoped.host)} holds no public address, so "
                    "'public@' of it grants nothing; name the block itself to reach it", "net")
    return NetConnect(host, scoped.port_lo, scoped.port_hi)


def _parse_net(text: str, target: str) -> NetConnect:
    if not target:
        raise _fail(text, "HOST is empty", "net")
    word = target[:len(PUBLIC)].lower()
    if word == PUBLIC and target[len(PUBLIC):len(PUBLIC) + 1] in ("", ":", "@"):
        return _parse_public(text, target[len(PUBLIC):])
    if target.startswith("["):
        end = target.find("]")
        if end < 0:
            raise _fail(text, "'[' without a closing ']' in HOST", "net")
        inner, rest = target[1:end], target[end + 1:]
        prefix = ""
        if rest.startswith("/"):
            prefix, colon, rest = rest[1:].partition(":")
            rest = colon + rest
        if rest and not rest.startswith(":"):
            raise _fail(text, f"unexpected {rest!r} after ']'", "net")
        host = _parse_ipv6(text, inner, prefix)
        port_text = rest[1:] if rest else "*"
        if rest and not port_text:
            raise _fail(text, "PORT after ':' is empty", "net")
    else:
        if target.count(":") > 1:
            raise _fail(text, "IPv6 addresses must be bracketed, e.g. 'net:connect:[::1]:8080'",
                        "net")
        host_text, sep, port_text = target.partition(":")
        if sep and not port_text:
            raise _fail(text, "PORT after ':' is empty", "net")
        host = _parse_host(text, host_text)
        port_text = port_text if sep else "*"
    lo, hi = _parse_port(text, port_text)
    return NetConnect(host, lo, hi)


def _parse_ipv6(text: str, inner: str, prefix: str) -> str:
    if "%" in inner:
        raise _fail(text, f"zone ids are not allowed in HOST [{inner}]", "net")
    try:
        addr = ipaddress.IPv6Address(inner)
    except ValueError:
        raise _fail(text, f"HOST [{inner}] is not an IPv6 address", "net") from None
    if not prefix:
        return str(addr)
    return str(_parse_cidr(text, f"{addr}/{prefix}", f"[{inner}]/{prefix}"))


def _parse_cidr(text: str, cidr: str, shown: str) -> Network:
    if not re.fullmatch(r"[0-9]{1,3}", cidr.rpartition("/")[2]):
        raise _fail(text, f"CIDR {shown!r} has a bad prefix length", "net")
    try:
        return ipaddress.ip_network(cidr, strict=True)
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise _fail(text, f"CIDR {shown!r} is not valid ({e})", "net") from None
        raise _fail(text, f"CIDR {shown!r} has host bits set; did you mean {loose}?",
                    "net") from None


def _parse_host(text: str, host: str) -> str:
    if not host:
        raise _fail(text, "HOST is empty", "net")
    host = host.lower()
    if "/" in host:
        return str(_parse_cidr(text, host, host))
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    if host.endswith("."):
        host = host[:-1]
    labels = host.split(".")
    wildcard = labels[0] == "*"
    if wildcard:
        labels = labels[1:]
        if not labels:
            raise _fail(text, "HOST '*' would grant every host, internal ones included; name a "
                        "domain as '*.example.com', or write 'public' for every public address",
                        "net")
    for label in labels:
        if "*" in label:
            raise _fail(text, f"wildcard in the middle of HOST {host!r}; only a leading '*.' "
                        "is allowed", "net")
        if not _LABEL.fullmatch(label):
            raise _fail(text, f"HOST {host!r} is not a valid DNS name (bad label {label!r})",
                        "net")
    if len(host) > 253:
        raise _fail(text, "HOST is longer than 253 characters", "net")
    if not wildcard and _is_inet_aton(host):
        raise _fail(text, f"HOST {host!r} is an IPv4 address in a non-standard form; "
                    "write it as a dotted quad like 127.0.0.1", "net")
    if labels[-1].isdigit() or labels[-1].startswith("0x"):
        raise _fail(text, f"HOST {host!r} looks like a malformed IPv4 address", "net")
    return "*." + ".".join(labels) if wildcard else host


def _is_inet_aton(host: str) -> bool:
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


def _parse_port(text: str, port: str) -> tuple[int, int]:
    if port == "*":
        return 0, 65535
    lo_text, sep, hi_text = port.partition("-")
    if not _PORT.fullmatch(lo_text) or (sep and not _PORT.fullmatch(hi_text)):
        raise _fail(text, f"PORT {port!r} must be a number, a range 'a-b' or '*'", "net")
    lo = int(lo_text)
    hi = int(hi_text) if sep else lo
    for value in (lo, hi):
        if not 1 <= value <= 65535:
            raise _fail(text, f"PORT {value} is out of range 1-65535", "net")
    if lo > hi:
        raise _fail(text, f"PORT range {port!r} is backwards ({lo} > {hi})", "net")
    return lo, hi


def to_rules(
    caps: Iterable[str | Capability], defaults: Collection[Capability] = (),
) -> tuple[tuple[NetRule, ...], tuple[FsRule, ...], tuple[str, ...], tuple[str, ...]]:
    """Convert to ``(net rules, fs rules, exec programs, env names)`` for ``failcore_worker.rules.Grants``.

    A net capability in ``defaults`` (a side effect's default, not declared by the tool)
    is marked in its rule's source, ``net:connect:public (default)``, so the token and
    every verdict it decides say so.

    Filesystem paths are resolved with ``os.path.realpath`` here, at conversion time, so
    a grant names the real directory the worker will see (symlinks followed once, by the
    parent, not re-followed by the tool later).
    """
    net: dict[NetRule, None] = {}
    fs: dict[FsRule, None] = {}
    exe: dict[str, None] = {}
    env: dict[str, None] = {}
    for cap in parse_capabilities(caps):
        if isinstance(cap, NetConnect):
            source = f"{cap} (default)" if cap in defaults else str(cap)
            net.setdefault(NetRule(cap.host, cap.port_lo, cap.port_hi, source=source), None)
        elif isinstance(cap, FsRead | FsWrite):
            rule = FsRule(os.path.realpath(cap.path), isinstance(cap, FsWrite), source=str(cap))
            fs.setdefault(rule, None)
        elif isinstance(cap, ProcExec):
            exe.setdefault(cap.program, None)
        elif isinstance(cap, Env):
            env.setdefault(cap.name, None)
    return tuple(net), tuple(fs), tuple(exe), tuple(env)
