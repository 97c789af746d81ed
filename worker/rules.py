"""Pure decision functions shared by both enforcement layers.

The parent's pre-check (layer 1) and the worker's guards (layer 3) judge with the
same code, so a URL refused before dispatch is refused for the same reason at
connect time. Nothing here does I/O except ``os.path.realpath`` in ``check_path``.
Standard library only.

INTERFACE CONTRACT (other modules code against these names; keep them stable):
  Verdict, NetRule, FsRule, Grants, GuardEvent
  parse_ip, special_range, check_connect, check_host, check_path, check_exec, env_allowed
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Action = Literal["allow", "warn", "block"]


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
    an IP literal or a CIDR. ``source``: the capability string, used to name the rule."""

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
    net_safe rule (special IP ranges refused unless a NetRule names the address by IP or
    CIDR). ``fs_root``: fs_safe confinement. ``deny_exec``: strict(): no subprocess at all.
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
        raise NotImplementedError

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Grants:
        raise NotImplementedError

    def is_subset_of(self, other: Grants) -> bool:
        """True when every right in ``self`` is also in ``other`` (rights only shrink)."""
        raise NotImplementedError


class GuardEvent(TypedDict, total=False):
    """A guarded operation the worker saw, reported to the parent and written to the trace.

    op: "net.connect" | "net.resolve" | "net.bind" | "fs.open" | "fs.modify" | "proc.exec" | "ctypes"
    """

    op: str
    target: str
    host: str
    port: int
    names: list[str]
    path: str
    write: bool
    program: str
    action: Action
    rule: str
    reason: str


def parse_ip(text: str) -> IPAddress | None:
    """Parse ``text`` as an IP address in any form a resolver or a URL parser accepts."""
    raise NotImplementedError


def special_range(ip: IPAddress) -> tuple[str, str] | None:
    """(cidr, label) of the special range ``ip`` falls in, looking through embedded IPv4."""
    raise NotImplementedError


def check_connect(grants: Grants, ip: str, port: int, names: Sequence[str] = ()) -> Verdict:
    """Judge a connection to the resolved address ``ip``:``port``."""
    raise NotImplementedError


def check_host(grants: Grants, host: str, port: int) -> Verdict:
    """Layer 1: judge a host as written in a URL (before DNS)."""
    raise NotImplementedError


def check_path(grants: Grants, path: str, write: bool, cwd: str | None = None) -> Verdict:
    """Judge access to ``path`` on its realpath."""
    raise NotImplementedError


def check_exec(grants: Grants, program: str) -> Verdict:
    """Judge running ``program`` as a subprocess."""
    raise NotImplementedError


def env_allowed(grants: Grants, name: str) -> bool:
    """True when the variable ``name`` is granted (``env:NAME`` or ``env:PREFIX_*``)."""
    raise NotImplementedError
