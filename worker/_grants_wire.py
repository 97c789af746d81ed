"""Grants on the wire (``Grants.from_wire``) and their order (``Grants.is_subset_of``).

Private to ``failcore_worker.rules``. Tokens carry grants as JSON; a worker rebuilds them here
and refuses anything malformed or unknown rather than guessing, because grants decide
what it may do. The subset order is what lets a warm worker accept a later call's
token: rights may only shrink.
"""

from __future__ import annotations

import os
from typing import Any

from failcore_worker import _net_match, rules

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


def grants_fields(data: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ValueError(f"grants must be a dict, got {type(data).__name__}")
    unknown = set(data) - _WIRE_KEYS
    if unknown:
        raise ValueError(f"unknown grants fields: {sorted(unknown)}")
    net = []
    for item in _field(data, "net", list, []):
        if not isinstance(item, dict) or set(item) - {"host", "port_lo", "port_hi", "source"}:
            raise ValueError(f"grants net rule malformed: {item!r}")
        rule = rules.NetRule(_field(item, "host", str, None), _field(item, "port_lo", int, 0),
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
        fs.append(rules.FsRule(path, _field(item, "write", bool, None), _field(item, "source", str, "")))
    default = _field(data, "default", str, "block")
    if default not in rules._RANK:
        raise ValueError(f"grants field 'default' must be block, warn or allow, got {default!r}")
    return {
        "net": tuple(net), "fs": tuple(fs), "exec": _strings(data, "exec"),
        "env": _strings(data, "env"), "default": default,
        "block_ranges": _field(data, "block_ranges", bool, False),
        "fs_root": _field(data, "fs_root", (str, type(None)), None),
        "deny_exec": _field(data, "deny_exec", bool, False),
        "implicit_read": _strings(data, "implicit_read"),
    }


def _net_within(inner: rules.NetRule, outer: rules.NetRule, small: rules.Grants,
                big: rules.Grants) -> bool:
    if not (outer.port_lo <= inner.port_lo and inner.port_hi <= outer.port_hi):
        return False
    return _net_match.rule_within(inner.host, outer.host, small.block_ranges, big.block_ranges)


def is_subset(small: rules.Grants, big: rules.Grants) -> bool:
    return (
        all(any(_net_within(r, o, small, big) for o in big.net) for r in small.net)
        and all(any(rules.under(r.path, o.path) and (o.write or not r.write) for o in big.fs)
                for r in small.fs)
        and set(small.exec) <= set(big.exec)
        and all(any(rules.env_matches(o, e) for o in big.env) for e in small.env)
        and rules._RANK[small.default] <= rules._RANK[big.default]
        and (small.block_ranges or not big.block_ranges)
        and (small.deny_exec or not big.deny_exec)
        and (big.fs_root is None or (small.fs_root is not None
                                     and rules.under(small.fs_root, big.fs_root)))
    )
