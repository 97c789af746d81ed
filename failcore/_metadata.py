"""Tool metadata: risk, side effects, default policy, capabilities, limits, isolation."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from failcore._budgets import Budget
from failcore_worker.protocol import LimitsWire


class RiskLevel(enum.StrEnum):
    LOW = "LOW"
    MEDIUM = "MEDIUM"
    HIGH = "HIGH"
    CRITICAL = "CRITICAL"


class SideEffect(enum.StrEnum):
    NONE = "NONE"
    FILESYSTEM = "FILESYSTEM"
    NETWORK = "NETWORK"
    PROCESS = "PROCESS"
    ENVIRONMENT = "ENVIRONMENT"


class DefaultPolicy(enum.StrEnum):
    """What an operation that no capability covers gets."""

    BLOCK = "BLOCK"
    WARN = "WARN"
    ALLOW = "ALLOW"


Isolation = Literal["tool", "call"]
# "none": the worker's network namespace is empty and sockets come from the parent's
# broker. "host": for clients that connect from C (libpq, gRPC's core) and so never ask
# the broker; the worker keeps the host's network, Landlock limits TCP connect to the
# granted ports, and the guards and the watchdog judge addresses. Weaker: see SECURITY.md.
Network = Literal["none", "host"]
NETWORK_MODES: tuple[str, ...] = ("none", "host")


@dataclass(frozen=True)
class Limits:
    """Per-tool limits. Set at registration only: never from a tool's arguments.

    ``timeout_s``: wall clock per call (the tree is killed). ``memory_mb``: address
    space (RLIMIT_AS) and the watchdog's RSS bound. ``cpu_s``: CPU seconds (RLIMIT_CPU,
    default: a little above the timeout). ``file_size_mb``: largest file the tool may
    write (RLIMIT_FSIZE). ``open_files``: RLIMIT_NOFILE. ``output_bytes``: largest
    result as encoded for the trip back (its JSON text plus raw bytes; the parent reads
    at most this plus a 256 KiB envelope, and decodes at most 16x that).
    ``processes``: most descendants the worker may have at once (RLIMIT_NPROC for a
    non-root worker; the watchdog kills the tree above it either way, since root
    ignores RLIMIT_NPROC).
    """

    timeout_s: float = 30.0
    memory_mb: int = 1024
    cpu_s: int | None = None
    file_size_mb: int = 64
    open_files: int = 256
    output_bytes: int = 16 * 1024 * 1024
    processes: int = 32

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_mb", "file_size_mb", "open_files", "output_bytes",
                     "processes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive number, got {value!r}")
        if self.cpu_s is not None and (not isinstance(self.cpu_s, int) or self.cpu_s <= 0):
            raise ValueError(f"Limits.cpu_s must be a positive int or None, got {self.cpu_s!r}")
        if self.memory_mb < 64:
            raise ValueError(
                f"Limits.memory_mb={self.memory_mb} is too small for a Python worker; use 64 or more"
            )

    def effective_cpu_s(self) -> int:
        return self.cpu_s if self.cpu_s is not None else int(self.timeout_s) + 2

    def to_wire(self) -> LimitsWire:
        return {
            "timeout_s": self.timeout_s,
            "memory_mb": self.memory_mb,
            "cpu_s": self.effective_cpu_s(),
            "file_size_mb": self.file_size_mb,
            "open_files": self.open_files,
            "output_bytes": self.output_bytes,
            "processes": self.processes,
        }


@dataclass(frozen=True)
class ToolMetadata:
    """What a tool is allowed to do and how it runs (SPEC section 3).

    ``budget``: limits on this tool's use across calls (``failcore.Budget``): calls,
    calls per minute, CPU and wall seconds, sums of result fields.
    """

    risk_level: RiskLevel = RiskLevel.LOW
    side_effect: SideEffect | Sequence[SideEffect] = SideEffect.NONE
    default_policy: DefaultPolicy = DefaultPolicy.BLOCK
    capabilities: Sequence[Any] = ()
    limits: Limits = field(default_factory=Limits)
    input_model: Any = None
    output_model: Any = None
    isolation: Isolation | None = None
    description: str | None = None
    secret: Sequence[str] = ()
    network: Network = "none"
    budget: Budget | None = None

    def __post_init__(self) -> None:
        if self.budget is not None and not isinstance(self.budget, Budget):
            raise ValueError(f"ToolMetadata.budget must be a failcore.Budget, got {self.budget!r}")

    @property
    def side_effects(self) -> frozenset[SideEffect]:
        if isinstance(self.side_effect, SideEffect):
            effects = {self.side_effect}
        else:
            effects = {SideEffect(e) for e in self.side_effect}
        effects.discard(SideEffect.NONE)
        return frozenset(effects)

    @property
    def effective_isolation(self) -> Isolation:
        if self.isolation is not None:
            return self.isolation
        return "call" if self.risk_level in (RiskLevel.HIGH, RiskLevel.CRITICAL) else "tool"
