"""What a worker may do: ``Grants`` (and the ``Verdict`` a decision returns), their wire form
and their order.

Tokens carry grants as JSON; a worker rebuilds them with ``Grants.from_wire`` and refuses
anything malformed or unknown rather than guessing, because grants decide what it may do.
``Grants.is_subset_of`` is the order that lets a warm worker accept a later call's token:
rights only shrink. The decisions themselves live in ``failcore_worker.rules``, which
re-exports these names. Standard library only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from failcore_worker import _net_match

Action = Literal["allow", "warn", "block"]

# How severe a verdict is: the worse of two verdicts has the higher number, and a tool's
# default_policy is narrower than another's when it is at least as severe.
SEVERITY: dict[str, int] = {"allow": 0, "warn": 1, "block": 2}


@dataclass(frozen=True)
class Verdict:
    """One decision. ``rule`` names the rule that decided, ``reason`` says what to change."""

    action: Action
    rule: str
    reason: str

    @property
    def allowed(self) -> bool:
        return self.action != "block"


@dataclass(frozen=True)
class NetRule:
    """One ``net:connect:HOST[:PORT]`` grant. ``host``: lowercase DNS name, ``*.suffix``,
    an IP literal, a CIDR, ``public`` (globally routable addresses) or ``public@CIDR``
    (the public part of a block). ``source``: the capability string, naming the rule."""

    host: str
    port_lo: int = 0
    port_hi: int = 65535
    source: str = ""


@dataclass(frozen=True)
class FsRule:
    """One ``fs:read:PATH`` / ``fs:write:PATH`` grant; ``path`` is absolute and normalised."""

    path: str
    write: bool
    source: str = ""


@dataclass(frozen=True)
class Grants:
    """Everything a worker may do for one call (or, for a warm worker, at most).

    ``default``: what an operation no capability covers gets. ``block_ranges``: the
    net_safe rule (special IP ranges refused unless a NetRule lying inside the range
    names it by IP or CIDR; a rule merely containing one covers only its public part).
    ``fs_root``: fs_safe confinement. ``deny_exec``: strict(): no subprocess at all.
    ``implicit_read``: directories the worker may always read (stdlib, site-packages,
    DNS/TLS configuration), filled in by the worker at lock-down.
    """

    net: tuple[NetRule, ...] = ()
    fs: tuple[FsRule, ...] = ()
    exec: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    default: Action = "block"
    block_ranges: bool = False
    fs_root: str | None = None
    deny_exec: bool = False
    implicit_read: tuple[str, ...] = field(default=(), compare=False)

    def to_wire(self) -> dict[str, Any]:
        """A plain, JSON-serialisable dict (used in tokens and the trace)."""
        return {
            "net": [{"host": r.host, "port_lo": r.port_lo, "port_hi": r.port_hi,
                     "source": r.source} for r in self.net],
            "fs": [{"path": r.path, "write": r.write, "source": r.source} for r in self.fs],
            "exec": list(self.exec),
            "env": list(self.env),
            "default": self.default,
            "block_ranges": self.block_ranges,
            "fs_root": self.fs_root,
            "deny_exec": self.deny_exec,
            "implicit_read": list(self.implicit_read),
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Grants:
        """The inverse of ``to_wire``. Raises ValueError on anything malformed or unknown:
        grants decide what a worker may do, so nothing is guessed."""
        return cls(**_grants_fields(data))

    def is_subset_of(self, other: Grants) -> bool:
        """True when every right in ``self`` is also in ``other`` (rights only shrink).

        ``implicit_read`` is not compared: the worker fills it in itself.
        """
        return _is_subset(self, other)


def worse(a: Verdict | None, b: Verdict) -> Verdict:
    """The more severe of two verdicts; on a tie the first (``a``), so the earlier reason stands."""
    return b if a is None or SEVERITY[b.action] > SEVERITY[a.action] else a


def under(path: str, base: str) -> bool:
    """True when ``path`` is ``base`` or below it (plain string test on resolved paths)."""
    return path == base or path.startswith(base if base.endswith("/") else base + "/")


def env_matches(pattern: str, name: str) -> bool:
    """True when ``env:PATTERN`` grants the variable ``name`` (``NAME`` or ``PREFIX_*``).

    The one home of environment-pattern matching: the worker's environment, the secret
    scrubber, the subset order and capability intersection all ask here.
    """
    return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern


_WIRE_KEYS = frozenset({"net", "fs", "exec", "env", "default", "block_ranges", "fs_root",
                        "deny_exec", "implicit_read"})


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = data.get(key, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"grants field {key!r}: expected {kind}, got {value!r}")
    return value


def _strings(data: dict[str, Any], key: str) -> tuple[str, ...]:
    items = _field(data, key, list, [])
    if not all(isinstance(i, str) for i in items):
        raise ValueError(f"grants field {key!r}: expected a list of strings, got {items!r}")
    return tuple(items)


def _grants_fields(data: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"grants must be a dict, got {type(data).__name__}")
    unknown = set(data) - _WIRE_KEYS
    if unknown:
        raise ValueError(f"unknown grants fields: {sorted(unknown)}")
    net = []
    for item in _field(data, "net", list, []):
        if not isinstance(item, dict) or set(item) - {"host", "port_lo", "port_hi", "source"}:
            raise ValueError(f"grants net rule malformed: {item!r}")
        rule = NetRule(_field(item, "host", str, None), _field(item, "port_lo", int, 0),
                       _field(item, "port_hi", int, 65535), _field(item, "source", str, ""))
        if not 0 <= rule.port_lo <= rule.port_hi <= 65535:
            raise ValueError(f"grants net rule has a bad port range: {item!r}")
        net.append(rule)
    fs = []
    for item in _field(data, "fs", list, []):
        if not isinstance(item, dict) or set(item) - {"path", "write", "source"}:
            raise ValueError(f"grants fs rule malformed: {item!r}")
        path = _field(item, "path", str, None)
        if not os.path.isabs(path):
            raise ValueError(f"grants fs rule path must be absolute: {path!r}")
        fs.append(FsRule(path, _field(item, "write", bool, None), _field(item, "source", str, "")))
    default = _field(data, "default", str, "block")
    if default not in SEVERITY:
        raise ValueError(f"grants field 'default' must be block, warn or allow, got {default!r}")
    return {
        "net": tuple(net), "fs": tuple(fs), "exec": _strings(data, "exec"),
        "env": _strings(data, "env"), "default": default,
        "block_ranges": _field(data, "block_ranges", bool, False),
        "fs_root": _field(data, "fs_root", (str, type(None)), None),
        "deny_exec": _field(data, "deny_exec", bool, False),
        "implicit_read": _strings(data, "implicit_read"),
    }


def _net_within(inner: NetRule, outer: NetRule, small: Grants,
                big: Grants) -> bool:
    if not (outer.port_lo <= inner.port_lo and inner.port_hi <= outer.port_hi):
        return False
    return _net_match.rule_within(inner.host, outer.host, small.block_ranges, big.block_ranges)


def _is_subset(small: Grants, big: Grants) -> bool:
    return (
        all(any(_net_within(r, o, small, big) for o in big.net) for r in small.net)
        and all(any(under(r.path, o.path) and (o.write or not r.write) for o in big.fs)
                for r in small.fs)
        and set(small.exec) <= set(big.exec)
        and all(any(env_matches(o, e) for o in big.env) for e in small.env)
        and SEVERITY[small.default] >= SEVERITY[big.default]
        and (small.block_ranges or not big.block_ranges)
        and (small.deny_exec or not big.deny_exec)
        and (big.fs_root is None or (small.fs_root is not None
                                     and under(small.fs_root, big.fs_root)))
    )
