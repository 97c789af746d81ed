"""The gate: what the guard decides about one ``tools/call`` before the server sees it.

In order, the first refusal wins:

1. the tool is one the server listed and the policy serves (``[tools.NAME] enabled``,
   ``unlisted_tools``);
2. the arguments satisfy the server's own ``inputSchema`` *and* the policy's extra
   ``arguments`` schema (JSON Schema, with ``jsonschema``, which the ``mcp`` SDK already
   depends on; the schema's ``$schema`` picks the draft, 2020-12 when absent, as MCP says);
3. FailCore's pre-check (``Policy.precheck``): every URL and path anywhere in the
   arguments is judged with the tool's grants, relative paths against the server's
   working directory, exactly as a FailCore tool's arguments are.

Pure apart from ``realpath`` in the pre-check; no I/O towards the server. The relay turns
a refusal into an MCP tool result with ``isError: true`` whose text names the rule.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from failcore.mcp_guard._guard_policy import GuardPolicy
from failcore_worker.rules import Verdict

__all__ = ["Decision", "Gate", "schema_digest"]

MAX_ERRORS = 20


@dataclass(frozen=True)
class Decision:
    """``refused``: None to forward. ``stage``: where it was decided. ``errors``:
    schema problems (loc, msg). ``findings``: pre-check verdicts that were not "allow"."""

    tool: str
    refused: Verdict | None
    stage: str = ""
    errors: list[dict[str, str]] = field(default_factory=list)
    findings: list[tuple[str, Verdict]] = field(default_factory=list)

    def text(self) -> str:
        """What the agent reads: what was refused, which rule, what to change."""
        assert self.refused is not None
        return (f"FailCore refused the call to {self.tool!r} before it reached the server "
                f"(rule: {self.refused.rule}): {self.refused.reason}")


def schema_digest(schema: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(schema, sort_keys=True, separators=(",", ":"),
                                     default=str).encode()).hexdigest()


class Gate:
    """Judges calls for one server; ``set_tools`` with each listing the server gives."""

    def __init__(self, policy: GuardPolicy, cwd: str) -> None:
        self.policy = policy
        self.cwd = cwd
        self._schemas: dict[str, Mapping[str, Any]] = {}
        self._validators: dict[str, list[Any]] = {}

    def set_tools(self, schemas: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Remember each tool's input schema; returns the ``mcp.tools`` listing (served
        or not, and why). A schema that is not valid JSON Schema makes the tool unserved."""
        from jsonschema import SchemaError
        from jsonschema.validators import Draft202012Validator, validator_for

        self._schemas, self._validators = {}, {}
        listing = []
        for name, schema in schemas.items():
            served, reason = True, "served"
            if self.policy.tool(name) is None:
                served, reason = False, self._hidden_reason(name)
            else:
                checkers = []
                extra = self.policy.tools[name].arguments if name in self.policy.tools else None
                for source, sch in (("the server's inputSchema", schema),
                                    ("the policy's arguments schema", extra)):
                    if sch is None:
                        continue
                    cls = validator_for(sch, default=Draft202012Validator)
                    try:
                        cls.check_schema(sch)
                    except SchemaError as exc:
                        served, reason = False, f"{source} is not valid JSON Schema: {exc.message}"
                        break
                    checkers.append(cls(sch))
                if served:
                    self._schemas[name] = schema
                    self._validators[name] = checkers
            listing.append({"name": name, "served": served, "reason": reason,
                            "input_schema_sha256": schema_digest(schema)})
        return listing

    def served(self, name: str) -> bool:
        return name in self._validators

    def _hidden_reason(self, name: str) -> str:
        if name in self.policy.tools:
            return f"disabled by the guard policy ([tools.{name}] enabled = false)"
        return "not in the guard policy and [server] unlisted_tools = \"deny\""

    def judge(self, name: str, args: Mapping[str, Any]) -> Decision:
        if name not in self._validators:
            if name in self.policy.tools or self.policy.server.unlisted_tools == "deny":
                if self.policy.tool(name) is None:
                    return Decision(name, Verdict("block", "guard: tool not served",
                                                  f"{name!r} is {self._hidden_reason(name)}"),
                                    "disabled")
            return Decision(name, Verdict("block", "guard: unknown tool",
                                          f"the server lists no tool {name!r}; list the tools "
                                          "again and call one of those"), "unknown")
        errors = []
        for checker in self._validators[name]:
            for error in sorted(checker.iter_errors(dict(args)), key=lambda e: list(e.path)):
                loc = ".".join(str(p) for p in error.absolute_path) or "(arguments)"
                errors.append({"loc": loc, "msg": error.message, "type": str(error.validator)})
                if len(errors) >= MAX_ERRORS:
                    break
        if errors:
            shown = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors[:5])
            return Decision(name, Verdict("block", "guard: input schema",
                                          f"the arguments do not match the tool's input schema "
                                          f"({shown}); fix them and call again"),
                            "validate", errors)
        findings = self.policy.policy.precheck(self.policy.tool_grants(name), args, self.cwd)
        blocked = [(where, v) for where, v in findings if v.action == "block"]
        if blocked:
            where, verdict = blocked[0]
            return Decision(name, Verdict("block", verdict.rule,
                                          f"argument {where}: {verdict.reason}"),
                            "precheck", [], findings)
        return Decision(name, None, "forward", [], findings)
