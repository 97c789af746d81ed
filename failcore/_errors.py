"""The one error hierarchy of FailCore, all importable from ``failcore``.

Every message says what was refused, which rule refused it, and what to change::

    FailCoreError
    ├── SecurityError            a policy, the scanner or the approver refused (.rule, .target, .layer)
    ├── ValidationError
    │   ├── InputValidationError     arguments refused before any worker was touched
    │   └── OutputValidationError    the result does not match its model or limits
    ├── ToolTimeout              past timeout_s; the worker's tree was killed
    ├── CallCancelled            the awaiting acall was cancelled; the tree was killed
    ├── BudgetExceeded           a budget is spent; refused before dispatch (.budget, .limit, .used)
    ├── ResourceLimitExceeded    memory, CPU, file size, output size, process count
    ├── WorkerCrashed            the worker died without answering
    ├── ToolFailed               the tool raised (.remote_type, .remote_message, .remote_traceback)
    ├── ConfinementUnavailable   confinement="require" and a kernel layer is not in force
    │   └── ConfinementRefused       a guarded MCP server could not be confined as required; not run
    ├── ReplayMismatch           a replayed session diverged from its trace
    ├── RegistrationError        metadata broke an invariant
    │   └── CapabilityError          a capability string does not parse (also a ValueError)
    ├── PolicyError              a policy file or preset is malformed (also a ValueError)
    ├── TraceError               a trace file is malformed, tampered with or unreadable
    └── MissingExtra             an optional integration's extra is not installed (also an ImportError)
"""

from __future__ import annotations


class FailCoreError(Exception):
    """Root of every error FailCore raises."""


class SecurityError(FailCoreError):
    """A policy denied an operation, before dispatch (layer 1) or inside the worker (layers 3-4).

    ``rule`` names the rule that denied; ``target`` is what was refused (a URL, an
    address, a path, a program).
    """

    def __init__(self, message: str, *, rule: str = "", target: str = "", layer: str = "") -> None:
        super().__init__(message)
        self.rule = rule
        self.target = target
        self.layer = layer


class ValidationError(FailCoreError):
    """Input or output did not match the tool's schema."""

    def __init__(self, message: str, *, errors: list[dict[str, object]] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


class InputValidationError(ValidationError):
    """Arguments were refused before any worker was touched."""


class OutputValidationError(ValidationError):
    """The tool returned a value that does not match its output model or limits."""


class ToolTimeout(FailCoreError):
    """The tool ran past ``Limits.timeout_s``; its whole process tree was killed."""


class CallCancelled(FailCoreError):
    """The caller cancelled the call (an ``acall`` task was cancelled); the worker's tree
    was killed so the tool does not run on unobserved."""


class BudgetExceeded(FailCoreError):
    """A budget (calls, calls per minute, CPU or wall seconds, a result field's sum) is
    spent; the call was refused before dispatch. ``budget`` names it ("session.calls",
    "tool:search.sum:usage.tokens"), ``limit`` and ``used`` are its numbers."""

    def __init__(self, message: str, *, budget: str = "", limit: float | None = None,
                 used: float | None = None, state: list[dict[str, object]] | None = None) -> None:
        super().__init__(message)
        self.budget = budget
        self.limit = limit
        self.used = used
        self.state = state or []


class ResourceLimitExceeded(FailCoreError):
    """The tool hit a resource limit (memory, CPU, file size, open files, output size)."""


class WorkerCrashed(FailCoreError):
    """The worker process died without answering (signal, ``os._exit``, segfault)."""


class ToolFailed(FailCoreError):
    """The tool raised. Carries the remote exception type, message and traceback text."""

    def __init__(self, message: str, *, remote_type: str = "", remote_message: str = "",
                 remote_traceback: str = "") -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback


class ConfinementUnavailable(FailCoreError):
    """``Session(confinement="require")`` and a kernel layer (Landlock, its TCP or scope
    rules, the empty network namespace, dropped capabilities, no_new_privs) is not in
    force on this machine; the message names each and why."""


class ReplayMismatch(FailCoreError):
    """A replayed session diverged from the recorded trace."""


class RegistrationError(FailCoreError):
    """A tool's registration broke a metadata invariant (SPEC section 3)."""


class CapabilityError(RegistrationError, ValueError):
    """A capability string does not parse."""


class PolicyError(FailCoreError, ValueError):
    """A policy file or preset is malformed."""


class MissingExtra(FailCoreError, ImportError):
    """An integration's optional dependency is not installed; the message names the extra
    (``pip install 'failcore[mcp]'``)."""


class ConfinementRefused(ConfinementUnavailable):
    """``failcore mcp guard`` could not start the server confined as its policy requires
    (a kernel layer missing, the launcher refused): nothing was run. The message names
    the layer and why."""


class TraceError(FailCoreError):
    """A trace file is malformed, tampered with or unreadable."""
