"""The guardrails a Session applies around each call: scanning, budgets, approval.

The call pipeline (``Session._run``) consults this object at four points, and nothing
else about guardrails lives in the session::

    scan_arguments  before call.start is recorded (so the trace never holds a match)
    check_scan      after call.start: records the findings, refuses a "block"
    admit           after the policy pre-check: reserves the budgets, asks the approver
    settle          after the reply: charges CPU, wall time and result-field sums
    scan_result     after output validation: findings, redaction, "block"

Each step records its own trace records (``scan``, ``budget.check``, ``approval``,
``budget.charge``) and raises a ``FailCoreError`` when it refuses; ``status_of`` maps
that error to the ``call.end`` status. The decisions themselves live in
``_scan``/``_scan_rules``, ``_budgets`` and ``_approval``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from failcore._approval import ApprovalRequest, Approver
from failcore._budgets import Budget, BudgetLedger, Charge, Reservation, field_value
from failcore._errors import BudgetExceeded, FailCoreError, RegistrationError, SecurityError
from failcore._metadata import RiskLevel, ToolMetadata
from failcore._policy import Policy
from failcore._recording import current_context, scrub
from failcore._scan import Scan, ScanOutcome, new_salt, scan_value
from failcore._scan_kinds import DESCRIPTIONS

_APPROVAL_RISKS = (RiskLevel.HIGH, RiskLevel.CRITICAL)


@dataclass
class Admission:
    """A call let through ``admit``: its budget reservation (None without budgets)."""

    reservation: Reservation | None
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class _ToolGuard:
    scopes: tuple[str, ...]
    approval: tuple[str, ...]  # why approval is asked; () when it is not
    granted: tuple[str, ...]
    risk_level: str
    skip: frozenset[str]  # arguments declared secret: meant to hold one, not scanned


def status_of(err: BaseException) -> str:
    """The call.end status of an error a guardrail raised."""
    return "budget" if isinstance(err, BudgetExceeded) else "blocked"


class Guardrails:
    """One session's scanner configuration, budget ledger and approver."""

    def __init__(self, policy: Policy, budgets: Budget | None, scan: Scan | bool | None,
                 approve: Callable[[ApprovalRequest], Any] | None,
                 approval_timeout_s: float) -> None:
        if budgets is not None and not isinstance(budgets, Budget):
            raise TypeError(f"budgets must be a failcore.Budget, got {budgets!r}")
        if scan is not None and not isinstance(scan, Scan | bool):
            raise TypeError(f"scan must be a failcore.Scan, True, False or None, got {scan!r}")
        self.policy = policy
        if scan is False:
            self.scan: Scan | None = None
        elif isinstance(scan, Scan):
            self.scan = scan if policy.scan is None else scan.compose(policy.scan)
        else:
            self.scan = policy.scan or Scan()
        self._salt = (self.scan.salt if self.scan is not None and self.scan.salt else new_salt())
        self.ledger = BudgetLedger()
        session_budget = budgets.tighter(policy.budget) if budgets else policy.budget
        if session_budget is not None:
            self.ledger.add_scope("session", session_budget)
        self.approver = Approver(approve, approval_timeout_s) if approve is not None else None
        self._tools: dict[str, _ToolGuard] = {}

    def close(self) -> None:
        if self.approver is not None:
            self.approver.close()

    # -- registration --------------------------------------------------------------------

    def register(self, name: str, metadata: ToolMetadata, granted: tuple[str, ...],
                 secret_fields: frozenset[str]) -> None:
        """Set up a tool's budget scope and approval; refuses what cannot be honoured."""
        reasons: list[str] = []
        if self.policy.requires_approval(name):
            if self.approver is None:
                raise RegistrationError(
                    f"{name}: policy {self.policy.name!r} requires approval for every call "
                    "(approve = true) but the session has no approver; pass "
                    "Session(approve=callback) or remove the tool from the policy's [tools]")
            reasons.append(f"policy {self.policy.name!r} marks it approve = true")
        risk = RiskLevel(metadata.risk_level)
        if risk in _APPROVAL_RISKS and self.approver is not None:
            reasons.append(f"risk_level {risk.value}")
        budget = metadata.budget.tighter(self.policy.tool_budget(name)) if metadata.budget \
            else self.policy.tool_budget(name)
        scope = f"tool:{name}"
        if budget is not None:
            self.ledger.add_scope(scope, budget)
        scopes = tuple(s for s in ("session", scope) if self.ledger.has(s))
        self._tools[name] = _ToolGuard(scopes, tuple(reasons), granted, risk.value, secret_fields)

    # -- scanning ------------------------------------------------------------------------

    def scan_arguments(self, tool: str, kwargs: dict[str, Any]) -> ScanOutcome | None:
        """Findings in the outgoing arguments (None when off or nothing found)."""
        if self.scan is None or not self.scan.arguments:
            return None
        outcome = scan_value(self.scan, kwargs, "args", self._salt, self._tools[tool].skip)
        return outcome if outcome.findings else None

    def scan_result(self, value: Any) -> ScanOutcome | None:
        """Findings in a result (None when off or nothing found)."""
        if self.scan is None or not self.scan.results:
            return None
        outcome = scan_value(self.scan, value, "result", self._salt)
        return outcome if outcome.findings else None

    def check_scan(self, trace: Any, call_id: str, tool: str, direction: str,
                   outcome: ScanOutcome) -> Any:
        """Record the findings; raise SecurityError on a "block", else return the value
        the call goes on with (matches masked where the action is "redact")."""
        trace.record("scan", call_id, {"direction": direction,
                                       "findings": [f.to_json() for f in outcome.findings]})
        blocked = outcome.blocked
        if blocked is not None:
            what = "argument" if direction == "arguments" else "result"
            where = scrub(blocked.where, (), outcome.masks)
            raise SecurityError(
                f"{tool}: {what} {where} holds {DESCRIPTIONS[blocked.kind]} (kind "
                f"{blocked.kind}, digest {blocked.digest}); the scan policy blocks it "
                f"[rule: scan: {blocked.kind}]. Remove it, or set the kind's action to "
                f"'redact' or 'warn' (Scan(actions=...) or the policy's [scan] actions)",
                rule=f"scan: {blocked.kind}", target=where, layer="scan")
        return outcome.value

    # -- budgets and approval ------------------------------------------------------------

    def admit(self, tool: str, call_id: str, shown_args: Callable[[], dict[str, Any]],
              masks: Mapping[str, str], trace: Any) -> Admission | None:
        """Reserve the call's budgets, then ask for approval; raises on refusal.

        ``shown_args`` gives the arguments as an approver may see them (secrets redacted);
        called only when an approver is asked, so an unguarded call does not pay for it."""
        guard = self._tools[tool]
        if not guard.scopes and not guard.approval:
            return None
        reservation: Reservation | None = None
        if guard.scopes:
            try:
                reservation, state = self.ledger.reserve(guard.scopes)
            except BudgetExceeded as err:
                trace.record("budget.check", call_id, {"ok": False, "counters": err.state,
                                                       "exceeded": err.budget})
                err.args = (f"{tool}: refused before dispatch: {err}",)
                raise
            trace.record("budget.check", call_id, {"ok": True, "counters": state,
                                                   "exceeded": None})
        admission = Admission(reservation, guard.scopes)
        if guard.approval and self.approver is not None:
            try:
                self._approve(tool, call_id, guard, shown_args(), masks, trace)
            except FailCoreError:
                self.release(admission)
                raise
        return admission

    def _approve(self, tool: str, call_id: str, guard: _ToolGuard, shown_args: dict[str, Any],
                 masks: Mapping[str, str], trace: Any) -> None:
        assert self.approver is not None
        request = ApprovalRequest(tool=tool, call_id=call_id, risk_level=guard.risk_level,
                                  reasons=guard.approval, args=scrub(shown_args, (), masks),
                                  grants=guard.granted, context=current_context())
        outcome = self.approver.decide(request)
        trace.record("approval", call_id, outcome.to_json(guard.approval))
        if outcome.approved:
            return
        who = f" by {outcome.by}" if outcome.by else ""
        why = f": {outcome.reason}" if outcome.reason else ""
        fix = {"denied": "ask the approver again or call a less risky tool",
               "timeout": "answer sooner or raise Session(approval_timeout_s=...)",
               "error": "fix the approve callback"}[outcome.decision]
        raise SecurityError(
            f"{tool}: refused before dispatch: approval {outcome.decision}{who}{why}; {fix} "
            f"[rule: approval: {outcome.decision}]",
            rule=f"approval: {outcome.decision}", target=tool, layer="approval")

    def release(self, admission: Admission | None) -> None:
        """The admitted call was not dispatched after all: it does not count."""
        if admission is not None and admission.reservation is not None:
            self.ledger.release(admission.reservation)

    def settle(self, admission: Admission | None, call_id: str, cpu_s: float, wall_s: float,
               value: Any, trace: Any) -> None:
        """Charge a dispatched call's CPU, wall time and result-field sums."""
        if admission is None or admission.reservation is None:
            return
        sums: dict[str, float] = {}
        for path in self.ledger.sum_paths(admission.scopes):
            amount = field_value(value, path) if value is not None else None
            if amount is not None:
                sums[path] = amount
        charge = Charge(round(cpu_s, 6), round(wall_s, 6), sums)
        state = self.ledger.settle(admission.reservation, charge)
        trace.record("budget.charge", call_id, {"cpu_s": charge.cpu_s, "wall_s": charge.wall_s,
                                                "sums": sums, "counters": state})
