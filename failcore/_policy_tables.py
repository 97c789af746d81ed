"""The guardrail tables of a policy file: ``[budget]``, ``[scan]`` and ``[tools.NAME]``.

``failcore._policy`` reads ``[policy]``; this module reads the rest into the ``Policy``
fields ``budget``, ``scan``, ``approve_tools`` and ``tool_budgets``, collecting every
problem (file, key, what is wrong, what is expected) instead of stopping at the first::

    [budget]                      # the whole session
    calls = 1000
    calls_per_minute = 60
    cpu_s = 120
    wall_s = 600
    sums = { "usage.tokens" = 200000 }

    [scan]
    default = "warn"              # off | warn | redact | block
    arguments = true
    results = true
    actions = { secrets = "block", email = "redact" }
    entropy = { min_length = 24, max_length = 256, min_bits = 3.9 }

    [tools.deploy]
    approve = true                # ask Session(approve=...) before every call
    budget = { calls_per_minute = 2 }
"""

from __future__ import annotations

from typing import Any

from failcore._budgets import Budget
from failcore._scan import ACTIONS, UNSCANNED, Scan
from failcore._scan_kinds import GROUPS, KINDS
from failcore._scan_rules import EntropyRule

TABLES = ("budget", "scan", "tools")
_BUDGET_KEYS = ("calls", "calls_per_minute", "cpu_s", "wall_s", "sums")
_SCAN_KEYS = ("default", "arguments", "results", "actions", "entropy", "max_bytes")
_ENTROPY_KEYS = ("min_length", "max_length", "min_bits")
_TOOL_KEYS = ("approve", "budget")


def _unknown(label: str, where: str, table: dict[str, Any], known: tuple[str, ...],
             problems: list[str]) -> None:
    for key in sorted(set(table) - set(known)):
        problems.append(f"{label}: unknown key '{where}.{key}'; '{where}' takes: "
                        f"{', '.join(known)}")


def read_budget(label: str, where: str, table: Any, problems: list[str]) -> Budget | None:
    """A ``Budget`` from a ``[budget]``-shaped table, or None (problems appended)."""
    if not isinstance(table, dict):
        problems.append(f"{label}: '{where}' must be a table, e.g. {where} = {{ calls = 100 }}")
        return None
    _unknown(label, where, table, _BUDGET_KEYS, problems)
    fields: dict[str, Any] = {}
    for key in _BUDGET_KEYS[:4]:
        if key in table:
            value = table[key]
            integer = key in ("calls", "calls_per_minute")
            ok = isinstance(value, int) if integer else isinstance(value, int | float)
            if isinstance(value, bool) or not ok or value <= 0:
                kind = "a positive integer" if integer else "a positive number"
                problems.append(f"{label}: key '{where}.{key}' must be {kind}, got {value!r}")
            else:
                fields[key] = value
    sums = table.get("sums", {})
    if not isinstance(sums, dict):
        problems.append(f"{label}: key '{where}.sums' must be a table of field path = limit, "
                        f"e.g. sums = {{ \"usage.tokens\" = 100000 }}")
    else:
        good: dict[str, float] = {}
        for path, limit in sums.items():
            if isinstance(limit, bool) or not isinstance(limit, int | float) or limit <= 0:
                problems.append(f"{label}: key '{where}.sums.\"{path}\"' must be a positive "
                                f"number, got {limit!r}")
            elif not path or any(not p for p in path.split(".")):
                problems.append(f"{label}: key '{where}.sums' has an empty field path {path!r}")
            else:
                good[path] = limit
        fields["sums"] = good
    try:
        return Budget(**fields)
    except ValueError as exc:
        problems.append(f"{label}: '{where}': {exc}")
        return None


def read_scan(label: str, table: Any, problems: list[str]) -> Scan | None:
    """A ``Scan`` from the ``[scan]`` table, or None (problems appended)."""
    if not isinstance(table, dict):
        problems.append(f"{label}: 'scan' must be a table ([scan])")
        return None
    _unknown(label, "scan", table, _SCAN_KEYS, problems)
    fields: dict[str, Any] = {}
    if "default" in table:
        if table["default"] in ACTIONS:
            fields["default"] = table["default"]
        else:
            problems.append(f"{label}: key 'scan.default' must be one of {', '.join(ACTIONS)}, "
                            f"got {table['default']!r}")
    for key in ("arguments", "results"):
        if key in table:
            if isinstance(table[key], bool):
                fields[key] = table[key]
            else:
                problems.append(f"{label}: key 'scan.{key}' must be true or false, "
                                f"got {table[key]!r}")
    if "max_bytes" in table:
        value = table["max_bytes"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1024:
            problems.append(f"{label}: key 'scan.max_bytes' must be an integer >= 1024, got {value!r}")
        else:
            fields["max_bytes"] = value
    actions = table.get("actions", {})
    if not isinstance(actions, dict):
        problems.append(f"{label}: key 'scan.actions' must be a table of kind = action")
    else:
        known = (*KINDS, *GROUPS, UNSCANNED)
        good: dict[str, Any] = {}
        for kind, action in actions.items():
            if kind not in known:
                problems.append(f"{label}: key 'scan.actions.{kind}' is not a finding kind; "
                                f"kinds: {', '.join(known)}")
            elif action not in ACTIONS:
                problems.append(f"{label}: key 'scan.actions.{kind}' must be one of "
                                f"{', '.join(ACTIONS)}, got {action!r}")
            else:
                good[kind] = action
        fields["actions"] = good
    if "entropy" in table:
        entropy = table["entropy"]
        if not isinstance(entropy, dict):
            problems.append(f"{label}: key 'scan.entropy' must be a table, e.g. "
                            "entropy = { min_length = 24, min_bits = 3.9 }")
        else:
            _unknown(label, "scan.entropy", entropy, _ENTROPY_KEYS, problems)
            try:
                fields["entropy"] = EntropyRule(**{k: v for k, v in entropy.items()
                                                   if k in _ENTROPY_KEYS})
            except ValueError as exc:
                problems.append(f"{label}: key 'scan.entropy': {exc}")
    try:
        return Scan(**fields)
    except ValueError as exc:
        problems.append(f"{label}: '[scan]': {exc}")
        return None


def read_tools(label: str, table: Any, problems: list[str]
               ) -> tuple[tuple[str, ...], tuple[tuple[str, Budget], ...]]:
    """(tools marked ``approve = true``, per-tool budgets) from the ``[tools]`` table."""
    if not isinstance(table, dict):
        problems.append(f"{label}: 'tools' must hold one table per tool, e.g. [tools.deploy]")
        return (), ()
    approve: list[str] = []
    budgets: list[tuple[str, Budget]] = []
    for name, entry in sorted(table.items()):
        where = f"tools.{name}"
        if not isinstance(entry, dict):
            problems.append(f"{label}: '{where}' must be a table, e.g. [{where}] approve = true")
            continue
        _unknown(label, where, entry, _TOOL_KEYS, problems)
        if "approve" in entry:
            if not isinstance(entry["approve"], bool):
                problems.append(f"{label}: key '{where}.approve' must be true or false, "
                                f"got {entry['approve']!r}")
            elif entry["approve"]:
                approve.append(name)
        if "budget" in entry:
            budget = read_budget(label, f"{where}.budget", entry["budget"], problems)
            if budget is not None:
                budgets.append((name, budget))
    return tuple(approve), tuple(budgets)


def read_tables(label: str, data: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The Policy fields the guardrail tables of one file set."""
    fields: dict[str, Any] = {}
    if "budget" in data:
        budget = read_budget(label, "budget", data["budget"], problems)
        if budget is not None:
            fields["budget"] = budget
    if "scan" in data:
        scan = read_scan(label, data["scan"], problems)
        if scan is not None:
            fields["scan"] = scan
    if "tools" in data:
        approve, budgets = read_tools(label, data["tools"], problems)
        fields["approve_tools"] = approve
        fields["tool_budgets"] = budgets
    return fields
