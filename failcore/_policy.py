"""The session policy: which capabilities a session lets its tools hold, and layer 1.

A ``Policy`` is a named, composable set of rules (net_safe's range blocking, fs_safe's
root, strict's exec ban, allow and deny lists of capability patterns). It is pure data
with pure decisions: ``intersect`` and ``grants`` turn a tool's declared capabilities
into the ``failcore_worker.rules.Grants`` a call may use, ``precheck`` judges URL and path
arguments before dispatch with the very functions the worker's guards use, and
``rejudge`` re-judges a recorded guard event (``failcore replay --policy``).

``warn_only`` is audit mode: a violation of the policy's *own* rules becomes a
"warn" verdict instead of a block. The grants a warn-only policy issues therefore do not
carry its rules (the worker would block); ``precheck`` and ``rejudge`` re-apply them and
report what would have been blocked. A tool's own ``default_policy`` still blocks.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from failcore._budgets import Budget
from failcore._capabilities import (
    Capability,
    FsRead,
    FsWrite,
    ProcExec,
    parse_capabilities,
    parse_capability,
    to_rules,
)
from failcore._capability_meet import covers, meet
from failcore._errors import PolicyError
from failcore._metadata import DefaultPolicy
from failcore._policy_tables import TABLES, read_tables
from failcore._precheck import scan_arguments
from failcore._scan import Scan
from failcore_worker import rules
from failcore_worker.rules import Action, Grants, GuardEvent, Verdict, under

__all__ = ["Policy", "CapabilityVerdict", "load_policy", "load_policy_from", "check_policy_file",
           "policy_from_table"]

_DEFAULTS: dict[str, Action] = {"BLOCK": "block", "WARN": "warn", "ALLOW": "allow"}


@dataclass(frozen=True)
class CapabilityVerdict(Verdict):
    """A Verdict about one declared capability, carrying it so a trace can name it."""

    capability: str = ""


def _meet_all(a: Sequence[Capability], b: Sequence[Capability]) -> tuple[Capability, ...]:
    """Pairwise intersection of two pattern lists, without entries another one covers."""
    found = [m for x in a for y in b if (m := meet(x, y)) is not None]
    kept: list[Capability] = []
    for i, cap in enumerate(found):
        redundant = any(
            covers(other, cap) and (other != cap or j < i) for j, other in enumerate(found) if j != i
        )
        if not redundant:
            kept.append(cap)
    return tuple(kept)


@dataclass(frozen=True)
class Policy:
    """A session-wide validator. Build one with ``failcore.presets`` or ``load_policy``.

    ``allow`` is None for "no restriction"; otherwise a tool may only hold (the part of)
    a capability that some entry covers. ``deny`` lists patterns never granted: a
    capability overlapping one is refused whole, because a grant cannot have holes.
    ``fs_root`` is stored resolved (``realpath``) so nesting checks see real directories.
    Strings are accepted for ``allow``/``deny`` and parsed at construction.

    Guardrails (``[budget]``, ``[scan]``, ``[tools.NAME]`` in a policy file): ``budget``
    bounds the whole session, ``tool_budgets`` one tool each (a mapping is accepted),
    ``scan`` configures secret/PII scanning, ``approve_tools`` names the tools whose
    every call needs ``Session(approve=...)``.
    """

    name: str = "allow_all"
    block_ranges: bool = False
    warn_only: bool = False
    fs_root: str | None = None
    deny_exec: bool = False
    allow: tuple[Capability, ...] | None = None
    deny: tuple[Capability, ...] = ()
    budget: Budget | None = None
    scan: Scan | None = None
    approve_tools: tuple[str, ...] = ()
    tool_budgets: tuple[tuple[str, Budget], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "approve_tools", tuple(sorted(set(self.approve_tools))))
        budgets: Any = self.tool_budgets
        pairs = budgets.items() if isinstance(budgets, Mapping) else budgets
        object.__setattr__(self, "tool_budgets", tuple(sorted((str(n), b) for n, b in pairs)))
        if self.allow is not None:
            object.__setattr__(self, "allow", parse_capabilities(self.allow))
        object.__setattr__(self, "deny", parse_capabilities(self.deny))
        if self.fs_root is not None:
            root = os.fspath(self.fs_root)
            if not os.path.isabs(root):
                raise PolicyError(
                    f"policy {self.name!r}: fs_root {root!r} must be an absolute path, "
                    "e.g. fs_root = \"/srv/data\""
                )
            object.__setattr__(self, "fs_root", os.path.realpath(root))

    # -- composition -------------------------------------------------------------------

    def compose(self, *others: Policy) -> Policy:
        """The most restrictive combination: everything any part blocks stays blocked."""
        result = self
        for other in others:
            result = result._compose_one(other)
        return result

    def __or__(self, other: Policy) -> Policy:
        if not isinstance(other, Policy):
            return NotImplemented
        return self.compose(other)

    def _compose_one(self, other: Policy) -> Policy:
        root = self.fs_root
        if other.fs_root is not None:
            if root is None or under(other.fs_root, root):
                root = other.fs_root
            elif not under(root, other.fs_root):
                raise PolicyError(
                    f"cannot compose {self.name!r} and {other.name!r}: fs roots {root} and "
                    f"{other.fs_root} are disjoint, so no file could be granted; "
                    "use one root or nested ones"
                )
        if self.allow is None or other.allow is None:
            allow = other.allow if self.allow is None else self.allow
        else:
            allow = _meet_all(self.allow, other.allow)
        budget = other.budget if self.budget is None else self.budget.tighter(other.budget)
        scan = other.scan if self.scan is None else (
            self.scan if other.scan is None else self.scan.compose(other.scan))
        tool_budgets = dict(self.tool_budgets)
        for name, b in other.tool_budgets:
            tool_budgets[name] = b.tighter(tool_budgets.get(name))
        return Policy(
            name=f"{self.name}+{other.name}",
            block_ranges=self.block_ranges or other.block_ranges,
            warn_only=self.warn_only and other.warn_only,
            fs_root=root,
            deny_exec=self.deny_exec or other.deny_exec,
            allow=allow,
            deny=self.deny + other.deny,
            budget=budget,
            scan=scan,
            approve_tools=self.approve_tools + other.approve_tools,
            tool_budgets=tuple(tool_budgets.items()),
        )

    # -- guardrails --------------------------------------------------------------------

    def tool_budget(self, tool: str) -> Budget | None:
        """The budget this policy gives one tool, if any."""
        return dict(self.tool_budgets).get(tool)

    def requires_approval(self, tool: str) -> bool:
        """True when this policy marks ``tool`` ``approve = true``."""
        return tool in self.approve_tools

    def explain(self, tool: str, args: Mapping[str, Any] | None = None,
                capabilities: Iterable[str | Capability] = (), **options: Any) -> Any:
        """What would happen to a prospective call, layer by layer, without running it.

        See ``failcore._explain.explain`` for the options (risk level, default policy,
        side effects, whether the session has an approver) and the result.
        """
        from failcore._explain import explain

        return explain(self, tool, dict(args or {}), capabilities, **options)

    # -- capabilities -> grants --------------------------------------------------------

    def intersect(
        self, caps: Iterable[str | Capability]
    ) -> tuple[tuple[Capability, ...], tuple[Verdict, ...]]:
        """Which of a tool's capabilities this session grants, and why the rest are not.

        Returns the granted capabilities (possibly narrowed: ``fs:read:/`` under
        fs_safe(root=/srv) becomes ``fs:read:/srv``) and one ``CapabilityVerdict`` per
        capability refused ("block") or narrowed / let through in warn_only mode ("warn").
        """
        granted: dict[Capability, None] = {}
        verdicts: list[Verdict] = []
        for cap in parse_capabilities(caps):
            kept, verdict = self._judge_capability(cap)
            if verdict is not None and self.warn_only:
                kept = (cap,)
                verdict = CapabilityVerdict(
                    "warn", verdict.rule + " (warn_only)",
                    f"audit mode, granted anyway; enforcing, the policy would refuse: "
                    f"{verdict.reason}", str(cap),
                )
            for k in kept:
                granted.setdefault(k, None)
            if verdict is not None:
                verdicts.append(verdict)
        return tuple(granted), tuple(verdicts)

    def _judge_capability(
        self, cap: Capability
    ) -> tuple[tuple[Capability, ...], CapabilityVerdict | None]:
        text = str(cap)
        for pattern in self.deny:
            if meet(pattern, cap) is not None:
                return (), CapabilityVerdict(
                    "block", f"policy deny: {pattern}",
                    f"session policy {self.name!r} never grants {pattern}; remove {text} from "
                    "the tool's capabilities or the entry from the policy's deny list", text,
                )
        if self.deny_exec and isinstance(cap, ProcExec):
            return (), CapabilityVerdict(
                "block", "strict: exec denied",
                f"session policy {self.name!r} denies running programs; {text} is refused. "
                "Use a policy without deny_exec for tools that must run programs", text,
            )
        kept: tuple[Capability, ...] = (cap,)
        if self.fs_root is not None and isinstance(cap, FsRead | FsWrite):
            narrowed = meet(type(cap)(self.fs_root), cap)
            if narrowed is None:
                return (), CapabilityVerdict(
                    "block", f"fs_safe: outside {self.fs_root}",
                    f"{text} is outside the session's file root {self.fs_root}; grant a path "
                    f"under it, e.g. {type(cap)(self.fs_root)}", text,
                )
            kept = (narrowed,)
        if self.allow is not None:
            kept = _meet_all(self.allow, kept)
            if not kept:
                allowed = ", ".join(str(a) for a in self.allow) or "nothing"
                return (), CapabilityVerdict(
                    "block", f"policy allow: {text} not allowed",
                    f"session policy {self.name!r} only lets tools hold: {allowed}; "
                    "add a covering entry to its allow list or drop the capability", text,
                )
        if kept != (cap,) and not self.warn_only:
            return kept, CapabilityVerdict(
                "warn", f"policy narrowed: {text}",
                f"granted only {', '.join(str(k) for k in kept)} of {text} "
                f"(session policy {self.name!r})", text,
            )
        return kept, None

    def grants(
        self, caps: Iterable[str | Capability], default: DefaultPolicy | str = DefaultPolicy.BLOCK,
        defaults: Iterable[str | Capability] = (),
    ) -> Grants:
        """The ``Grants`` for a tool holding ``caps`` with ``default`` under this policy.

        ``defaults``: which of ``caps`` a side effect's default added (``net:connect:public``
        for NETWORK without a net capability); their rules are marked as defaults.
        """
        granted, _ = self.intersect(caps)
        marked = self.intersect(defaults)[0] if defaults else ()
        net, fs, exe, env = to_rules(granted, frozenset(marked))
        enforce = not self.warn_only
        return Grants(
            net=net, fs=fs, exec=exe, env=env,
            default=_default_action(default),
            block_ranges=self.block_ranges and enforce,
            fs_root=self.fs_root if enforce else None,
            deny_exec=self.deny_exec and enforce,
        )

    # -- judging operations ------------------------------------------------------------

    def _enforcing(self, grants: Grants) -> Grants:
        # Called on every pre-check with the same few Grants objects (one per tool):
        # remember the result by identity instead of rebuilding it (~6 us) each call.
        cache: dict[int, tuple[Grants, Grants]] = self.__dict__.setdefault("_enforced", {})
        hit = cache.get(id(grants))
        if hit is not None and hit[0] is grants:
            return hit[1]
        enforced = dataclasses.replace(
            grants,
            block_ranges=grants.block_ranges or self.block_ranges,
            fs_root=grants.fs_root or self.fs_root,
            deny_exec=grants.deny_exec or self.deny_exec,
        )
        if len(cache) > 256:
            cache.clear()
        cache[id(grants)] = (grants, enforced)
        return enforced

    def _relaxed(self, grants: Grants) -> Grants:
        return dataclasses.replace(grants, block_ranges=False, fs_root=None, deny_exec=False)

    def precheck(
        self, grants: Grants, args: Mapping[str, Any], cwd: str | None = None,
        keep_allowed: bool = False,
    ) -> list[tuple[str, Verdict]]:
        """Layer 1: judge every URL and path found anywhere in ``args`` before dispatch.

        Returns ``(argument path, verdict)`` for each finding that is not "allow", e.g.
        ``("payload.urls[2]", Verdict("block", "net_safe: 169.254.0.0/16 ...", ...))``.
        ``cwd`` is the call's scratch directory, against which relative paths resolve.
        ``keep_allowed``: report allowed URLs and paths too (``explain``).
        """
        strict = scan_arguments(self._enforcing(grants), args, cwd, keep_allowed)
        if not self.warn_only:
            return strict
        relaxed = dict(scan_arguments(self._relaxed(grants), args, cwd, keep_allowed))
        return [(where, self._downgrade(v, relaxed.get(where))) for where, v in strict]

    def _downgrade(self, strict: Verdict, relaxed: Verdict | None) -> Verdict:
        """In warn_only mode, a block the policy's rules caused (not the tool's default) warns."""
        if strict.action != "block" or (relaxed is not None and not relaxed.allowed):
            return strict
        return Verdict("warn", strict.rule + " (warn_only)",
                       f"audit mode, allowed; enforcing, the policy would block: {strict.reason}")

    def rejudge(self, event: GuardEvent, grants: Grants) -> Verdict:
        """Re-judge one guarded operation a worker recorded, under this policy.

        Paths are resolved on the machine doing the replay; ops with no policy rule
        ("net.bind", "ctypes", ...) keep their recorded verdict.
        """
        strict = _judge_event(event, self._enforcing(grants))
        if not self.warn_only or strict.action != "block":
            return strict
        return self._downgrade(strict, _judge_event(event, self._relaxed(grants)))


def _judge_event(event: GuardEvent, grants: Grants) -> Verdict:
    op = event.get("op", "")
    if op == "net.connect":
        host = event.get("host", "")
        port = int(event.get("port", 0))
        if rules.parse_ip(host.strip("[]")) is not None:
            return rules.check_connect(grants, host.strip("[]"), port, event.get("names", []))
        return rules.check_host(grants, host, port)
    if op == "net.resolve":
        return rules.check_resolve(grants, event.get("host", ""), int(event.get("port", 0)))
    if op in ("fs.open", "fs.modify"):
        write = op == "fs.modify" or bool(event.get("write", False))
        return rules.check_path(grants, event.get("path", ""), write)
    if op == "proc.exec":
        return rules.check_exec(grants, event.get("program", ""))
    if op == "proc.fork":
        return rules.check_fork(grants)
    return Verdict(
        event.get("action", "block"),
        event.get("rule", f"rejudge: no policy rule for {op!r}"),
        event.get("reason", "recorded verdict kept: no session policy rule applies to this op"),
    )


def _default_action(default: DefaultPolicy | str) -> Action:
    key = default.value if isinstance(default, DefaultPolicy) else str(default).upper()
    try:
        return _DEFAULTS[key]
    except KeyError:
        raise PolicyError(
            f"default policy {default!r} is not one of BLOCK, WARN, ALLOW"
        ) from None


# -- policy files ----------------------------------------------------------------------

_BOOL_KEYS = ("block_ranges", "warn_only", "deny_exec")
_LIST_KEYS = ("allow", "deny", "include")
_KNOWN_KEYS = frozenset({"name", "description", "fs_root", *_BOOL_KEYS, *_LIST_KEYS})
_SCHEMA_HINT = (
    "a policy file has one [policy] table with keys: " + ", ".join(sorted(_KNOWN_KEYS))
    + ", and optional tables " + ", ".join(f"[{t}]" for t in TABLES)
)


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Load a policy file (TOML, see ``policies/*.toml``), composing its includes.

    Raises PolicyError naming the file, the key and the problem; every problem found
    is listed, not just the first.
    """
    p = Path(path)
    return load_policy_from(p.parent, p.name)


def load_policy_from(directory: Traversable, name: str) -> Policy:
    """Load ``name`` from ``directory`` (a path or an ``importlib.resources`` folder)."""
    policy, problems = _load(directory, name, ())
    if problems or policy is None:
        raise PolicyError("; ".join(problems) if problems else f"{name}: could not be loaded")
    return policy


def check_policy_file(path: str | os.PathLike[str]) -> list[str]:
    """Every problem in a policy file, or ``[]`` when it loads (``failcore policy check``)."""
    p = Path(path)
    _, problems = _load(p.parent, p.name, ())
    return problems


def _load(
    directory: Traversable, name: str, stack: tuple[str, ...]
) -> tuple[Policy | None, list[str]]:
    source = directory.joinpath(name)
    label = str(source)
    if label in stack:
        return None, [f"{stack[-1]}: include cycle: {' -> '.join((*stack, label))}"]
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        where = f"{stack[-1]}: key 'policy.include'" if stack else label
        return None, [f"{where}: no such policy file {label}"]
    except (OSError, UnicodeDecodeError) as e:
        return None, [f"{label}: cannot read the policy file ({e})"]
    except tomllib.TOMLDecodeError as e:
        return None, [f"{label}: not valid TOML ({e})"]
    problems: list[str] = []
    extra = sorted(set(data) - {"policy", *TABLES})
    if extra:
        problems.append(f"{label}: unknown top-level key(s) {', '.join(extra)}; {_SCHEMA_HINT}")
    table = data.get("policy")
    if not isinstance(table, dict):
        problems.append(f"{label}: missing the [policy] table; {_SCHEMA_HINT}")
        return None, problems
    return _from_table(directory, name, label, table, stack, problems,
                       guardrails=read_tables(label, data, problems))


def policy_from_table(
    table: dict[str, Any], label: str, directory: Traversable, shipped: Traversable | None = None
) -> tuple[Policy | None, list[str]]:
    """A ``[policy]`` table that lives in another file (a ``failcore mcp guard`` policy):
    the same keys and checks as a policy file. Includes resolve in ``directory`` first,
    then in ``shipped`` (the shipped policies), so ``include = ["net_safe.toml"]`` works
    from anywhere. Returns the policy or every problem found."""
    # Only the [policy] table: a guard file's [tools.NAME] tables hold per-tool grants.
    return _from_table(directory, Path(label).name, label, table, (), [], {}, shipped)


def _from_table(
    directory: Traversable, name: str, label: str, table: dict[str, Any],
    stack: tuple[str, ...], problems: list[str], guardrails: dict[str, Any],
    shipped: Traversable | None = None,
) -> tuple[Policy | None, list[str]]:
    fields, includes = _read_table(label, table, problems)
    fields.update(guardrails)
    parts: list[Policy] = []
    for include in includes:
        where = directory
        if shipped is not None and not directory.joinpath(include).is_file():
            where = shipped
        included, sub_problems = _load(where, include, (*stack, label))
        problems.extend(sub_problems)
        if included is not None:
            parts.append(included)
    if problems:
        return None, problems
    explicit_name = fields.pop("name", None)
    try:
        own = Policy(name=explicit_name or Path(name).stem, **fields)
        policy = own.compose(*parts) if parts else own
    except (PolicyError, ValueError) as e:
        return None, [f"{label}: {e}"]
    if explicit_name:
        policy = dataclasses.replace(policy, name=explicit_name)
    return policy, []


def _read_table(
    label: str, table: dict[str, Any], problems: list[str]
) -> tuple[dict[str, Any], list[str]]:
    fields: dict[str, Any] = {}
    includes: list[str] = []
    for key in sorted(set(table) - _KNOWN_KEYS):
        problems.append(f"{label}: unknown key 'policy.{key}'; {_SCHEMA_HINT}")
    for key in ("name", "description", "fs_root"):
        if key in table and not isinstance(table[key], str):
            problems.append(f"{label}: key 'policy.{key}' must be a string, got {table[key]!r}")
    if isinstance(table.get("name"), str):
        fields["name"] = table["name"]
    root = table.get("fs_root")
    if isinstance(root, str):
        if not root.startswith("/"):
            problems.append(f"{label}: key 'policy.fs_root' must be an absolute path "
                            f"(no '~', not relative), got {root!r}")
        else:
            fields["fs_root"] = root
    for key in _BOOL_KEYS:
        if key in table:
            if isinstance(table[key], bool):
                fields[key] = table[key]
            else:
                problems.append(f"{label}: key 'policy.{key}' must be true or false, "
                                f"got {table[key]!r}")
    for key in _LIST_KEYS:
        if key not in table:
            continue
        value = table[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"{label}: key 'policy.{key}' must be a list of strings, got {value!r}")
            continue
        if key == "include":
            includes = list(value)
            continue
        caps: list[Capability] = []
        for i, entry in enumerate(value):
            try:
                caps.append(parse_capability(entry))
            except ValueError as e:
                problems.append(f"{label}: key 'policy.{key}[{i}]': {e}")
        fields[key] = tuple(caps)
    return fields, includes
