"""The guard policy file: what a third-party MCP server may do, and each of its tools.

Why one file: the server process and its tools are judged together (a tool's argument
rules must stay inside what the kernel lets the server do), and an audit reads one
document. The shape (TOML; every key optional unless said)::

    [policy]                  # the session policy: the keys of policies/*.toml
    include = ["net_safe.toml"]          # next to this file, else the shipped ones

    [server]                  # the server process, enforced by the kernel
    capabilities = ["fs:read:/srv/docs", "net:connect:api.example.com:443",
                    "env:API_TOKEN", "proc:exec:/bin/sh"]
    runtime_paths = []        # more read+exec paths the program itself needs
    confinement = "require"   # or "auto": run with what the kernel offers, say what not
    unlisted_tools = "allow"  # or "deny": only tools with a [tools.NAME] table are served
    timeout_s = 30            # per tools/call, unless the tool says otherwise
    memory_mb = 1024          # RLIMIT_DATA of every process of the server
    processes = 64            # RLIMIT_NPROC (in the server's own user namespace when
                              # unprivileged); the watchdog counts the tree either way
    open_files = 1024
    file_size_mb = 1024

    [tools.read_file]         # one table per tool, by the name the server lists
    capabilities = ["fs:read:/srv/docs/public"]   # what its arguments may name
    timeout_s = 5
    enabled = true            # false: not listed, and a call is refused
    arguments = { properties = { path = { pattern = "^/srv/docs/" } } }
                              # a JSON Schema the arguments must also satisfy

The server runs in a private scratch directory (also its ``HOME`` and ``TMPDIR``), which
is where relative paths in arguments resolve, for the server and for the pre-check alike.
A tool without ``capabilities`` may name what the server holds; a tool's capabilities
must be covered by the server's (else the file is refused: the kernel would deny what
the policy grants). ``--cap`` on the command line adds server capabilities.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from failcore._capabilities import Capability, Env, NetConnect, ProcExec, parse_capability
from failcore._capability_meet import covers
from failcore._errors import PolicyError
from failcore._policy import Policy, policy_from_table
from failcore_worker.rules import Grants

__all__ = ["GuardPolicy", "ServerRules", "ToolRules", "load_guard_policy"]

_SERVER_KEYS = {"capabilities", "runtime_paths", "confinement", "unlisted_tools",
                "timeout_s", "memory_mb", "processes", "open_files", "file_size_mb"}
_TOOL_KEYS = {"capabilities", "timeout_s", "enabled", "arguments"}
_TOP_KEYS = {"policy", "server", "tools"}
_HINT = ("a guard policy has the tables [policy], [server] and [tools.NAME]; see "
         "'failcore mcp guard --help' or the README section 'Guard a third-party MCP server'")


@dataclass(frozen=True)
class ToolRules:
    """One tool's rules. ``capabilities`` None: the server's."""

    capabilities: tuple[Capability, ...] | None = None
    timeout_s: float | None = None
    enabled: bool = True
    arguments: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ServerRules:
    capabilities: tuple[Capability, ...] = ()
    runtime_paths: tuple[str, ...] = ()
    confinement: Literal["require", "auto"] = "require"
    unlisted_tools: Literal["allow", "deny"] = "allow"
    timeout_s: float = 30.0
    memory_mb: int = 1024
    processes: int = 64
    open_files: int = 1024
    file_size_mb: int = 1024


@dataclass(frozen=True)
class GuardPolicy:
    """A loaded guard policy. ``grants`` for the server process or one tool's arguments."""

    policy: Policy = field(default_factory=Policy)
    server: ServerRules = field(default_factory=ServerRules)
    tools: Mapping[str, ToolRules] = field(default_factory=dict)
    source: str = "<defaults>"

    def with_capabilities(self, extra: Iterable[str]) -> GuardPolicy:
        """This policy with ``extra`` server capabilities (``--cap``)."""
        caps = tuple(parse_capability(c) for c in extra)
        server = ServerRules(**{**self.server.__dict__,
                                "capabilities": self.server.capabilities + caps})
        return GuardPolicy(self.policy, server, self.tools, self.source)

    def tool(self, name: str) -> ToolRules | None:
        """The rules for tool ``name``; None when it is not served (disabled, or unlisted
        under ``unlisted_tools = "deny"``)."""
        rules = self.tools.get(name)
        if rules is None:
            return ToolRules() if self.server.unlisted_tools == "allow" else None
        return rules if rules.enabled else None

    def server_grants(self) -> Grants:
        """What the server process may do (the proxy judges its connections with these)."""
        return self.policy.grants(self.server.capabilities, "BLOCK")

    def tool_grants(self, name: str) -> Grants:
        """What the arguments of a call to ``name`` may name (the pre-check's grants)."""
        rules = self.tools.get(name)
        caps = self.server.capabilities if rules is None or rules.capabilities is None \
            else rules.capabilities
        return self.policy.grants(caps, "BLOCK")

    def timeout(self, name: str) -> float:
        rules = self.tools.get(name)
        return rules.timeout_s if rules is not None and rules.timeout_s is not None \
            else self.server.timeout_s

    def env_names(self) -> list[str]:
        return [c.name for c in self.server.capabilities if isinstance(c, Env)]

    def programs(self) -> list[str]:
        return [c.program for c in self.server.capabilities if isinstance(c, ProcExec)]

    def has_network(self) -> bool:
        return any(isinstance(c, NetConnect) for c in self.server.capabilities)


def _caps(value: Any, where: str, problems: list[str]) -> tuple[Capability, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{where} must be a list of capability strings, got {value!r}")
        return ()
    caps = []
    for i, text in enumerate(value):
        try:
            caps.append(parse_capability(text))
        except ValueError as exc:
            problems.append(f"{where}[{i}]: {exc}")
    return tuple(caps)


def _number(table: Mapping[str, Any], key: str, where: str, problems: list[str],
            integer: bool = False) -> Any:
    value = table[key]
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        problems.append(f"{where}.{key} must be {kind}, got {value!r}")
        return None
    return value


def _server(table: Any, label: str, problems: list[str]) -> ServerRules:
    if not isinstance(table, dict):
        problems.append(f"{label}: [server] must be a table")
        return ServerRules()
    where = f"{label}: server"
    for key in sorted(set(table) - _SERVER_KEYS):
        problems.append(f"{where}: unknown key {key!r} (known: {', '.join(sorted(_SERVER_KEYS))})")
    fields: dict[str, Any] = {}
    if "capabilities" in table:
        fields["capabilities"] = _caps(table["capabilities"], f"{where}.capabilities", problems)
    if "runtime_paths" in table:
        paths = table["runtime_paths"]
        if not isinstance(paths, list) or not all(isinstance(p, str) and p.startswith("/")
                                                  for p in paths):
            problems.append(f"{where}.runtime_paths must be a list of absolute paths")
        else:
            fields["runtime_paths"] = tuple(paths)
    for key, allowed in (("confinement", ("require", "auto")), ("unlisted_tools", ("allow", "deny"))):
        if key in table:
            if table[key] not in allowed:
                problems.append(f"{where}.{key} must be one of {', '.join(allowed)}, "
                                f"got {table[key]!r}")
            else:
                fields[key] = table[key]
    for key in ("timeout_s",):
        if key in table and (value := _number(table, key, where, problems)) is not None:
            fields[key] = float(value)
    for key in ("memory_mb", "processes", "open_files", "file_size_mb"):
        if key in table and (value := _number(table, key, where, problems, True)) is not None:
            fields[key] = value
    return ServerRules(**fields)


def _tool(name: str, table: Any, label: str, server: ServerRules,
          problems: list[str]) -> ToolRules:
    where = f"{label}: tools.{name}"
    if not isinstance(table, dict):
        problems.append(f"{where} must be a table")
        return ToolRules()
    for key in sorted(set(table) - _TOOL_KEYS):
        problems.append(f"{where}: unknown key {key!r} (known: {', '.join(sorted(_TOOL_KEYS))})")
    fields: dict[str, Any] = {}
    if "capabilities" in table:
        caps = _caps(table["capabilities"], f"{where}.capabilities", problems)
        for cap in caps:
            if not any(covers(held, cap) for held in server.capabilities):
                problems.append(
                    f"{where}.capabilities: {cap} is not covered by the server's capabilities "
                    f"({', '.join(map(str, server.capabilities)) or 'none'}); the kernel would "
                    "refuse it to the server, so add it to [server] capabilities or narrow it")
        fields["capabilities"] = caps
    if "timeout_s" in table and (value := _number(table, "timeout_s", where, problems)) is not None:
        fields["timeout_s"] = float(value)
    if "enabled" in table:
        if not isinstance(table["enabled"], bool):
            problems.append(f"{where}.enabled must be true or false")
        else:
            fields["enabled"] = table["enabled"]
    if "arguments" in table:
        schema = table["arguments"]
        if not isinstance(schema, dict):
            problems.append(f"{where}.arguments must be a table (a JSON Schema)")
        else:
            from jsonschema import SchemaError
            from jsonschema.validators import validator_for
            try:
                validator_for(schema).check_schema(schema)
                fields["arguments"] = schema
            except SchemaError as exc:
                problems.append(f"{where}.arguments is not a valid JSON Schema: {exc.message}")
    return ToolRules(**fields)


def load_guard_policy(path: str | os.PathLike[str]) -> GuardPolicy:
    """Load a guard policy file; PolicyError lists every problem found."""
    from failcore.presets import policy_dir

    label = os.fspath(path)
    try:
        data = tomllib.loads(Path(label).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(f"{label}: no such guard policy file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{label}: cannot read the guard policy ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{label}: not valid TOML ({exc})") from None
    problems = [f"{label}: unknown top-level key {key!r}; {_HINT}"
                for key in sorted(set(data) - _TOP_KEYS)]
    policy: Policy | None = Policy(name=Path(label).stem)
    if "policy" in data:
        if not isinstance(data["policy"], dict):
            problems.append(f"{label}: [policy] must be a table")
        else:
            table = {"name": Path(label).stem, **data["policy"]}
            policy, found = policy_from_table(table, label, Path(label).parent, policy_dir())
            problems.extend(found)
    server = _server(data.get("server", {}), label, problems)
    tools: dict[str, ToolRules] = {}
    raw_tools = data.get("tools", {})
    if not isinstance(raw_tools, dict):
        problems.append(f"{label}: [tools] must hold one table per tool, [tools.NAME]")
    else:
        for name, table in raw_tools.items():
            tools[name] = _tool(name, table, label, server, problems)
    if problems or policy is None:
        raise PolicyError("; ".join(problems) or f"{label}: could not be loaded")
    return GuardPolicy(policy, server, tools, label)
