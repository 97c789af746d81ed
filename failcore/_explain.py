"""``Policy.explain`` / ``failcore policy explain``: what a policy would do to one call.

Nothing runs: no worker, no name lookup, no tool code. For a prospective call (a tool
name, its arguments, the capabilities it declares, its risk level and default policy)
the explanation lists every rule that applies, layer by layer, with the decision each
would take, and a verdict:

- ``registration``: the metadata invariants ``Session.register`` checks (SPEC 3), and
  a policy's demand for an approver;
- ``capabilities``: each declared capability against the policy (granted, narrowed,
  refused), the same ``Policy.intersect`` the session uses;
- ``precheck``: every argument that is a URL or a path, judged as layer 1 would;
- ``worker``: the rules the resulting grants put in force inside the worker (layers
  2-3): hosts and ports, files, programs, variables, the default for the rest;
- ``scan``: the secret/PII findings in the arguments, with the policy's actions;
- ``budget``: the budgets the policy sets (whether one is spent depends on the session);
- ``approval``: whether an approver is asked.

The verdict is ``block`` when a layer would refuse the call before it runs (an invalid
registration, a pre-check or argument-scan block), ``warn`` when the call runs with
warnings or with capabilities refused, ``allow`` otherwise. Without a session, the
tool's capabilities are given as arguments (``--cap`` on the command line); the tool's
own ``ToolMetadata(budget=...)`` and ``Session(budgets=..., scan=...)`` are not known.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from failcore._capabilities import Capability, parse_capabilities
from failcore._errors import RegistrationError
from failcore._metadata import DefaultPolicy, RiskLevel, SideEffect, ToolMetadata
from failcore._scan import Scan, new_salt, scan_value
from failcore._scan_kinds import DESCRIPTIONS

if TYPE_CHECKING:
    from failcore._policy import Policy

LAYERS = ("registration", "capabilities", "precheck", "worker", "scan", "budget", "approval")
_RANK = {"info": 0, "allow": 0, "warn": 1, "block": 2}


@dataclass(frozen=True)
class ExplainRule:
    """One rule that applies: its layer, what it is about, the decision, and why.
    ``action`` "info" marks a rule decided only at call time (a budget)."""

    layer: str
    subject: str
    action: str
    rule: str
    reason: str


@dataclass(frozen=True)
class Explanation:
    policy: str
    tool: str
    risk_level: str
    default_policy: str
    capabilities: tuple[str, ...]
    granted: tuple[str, ...]
    verdict: str
    needs_approval: bool
    rules: tuple[ExplainRule, ...]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["rules"] = [asdict(r) for r in self.rules]
        data["capabilities"] = list(self.capabilities)
        data["granted"] = list(self.granted)
        return data

    def render(self) -> str:
        """Readable text, one line per rule, grouped by layer."""
        lines = [f"policy {self.policy}: tool {self.tool} (risk {self.risk_level}, default "
                 f"{self.default_policy})",
                 f"capabilities: {', '.join(self.capabilities) or 'none'}",
                 f"granted: {', '.join(self.granted) or 'nothing'}"]
        for layer in LAYERS:
            rules = [r for r in self.rules if r.layer == layer]
            if not rules:
                continue
            lines.append(f"[{layer}]")
            lines.extend(f"  {r.action:<5} {r.subject}: {r.reason}  [rule: {r.rule}]" for r in rules)
        approval = "an approver is asked first" if self.needs_approval else "no approval"
        lines.append(f"verdict: {self.verdict.upper()} ({approval})")
        return "\n".join(lines)


def explain(policy: Policy, tool: str, args: dict[str, Any],
            capabilities: Iterable[str | Capability] = (), *,
            risk_level: RiskLevel | str = RiskLevel.LOW,
            default_policy: DefaultPolicy | str = DefaultPolicy.BLOCK,
            side_effects: Iterable[SideEffect | str] | None = None,
            secret: Iterable[str] = (), approver: bool | None = None) -> Explanation:
    """Explain a prospective call of ``tool`` with ``args`` under ``policy``.

    ``capabilities``: what the tool declares; ``side_effects`` default to the kinds of
    those capabilities. ``secret``: argument names declared secret (not scanned).
    ``approver``: whether the session has an approve callback (None: not known).
    Raises ``CapabilityError`` for a capability that does not parse and ``ValueError``
    for an unknown risk level or default policy.
    """
    caps = parse_capabilities(capabilities)
    risk = RiskLevel(str(risk_level).upper())
    default = DefaultPolicy(str(default_policy).upper())
    effects = (sorted({SideEffect(str(e).upper()) for e in side_effects}) if side_effects is not None
               else sorted({SideEffect(c.side_effect) for c in caps}))
    rules: list[ExplainRule] = []
    rules.extend(_registration(policy, tool, risk, default, effects, caps, approver))
    cap_rules, granted = _capabilities(policy, caps)
    rules.extend(cap_rules)
    grants = policy.grants(caps, default)
    rules.extend(_precheck(policy, grants, args))
    rules.extend(_worker(grants))
    rules.extend(_scan(policy, args, frozenset(secret)))
    rules.extend(_budgets(policy, tool))
    approval_rules, needs = _approval(policy, tool, risk, approver)
    rules.extend(approval_rules)
    worst = "allow"
    for r in rules:
        action = r.action
        if r.layer == "worker":
            continue  # rules in force during the call, not a decision about it
        if r.layer == "capabilities" and action == "block":
            action = "warn"  # the call runs; what the capability would allow is refused inside
        if _RANK.get(action, 0) > _RANK[worst]:
            worst = action
    return Explanation(policy.name, tool, risk.value, default.value, tuple(str(c) for c in caps),
                       granted, worst, needs, tuple(rules))


def _registration(policy: Policy, tool: str, risk: RiskLevel, default: DefaultPolicy,
                  effects: list[SideEffect], caps: tuple[Capability, ...],
                  approver: bool | None) -> list[ExplainRule]:
    from failcore._tool import TOOL_NAME, check_invariants

    out: list[ExplainRule] = []
    if not TOOL_NAME.match(tool):
        out.append(ExplainRule("registration", tool, "block", "tool name",
                               "not a valid tool name: letters, digits, '_', '.', '-' (max 64)"))
    metadata = ToolMetadata(risk_level=risk, side_effect=effects or SideEffect.NONE,
                            default_policy=default, capabilities=caps)
    try:
        check_invariants(tool, metadata, caps)
    except RegistrationError as exc:
        out.append(ExplainRule("registration", tool, "block", "metadata invariants", str(exc)))
    if policy.requires_approval(tool) and approver is False:
        out.append(ExplainRule("registration", tool, "block", "approval: no approver",
                               f"policy {policy.name!r} marks {tool} approve = true and the "
                               "session has no approver: register refuses the tool"))
    return out


def _capabilities(policy: Policy, caps: tuple[Capability, ...]
                  ) -> tuple[list[ExplainRule], tuple[str, ...]]:
    out: list[ExplainRule] = []
    for cap in caps:
        kept, verdicts = policy.intersect([cap])
        if verdicts:
            v = verdicts[0]
            out.append(ExplainRule("capabilities", str(cap), v.action, v.rule, v.reason))
        else:
            out.append(ExplainRule("capabilities", str(cap), "allow", f"capability {cap}",
                                   "granted as declared"))
    granted, _ = policy.intersect(caps)
    return out, tuple(str(c) for c in granted)


def _precheck(policy: Policy, grants: Any, args: dict[str, Any]) -> list[ExplainRule]:
    judged = policy.precheck(grants, args, keep_allowed=True)
    if not judged:
        return [ExplainRule("precheck", "args", "allow", "precheck: nothing to judge",
                            "no argument is a URL or a path")]
    return [ExplainRule("precheck", f"args.{where}", v.action, v.rule, v.reason)
            for where, v in judged]


def _worker(grants: Any) -> list[ExplainRule]:
    out: list[ExplainRule] = []

    def add(subject: str, action: str, rule: str, reason: str) -> None:
        out.append(ExplainRule("worker", subject, action, rule, reason))

    for r in grants.net:
        ports = "any port" if (r.port_lo, r.port_hi) == (0, 65535) else (
            f"port {r.port_lo}" if r.port_lo == r.port_hi else f"ports {r.port_lo}-{r.port_hi}")
        add("net", "allow", r.source or f"net:connect:{r.host}",
            f"connections to {r.host}, {ports}, checked on the resolved address at connect time")
    if grants.block_ranges:
        add("net", "block", "net_safe: special ranges",
            "loopback, private, link-local (cloud metadata), CGNAT, multicast, reserved and "
            "unspecified addresses are refused unless a grant names the address itself")
    for r in grants.fs:
        add("fs", "allow", r.source or r.path,
            f"{'reading and writing' if r.write else 'reading'} {r.path} and below")
    if grants.fs_root:
        add("fs", "block", f"fs_safe: outside {grants.fs_root}",
            f"files outside {grants.fs_root} are refused (on the real path: symlinks resolved)")
    add("fs", "allow", "scratch dir", "the call's own scratch directory (its working directory)")
    add("fs", "allow", "implicit read",
        "the interpreter's trees and TLS/DNS configuration files are readable")
    for program in grants.exec:
        add("exec", "allow", f"proc:exec:{program}", f"running {program}")
    if grants.deny_exec:
        add("exec", "block", "strict: exec denied", "no program may be run")
    for name in grants.env:
        add("env", "allow", f"env:{name}", f"the variable {name} is passed into the worker")
    add("default", grants.default, f"default_policy: {grants.default.upper()}",
        f"any other network, file or process operation: {grants.default}")
    return out


def _scan(policy: Policy, args: dict[str, Any], secret: frozenset[str]) -> list[ExplainRule]:
    config = policy.scan or Scan()
    out: list[ExplainRule] = []
    if config.arguments:
        outcome = scan_value(config, args, "args", new_salt(), secret)
        out.extend(ExplainRule("scan", f.where, "block" if f.action == "block" else "warn",
                               f"scan: {f.kind}",
                               f"holds {DESCRIPTIONS[f.kind]}: {_scan_effect(f.action)}")
                   for f in outcome.findings)
    else:
        out.append(ExplainRule("scan", "args", "allow", "scan: arguments off",
                               "outgoing arguments are not scanned"))
    strong = {k: a for k, a in config.to_json()["actions"].items() if a in ("block", "redact")}
    if config.results:
        detail = ", ".join(f"{k} {a}" for k, a in sorted(strong.items())) or "every kind warn"
        out.append(ExplainRule("scan", "result", "info", "scan: results",
                               f"the result will be scanned ({detail})"))
    return out


def _scan_effect(action: str) -> str:
    return {"warn": "let through, recorded as a finding (kind and hash only)",
            "redact": "masked before the tool gets it", "block": "the call is refused",
            "off": "ignored"}[action]


def _budgets(policy: Policy, tool: str) -> list[ExplainRule]:
    out: list[ExplainRule] = []
    for scope, budget in (("session", policy.budget), (f"tool {tool}", policy.tool_budget(tool))):
        if budget is None:
            continue
        for name, limit in budget.limits().items():
            out.append(ExplainRule("budget", scope, "info", f"budget: {name}",
                                   f"at most {limit:g} ({name}); checked against the session's "
                                   "use when the call is made"))
    return out


def _approval(policy: Policy, tool: str, risk: RiskLevel, approver: bool | None
              ) -> tuple[list[ExplainRule], bool]:
    out: list[ExplainRule] = []
    needs = False
    if policy.requires_approval(tool):
        needs = True
        out.append(ExplainRule("approval", tool, "info", "approval: policy",
                               f"policy {policy.name!r} marks it approve = true: every call waits "
                               "for Session(approve=...)"))
    if risk in (RiskLevel.HIGH, RiskLevel.CRITICAL):
        if approver is not False:
            needs = needs or approver is True
            out.append(ExplainRule("approval", tool, "info", f"approval: risk {risk.value}",
                                   f"risk {risk.value}: asked before every call when the session "
                                   "has an approver (Session(approve=...)); without one the call "
                                   "runs unasked"))
    return out, needs
