"""Warnings about net grants that contain a range net_safe blocks.

Under net_safe a grant opens a blocked range only when it lies inside it; one that
merely contains it (``0.0.0.0/0``, ``::/0``, ``10.0.0.0/7``) covers only its public
part (``failcore_worker._net_match``). A user who wrote ``0.0.0.0/0`` to mean "anything"
should hear that from ``failcore policy check`` (allow entries) and ``failcore replay
--policy`` (the capabilities a recorded run granted), not from a refused connection.
Warnings never fail a check: the grant is valid, it just does not mean what it says.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from failcore._capabilities import NetConnect, display_host, parse_capability
from failcore._errors import FailCoreError
from failcore_worker.rules import blocked_inside

__all__ = ["containment_warning", "policy_warnings", "trace_grant_warnings"]

_SHOWN = 4


def containment_warning(cap: NetConnect, block_ranges: bool, where: str) -> str | None:
    """One line about ``cap`` when it contains blocked ranges, else None."""
    ranges = blocked_inside(cap.host)
    if not ranges:
        return None
    listed = ", ".join(f"{cidr} ({label})" for cidr, label in ranges[:_SHOWN])
    if len(ranges) > _SHOWN:
        listed += f" and {len(ranges) - _SHOWN} more"
    host = display_host(cap.host)
    inside = next((c for c, label in ranges if "private" in label),
                  next((c for c, _ in ranges if "/" in c and " " not in c), ranges[0][0]))
    if block_ranges:
        return (f"{where} {cap} contains ranges net_safe blocks ({listed}); under net_safe "
                f"it reaches only the public part of {host}: to reach one of them, grant an "
                f"address or block inside it (e.g. net:connect:{display_host(inside)})")
    return (f"{where} {cap} contains ranges net_safe would block ({listed}), and this "
            "policy does not block them (block_ranges is off), so a tool holding it reaches "
            f"them; add block_ranges = true, or grant net:connect:public@{host} for its "
            "public part only")


def _warnings(caps: Iterable[object], block_ranges: bool, where: str) -> list[str]:
    found = []
    for cap in caps:
        if isinstance(cap, NetConnect):
            line = containment_warning(cap, block_ranges, where)
            if line is not None:
                found.append(line)
    return found


def policy_warnings(policy: Any, label: str) -> list[str]:
    """Warnings about a policy's allow entries (``failcore policy check``).

    An allow entry is a pattern: a tool's grant inside a blocked range that the entry
    contains (``10.1.2.0/24`` under ``allow = ["net:connect:0.0.0.0/0"]``) is still
    granted and opens that range, so the entry is worth a second look either way.
    """
    allow = getattr(policy, "allow", None) or ()
    return _warnings(allow, bool(getattr(policy, "block_ranges", False)),
                     f"{label}: allow entry")


def trace_grant_warnings(records: Sequence[Mapping[str, Any]], policy: Any) -> list[str]:
    """Warnings about the capabilities tools held in a recorded run, under ``policy``
    (``failcore replay --policy``): what the run granted may mean less (or more) there."""
    found: list[str] = []
    seen: set[tuple[str, str]] = set()
    for rec in records:
        body = rec.get("body")
        if rec.get("kind") != "tool.register" or not isinstance(body, Mapping):
            continue
        tool = str(body.get("tool", "?"))
        for text in body.get("capabilities") or []:
            if (tool, str(text)) in seen:
                continue
            seen.add((tool, str(text)))
            try:
                cap = parse_capability(str(text))
            except FailCoreError:
                continue
            found += _warnings((cap,), bool(getattr(policy, "block_ranges", False)),
                               f"tool {tool}: recorded grant")
    return found
