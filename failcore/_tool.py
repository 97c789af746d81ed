"""A registered tool: its function as shipped to workers, models, grants, invariants.

Registration is where mistakes are cheap: metadata that breaks SPEC section 3 is refused
here, and the function is serialised once (by value where the worker could not import it).
"""

from __future__ import annotations

import os
import re
import sys
import types
from collections.abc import Callable
from typing import Any

import cloudpickle

from failcore._backend import ToolSpec
from failcore._capabilities import PUBLIC, Capability, NetConnect
from failcore._confinement import ToolConfinement
from failcore._errors import RegistrationError, ToolFailed
from failcore._metadata import NETWORK_MODES, DefaultPolicy, RiskLevel, SideEffect, ToolMetadata
from failcore._token import ToolGrants
from failcore._validation import ToolModels
from failcore_worker.rules import env_matches

TOOL_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")

# Secret values shorter than this are not scrubbed from trace text (they would match
# everywhere); they are still never written where they are arguments.
_MIN_SECRET = 4


class Tool:
    """A registered tool: what the parent checks (``models``, ``parts``) and what a backend
    runs (``spec``); ``confinement``: where its workers run and what their Landlock ruleset
    leaves out (``failcore._confinement``)."""

    def __init__(self, name: str, fn: Callable[..., Any], metadata: ToolMetadata,
                 caps: tuple[Capability, ...], models: ToolModels, parts: ToolGrants,
                 spec: ToolSpec, confinement: ToolConfinement | None = None) -> None:
        self.name = name
        self.fn = fn
        self.metadata = metadata
        self.caps = caps
        self.models = models
        self.parts = parts
        self.spec = spec
        self.env_names = spec.env_names
        self.limits = metadata.limits
        self.isolation = spec.isolation
        self.confinement = confinement or ToolConfinement(name, spec.network)


def ship(fn: Callable[..., Any]) -> bytes:
    """Pickle ``fn``; by value unless it lives in an installed package the worker can import."""
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    origin = getattr(module, "__file__", None) or ""
    installed = any(origin.startswith(p) for p in (sys.prefix, sys.base_prefix) if p)
    if module is not None and installed:
        return bytes(cloudpickle.dumps(fn))
    # Annotations are the parent's business (validation happens here): shipping them would
    # make the worker import what they name (pydantic, failcore's Secret...) for nothing.
    if isinstance(fn, types.FunctionType) and fn.__annotations__:
        clone = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__,
                                   fn.__closure__)
        clone.__kwdefaults__ = fn.__kwdefaults__
        clone.__qualname__ = fn.__qualname__
        clone.__module__ = fn.__module__
        clone.__doc__ = fn.__doc__
        clone.__dict__.update(fn.__dict__)
        fn = clone
    if module is None or module.__name__ == "__main__":
        return bytes(cloudpickle.dumps(fn))
    cloudpickle.register_pickle_by_value(module)
    try:
        return bytes(cloudpickle.dumps(fn))
    finally:
        cloudpickle.unregister_pickle_by_value(module)


# A declared side effect with no capability of its kind gets its conservative default
# (SPEC section 3). NETWORK: the public internet, any port (a real grant, marked as a
# default in the token). FILESYSTEM: the call's own scratch directory, which every call
# has anyway, so nothing is added; the label records the default for an audit.
NETWORK_DEFAULT = NetConnect(PUBLIC)
FS_SCRATCH_DEFAULT = "fs:scratch"


def check_invariants(name: str, md: ToolMetadata,
                     caps: tuple[Capability, ...]) -> tuple[tuple[Capability, ...], tuple[str, ...]]:
    """Refuse metadata that breaks SPEC section 3; return the side effects' defaults.

    Returns ``(capabilities added by default, default labels)``: for NETWORK with no net
    capability ``((net:connect:public,), ("net:connect:public",))``, for FILESYSTEM with
    no fs capability ``((), ("fs:scratch",))``. PROCESS and ENVIRONMENT have no safe
    default: a RegistrationError that shows the capability to add.
    """
    policy = DefaultPolicy(md.default_policy)
    if RiskLevel(md.risk_level) in (RiskLevel.HIGH, RiskLevel.CRITICAL) and policy is DefaultPolicy.ALLOW:
        raise RegistrationError(
            f"{name}: risk_level={md.risk_level.value} tools may not use "
            "default_policy=ALLOW; use BLOCK (or WARN) and grant capabilities explicitly")
    if md.effective_isolation not in ("tool", "call"):
        raise RegistrationError(f"{name}: isolation must be 'tool' or 'call', got {md.isolation!r}")
    if md.network not in NETWORK_MODES:
        raise RegistrationError(
            f"{name}: network must be one of {', '.join(map(repr, NETWORK_MODES))}, got "
            f"{md.network!r}")
    if md.network == "host" and SideEffect.NETWORK not in md.side_effects:
        raise RegistrationError(
            f"{name}: network='host' keeps the host's network for a client that connects "
            "from C; it needs side_effect=SideEffect.NETWORK and net:connect capabilities")
    declared = md.side_effects
    for cap in caps:
        if SideEffect(cap.side_effect) not in declared:
            raise RegistrationError(
                f"{name}: capability {cap} is outside the declared side effects "
                f"({', '.join(sorted(e.value for e in declared)) or 'NONE'}); declare "
                f"SideEffect.{SideEffect(cap.side_effect).value} or drop the capability")
    covered = {SideEffect(c.side_effect) for c in caps}
    added: list[Capability] = []
    labels: list[str] = []
    for effect in sorted(declared - covered, key=lambda e: e.value):
        if effect is SideEffect.NETWORK:
            added.append(NETWORK_DEFAULT)
            labels.append(str(NETWORK_DEFAULT))
        elif effect is SideEffect.FILESYSTEM:
            labels.append(FS_SCRATCH_DEFAULT)
        else:
            raise RegistrationError(
                f"{name}: declares side effect {effect.value} but no capability grants it, "
                f"and {effect.value} has no safe default; add e.g. "
                f"capabilities=[{_EXAMPLE[effect]!r}] or remove the side effect")
    return tuple(added), tuple(labels)


def secret_values(tool: Tool, kwargs: dict[str, Any]) -> list[str]:
    """Values that must never reach the trace: secret arguments, granted env values."""
    hidden: list[str] = []
    for name in tool.models.secret_fields:
        value = kwargs.get(name)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str) and len(value) >= _MIN_SECRET:
            hidden.append(value)
            # A secret used as a path shows up resolved ("../x" as "/cwd/x"): hide its
            # components too.
            hidden.extend(p for p in re.split(r"[/\\]", value) if len(p) >= _MIN_SECRET)
    for pattern in tool.env_names:
        hidden.extend(v for k, v in os.environ.items()
                      if env_matches(pattern, k) and len(v) >= _MIN_SECRET)
    return sorted(set(hidden), key=len, reverse=True)

_EXAMPLE = {
    SideEffect.PROCESS: "proc:exec:/usr/bin/git",
    SideEffect.ENVIRONMENT: "env:API_TOKEN",
}


_FRAME = re.compile(r'  File "([^"\n]+)", line (\d+), in ([^\n]+)\n')


def restore_source(err: ToolFailed, fn: Callable[..., Any]) -> None:
    """Put source lines back into a remote traceback, for files the parent trusts.

    Workers send tracebacks without source (see ``failcore_worker.main.format_traceback``). The
    parent adds lines only from the tool's own file (tools pickled by value arrive as
    ``<dynamic-code>``: the parent still knows where the code came from) and from the
    interpreter's trees; a frame naming any other file keeps no line, so a crafted code
    object cannot copy a file into the trace.
    """
    import linecache

    code = getattr(fn, "__code__", None)
    own = code.co_filename if code is not None else None
    trusted = tuple(os.path.realpath(p) + os.sep for p in {sys.prefix, sys.base_prefix} if p)

    def fix(match: re.Match[str]) -> str:
        filename, lineno, name = match.group(1), match.group(2), match.group(3)
        if filename == "<dynamic-code>" and own:
            filename = own
        text = f'  File "{filename}", line {lineno}, in {name}\n'
        if filename == own or os.path.realpath(filename).startswith(trusted):
            line = linecache.getline(filename, int(lineno)).strip()
            if line:
                text += f"    {line}\n"
        return text

    err.remote_traceback = _FRAME.sub(fix, err.remote_traceback)
