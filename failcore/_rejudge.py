"""Re-judging a recorded trace under another policy: "what would this policy have blocked?"

Nothing runs and nothing is touched: the decisions are recomputed from the records.
For each ``tool.register`` the tool's grants are recomputed under the new policy (from
its capabilities and default policy); each ``call.start``'s arguments go through the
new policy's pre-check (layer 1); each ``guard`` record (an operation a worker saw) is
re-judged with ``Policy.rejudge`` (layer 3). The result lists every decision that is not
"allow" under either policy, so it shows both what the new policy would block and what
the original run blocked that the new policy would let through.

Limits: arguments marked secret were recorded as ``"<secret>"`` and are judged as that;
operations the original run never reached (a call blocked before dispatch has no worker
events) cannot be re-judged; guard records without a call id are skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, cast

from failcore._errors import FailCoreError
from failcore._metadata import DefaultPolicy
from failcore_worker.protocol import GuardEvent
from failcore_worker.rules import Grants, Verdict

Layer = Literal["precheck", "worker"]

_GUARD_KEYS = tuple(GuardEvent.__annotations__)


class RejudgePolicy(Protocol):
    """The part of ``failcore._policy.Policy`` re-judging needs."""

    def grants(self, caps: Sequence[Any], default: DefaultPolicy,
               defaults: Sequence[Any] = ...) -> Grants: ...

    def precheck(self, grants: Grants, args: Mapping[str, Any]) -> list[tuple[str, Verdict]]: ...

    def rejudge(self, event: GuardEvent, grants: Grants) -> Verdict: ...


@dataclasses.dataclass(frozen=True)
class Finding:
    """One decision in the trace, as recorded (``original``) and under the new policy.

    ``original`` is the recorded action ("allow", "warn" or "block"; "allow" when the
    original pre-check did not flag the argument). ``what`` is the argument path
    (precheck) or the operation and its target (worker).
    """

    call_id: str | None
    tool: str
    layer: Layer
    what: str
    original: str
    verdict: Verdict

    @property
    def changed(self) -> bool:
        return self.original != self.verdict.action

    @property
    def newly_blocked(self) -> bool:
        return self.verdict.action == "block" and self.original != "block"

    @property
    def newly_allowed(self) -> bool:
        return self.original == "block" and self.verdict.action != "block"

    def to_json(self) -> dict[str, Any]:
        return {
            "call_id": self.call_id, "tool": self.tool, "layer": self.layer, "what": self.what,
            "original": self.original, "action": self.verdict.action, "rule": self.verdict.rule,
            "reason": self.verdict.reason, "changed": self.changed,
        }


def _default(value: Any) -> DefaultPolicy:
    try:
        return DefaultPolicy(str(value).upper())
    except ValueError:
        return DefaultPolicy.BLOCK


def _tool_grants(policy: RejudgePolicy, body: Mapping[str, Any]) -> Grants:
    caps = [str(c) for c in body.get("capabilities") or []]
    default = _default(body.get("default_policy"))
    added = [c for c in (str(d) for d in body.get("defaults") or []) if c in caps]
    try:
        return policy.grants(caps, default, added)
    except FailCoreError:
        # A capability the new policy's parser refuses grants nothing: judge with none.
        return policy.grants([], default)


def _target(event: Mapping[str, Any]) -> str:
    from failcore._report import guard_target

    return f"{event.get('op', '?')} {guard_target(dict(event))}"


def rejudge(records: Sequence[Mapping[str, Any]], policy: RejudgePolicy) -> list[Finding]:
    """Every non-"allow" decision, recorded or new, for the records under ``policy``."""
    grants: dict[str, Grants] = {}
    call_tool: dict[str, str] = {}
    original_pre: dict[str, dict[str, str]] = {}
    pending_pre: dict[str, list[tuple[str, Verdict]]] = {}
    findings: list[Finding] = []

    def flush_precheck(cid: str) -> None:
        new = pending_pre.pop(cid, None)
        if new is None:
            return
        recorded = original_pre.pop(cid, {})
        tool = call_tool.get(cid, "?")
        seen = set()
        for where, verdict in new:
            seen.add(where)
            findings.append(Finding(cid, tool, "precheck", where, recorded.get(where, "allow"), verdict))
        for where, action in recorded.items():
            if where not in seen and action != "allow":
                findings.append(Finding(cid, tool, "precheck", where, action, Verdict(
                    "allow", "not flagged", "the new policy's pre-check does not flag this argument")))

    for rec in records:
        kind = rec.get("kind")
        body = rec.get("body")
        if not isinstance(body, Mapping):
            continue
        cid = rec.get("call_id")
        if kind == "tool.register":
            grants[str(body.get("tool"))] = _tool_grants(policy, body)
        elif kind == "call.start" and isinstance(cid, str):
            tool = str(body.get("tool", "?"))
            call_tool[cid] = tool
            tool_grants = grants.get(tool)
            args = body.get("args")
            if tool_grants is not None and isinstance(args, Mapping):
                pending_pre[cid] = policy.precheck(tool_grants, args)
        elif kind == "policy.precheck" and isinstance(cid, str):
            original_pre[cid] = {
                str(f.get("arg")): str(f.get("action")) for f in body.get("findings") or []
                if isinstance(f, Mapping)
            }
        elif kind == "guard" and isinstance(cid, str):
            flush_precheck(cid)
            tool = call_tool.get(cid, "?")
            tool_grants = grants.get(tool)
            if tool_grants is None:
                continue
            event = cast(GuardEvent, {k: body[k] for k in _GUARD_KEYS if body.get(k) is not None})
            verdict = policy.rejudge(event, tool_grants)
            original = str(body.get("action", "allow"))
            if verdict.action != "allow" or original != "allow":
                findings.append(Finding(cid, tool, "worker", _target(body), original, verdict))
        elif kind == "call.end" and isinstance(cid, str):
            flush_precheck(cid)
    for cid in list(pending_pre):
        flush_precheck(cid)
    return findings
