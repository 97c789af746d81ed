"""FailCore: an execution-time safety runtime for the tools AI agents call.

Every tool runs in a locked-down worker process; the parent validates inputs and
outputs, mints a capability token per call, enforces limits, and writes a hash-chained
trace of everything that crossed the boundary. Defense in depth, not an OS sandbox:
see SECURITY.md for what each layer stops and what gets around it.
"""

from __future__ import annotations

__version__ = "0.2.0"

from failcore import presets
from failcore._approval import ApprovalDecision, ApprovalRequest
from failcore._budgets import Budget
from failcore._capabilities import (
    Capability,
    Env,
    FsRead,
    FsWrite,
    NetConnect,
    ProcExec,
    parse_capability,
)
from failcore._confinement import Confinement
from failcore._errors import (
    BudgetExceeded,
    CallCancelled,
    CapabilityError,
    ConfinementRefused,
    ConfinementUnavailable,
    FailCoreError,
    InputValidationError,
    MissingExtra,
    OutputValidationError,
    PolicyError,
    RegistrationError,
    ReplayMismatch,
    ResourceLimitExceeded,
    SecurityError,
    ToolFailed,
    ToolTimeout,
    TraceError,
    ValidationError,
    WorkerCrashed,
)
from failcore._metadata import DefaultPolicy, Limits, RiskLevel, SideEffect, ToolMetadata
from failcore._policy import Policy, load_policy
from failcore._recording import call_context
from failcore._scan import Scan
from failcore._scan_rules import EntropyRule
from failcore._session import Session
from failcore._validation import Secret

__all__ = [
    "ApprovalDecision",
    "ApprovalRequest",
    "Budget",
    "BudgetExceeded",
    "CallCancelled",
    "Capability",
    "CapabilityError",
    "Confinement",
    "ConfinementRefused",
    "ConfinementUnavailable",
    "DefaultPolicy",
    "EntropyRule",
    "Env",
    "FailCoreError",
    "FsRead",
    "FsWrite",
    "InputValidationError",
    "Limits",
    "MissingExtra",
    "NetConnect",
    "OutputValidationError",
    "Policy",
    "PolicyError",
    "ProcExec",
    "RegistrationError",
    "ReplayMismatch",
    "ResourceLimitExceeded",
    "RiskLevel",
    "Scan",
    "Secret",
    "SecurityError",
    "Session",
    "SideEffect",
    "ToolFailed",
    "ToolMetadata",
    "ToolTimeout",
    "TraceError",
    "ValidationError",
    "WorkerCrashed",
    "__version__",
    "call_context",
    "load_policy",
    "parse_capability",
    "presets",
]
