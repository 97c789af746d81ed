"""Kernel confinement primitives for a program FailCore did not write (ctypes, no libraries).

Why a module of its own: ``failcore mcp guard`` confines an *arbitrary* executable (a node
or Python MCP server) between fork and exec, where none of the worker's Python guards
exist. What holds it is what the kernel enforces and no code in the process can undo:

- ``enter_netns``: an empty network namespace (root: ``unshare(CLONE_NEWNET)``; otherwise
  ``CLONE_NEWUSER|CLONE_NEWNET`` with the uid and gid mapped to themselves and setgroups
  denied, so nothing gains an id it did not have); ``loopback_up`` brings ``lo`` up in it
  without ``ip`` (two ioctls), so a listener there can be the one way out.
- ``drop_bounding_set``, ``clear_capabilities``, ``set_no_new_privs``: no capability in
  the process or anything it execs, uid 0 included (an empty bounding set means a root
  exec gains nothing), and no exec can gain privileges (setuid, file capabilities).
- ``landlock_abi`` / ``landlock_restrict``: a Landlock domain naming exactly the paths,
  TCP ports and scopes the parent planned; every right the running ABI knows is handled,
  so anything not named is refused.

Every function returns ``(in_force, reason)`` or raises ``KernelError`` with the syscall
and errno: the launcher reports per layer what is in force and why not, the parent
records it and refuses to start when the policy requires a layer that is missing.

The syscalls themselves have one home, shared with the workers' confinement:
``failcore_worker._landlock`` (rulesets) and ``failcore_worker._kernel`` (capabilities,
no_new_privs, namespaces, the loopback); this module adapts them to a launcher that must
refuse to exec when a layer fails.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Sequence

from failcore_worker import _kernel, _landlock
from failcore_worker._landlock import (
    EXECUTE,
    FILE_ONLY,
    IOCTL_DEV,
    MAKE_BLOCK,
    MAKE_CHAR,
    MAKE_DIR,
    MAKE_FIFO,
    MAKE_REG,
    MAKE_SOCK,
    MAKE_SYM,
    READ,
    READ_DIR,
    READ_FILE,
    REFER,
    REMOVE_DIR,
    REMOVE_FILE,
    TRUNCATE,
    WRITE,
    WRITE_FILE,
    describe_fs,
)

__all__ = ["EXECUTE", "FILE_ONLY", "IOCTL_DEV", "MAKE_BLOCK", "MAKE_CHAR", "MAKE_DIR",
           "MAKE_FIFO", "MAKE_REG", "MAKE_SOCK", "MAKE_SYM", "READ", "READ_DIR", "READ_FILE",
           "REFER", "REMOVE_DIR", "REMOVE_FILE", "RUN", "TRUNCATE", "WRITE", "WRITE_FILE", "KernelError", "clear_capabilities",
           "describe_fs", "drop_bounding_set", "enter_netns", "landlock_abi",
           "landlock_restrict", "loopback_up", "set_no_new_privs", "set_pdeathsig"]

# A program's own tree: read, list and run (a worker's RUN is file-level: EXECUTE | READ_FILE).
RUN = READ | EXECUTE

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


class KernelError(OSError):
    """A confinement syscall failed; the message names it and the errno."""


def landlock_abi() -> int:
    """The running kernel's Landlock ABI (0: none, or disabled at boot)."""
    return _landlock.cached_abi()


def landlock_restrict(abi: int, paths: Iterable[tuple[str, int]],
                      connect_ports: Sequence[int] = (), bind_ports: Sequence[int] = ()) -> int:
    """Enforce a domain handling every right of ``abi``: only ``paths`` (path, rights)
    and TCP ``connect_ports``/``bind_ports`` are allowed; signals and abstract unix
    sockets are scoped to the domain. Returns how many path rules were added (a path
    that vanished since planning gets no rule, so no access).

    The caller is single-threaded and has set no_new_privs. Raises KernelError; once it
    returns, the domain holds for this process and everything it execs.
    """
    handled = _landlock.fs_rights(abi)
    rules = tuple((path, (access if os.path.isdir(path) else access & FILE_ONLY) & handled)
                  for path, access in paths if os.path.exists(path))
    plan = _landlock.Plan(abi, handled, _landlock.net_rights(abi), _landlock.scopes(abi),
                          rules, tuple(connect_ports), (), tuple(bind_ports))
    try:
        _landlock.restrict(plan)
    except _landlock.LandlockError as exc:
        raise KernelError(exc.errno, str(exc)) from None
    return len(rules)


def set_pdeathsig(signal: int) -> None:
    """Have the kernel send ``signal`` to this process when its parent thread exits."""
    if _libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal), ctypes.c_ulong(0),
                   ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise KernelError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")


def drop_bounding_set() -> tuple[bool, str]:
    """Empty the bounding and ambient sets (needs CAP_SETPCAP, so before anything drops
    it): then no exec, not even of a root-owned program by uid 0, gains a capability."""
    layer = _kernel.drop_bounding_set()
    return layer.in_force, layer.reason


def clear_capabilities() -> tuple[bool, str]:
    """Empty effective, permitted and inheritable sets, checked back with capget()."""
    layer = _kernel.clear_capabilities()
    return layer.in_force, layer.reason


def set_no_new_privs() -> tuple[bool, str]:
    layer = _kernel.set_no_new_privs()
    return layer.in_force, layer.reason


def enter_netns() -> str:
    """Move this single-threaded process into a new, empty network namespace (root:
    ``unshare(CLONE_NEWNET)``; otherwise a user namespace too, ids mapped to themselves).
    Returns how it was done; raises KernelError when neither works."""
    netns, userns = _kernel.enter_empty_netns(allow_userns=True)
    if not netns.in_force:
        raise KernelError(0, netns.reason)
    how = netns.reason.rpartition(": ")[2]  # the syscall, without the description
    return f"{how}; {userns.reason}" if userns.in_force else how


def loopback_up() -> None:
    """Set IFF_UP on ``lo`` in this namespace (``_kernel.loopback_up``, raising on failure)."""
    layer = _kernel.loopback_up()
    if not layer.in_force:
        raise KernelError(0, layer.reason)
