"""Ready-made session policies, loaded from the shipped ``policies/*.toml`` files.

The presets are the shipped files plus their parameters, so what a user reads in
``policies/net_safe.toml`` is exactly what ``net_safe()`` enforces, and a copy of that
file is a faithful starting point for a custom policy. Compose them with ``|``::

    session = Session(validator=presets.net_safe() | presets.fs_safe("/srv/data"))
"""

from __future__ import annotations

import dataclasses
import os
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from failcore._policy import Policy, load_policy_from

__all__ = ["net_safe", "fs_safe", "strict", "allow_all", "policy_dir"]


def policy_dir() -> Traversable:
    """The folder holding the shipped policy files (installed as ``failcore.policies``)."""
    try:
        return files("failcore.policies")
    except ModuleNotFoundError:
        # A source checkout that was never installed: the files live at the repo top.
        return Path(__file__).resolve().parent.parent / "policies"


def _shipped(name: str) -> Policy:
    return load_policy_from(policy_dir(), name)


def net_safe(strict: bool = True) -> Policy:
    """Block loopback, private, link-local (cloud metadata), CGNAT, multicast, reserved and
    unspecified ranges, IPv4 and IPv6, unless a capability lying inside the range names
    it (``10.1.2.0/24``); one merely containing a blocked range (``0.0.0.0/0``) covers
    only its public part.

    ``strict=False`` is audit mode: the same checks, recorded as warnings, nothing blocked
    by this policy (a tool's own ``default_policy=BLOCK`` still blocks).
    """
    policy = _shipped("net_safe.toml")
    return dataclasses.replace(
        policy, name=f"net_safe(strict={strict})", warn_only=policy.warn_only or not strict
    )


def fs_safe(root: str | os.PathLike[str]) -> Policy:
    """Confine every file access to ``root`` (symlinks resolved, traversal refused)."""
    text = os.fspath(root)
    return dataclasses.replace(_shipped("fs_safe.toml"), name=f"fs_safe(root={text})", fs_root=text)


def strict(root: str | os.PathLike[str] | None = None) -> Policy:
    """``net_safe(strict=True)`` plus no subprocesses, plus ``fs_safe(root)`` when given."""
    policy = dataclasses.replace(_shipped("strict.toml"), name="strict()")
    if root is None:
        return policy
    confined = policy.compose(fs_safe(root))
    return dataclasses.replace(confined, name=f"strict(root={os.fspath(root)})")


def allow_all() -> Policy:
    """No session-wide restriction: each tool gets exactly its own capabilities."""
    return Policy(name="allow_all")
