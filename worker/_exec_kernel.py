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

The same syscalls back the worker's own confinement (the ``kernel`` branch's
``failcore_worker._landlock`` and ``_kernel``); they live here separately until one home
takes both, with the same constants and conventions.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterable, Sequence

from failcore_worker import _kernel

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2

# Landlock filesystem rights (include/uapi/linux/landlock.h).
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5
NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

# Rights a rule on a non-directory may carry.
FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
READ = READ_FILE | READ_DIR
RUN = READ | EXECUTE
# Read-write without device nodes and without EXECUTE: what is written cannot be run.
WRITE = (READ | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SOCK
         | MAKE_FIFO | MAKE_SYM | REFER | TRUNCATE)
_FS_NAMES = ("execute", "write_file", "read_file", "read_dir", "remove_dir", "remove_file",
             "make_char", "make_dir", "make_reg", "make_sock", "make_fifo", "make_block",
             "make_sym", "refer", "truncate", "ioctl_dev")

_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = struct.Struct("16sH22x")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class KernelError(OSError):
    """A confinement syscall failed; the message names it and the errno."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _failed(what: str) -> KernelError:
    err = ctypes.get_errno()
    return KernelError(err, f"{what} failed: {os.strerror(err)} (errno {err})")


def _prctl(option: int, arg: int = 0) -> int:
    result: int = _libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0),
                              ctypes.c_ulong(0), ctypes.c_ulong(0))
    return result


# --- Landlock --------------------------------------------------------------------------


def landlock_abi() -> int:
    """The running kernel's Landlock ABI (0: none, or disabled at boot)."""
    version = int(_libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                                ctypes.c_uint32(_CREATE_RULESET_VERSION)))
    return max(version, 0)


def fs_rights(abi: int) -> int:
    """Every filesystem right ABI ``abi`` handles."""
    rights = (1 << 13) - 1 if abi >= 1 else 0
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def net_rights(abi: int) -> int:
    return NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0


def scopes(abi: int) -> int:
    return SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0


def describe_fs(rights: int) -> list[str]:
    """Names of the filesystem rights in ``rights`` (for traces and reports)."""
    return [name for bit, name in enumerate(_FS_NAMES) if rights & (1 << bit)]


def landlock_restrict(abi: int, paths: Iterable[tuple[str, int]],
                      connect_ports: Sequence[int] = (), bind_ports: Sequence[int] = ()) -> int:
    """Enforce a domain handling every right of ``abi``: only ``paths`` (path, rights)
    and TCP ``connect_ports``/``bind_ports`` are allowed; signals and abstract unix
    sockets are scoped to the domain. Returns how many path rules were added (a path
    that vanished since planning gets no rule, so no access).

    The caller is single-threaded and has set no_new_privs. Raises KernelError; once it
    returns, the domain holds for this process and everything it execs.
    """
    handled = fs_rights(abi)
    attr = _RulesetAttr(handled, net_rights(abi), scopes(abi))
    fd = int(_libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr),
                           ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0)))
    if fd < 0:
        raise _failed("landlock_create_ruleset")
    added = 0
    try:
        for path, access in paths:
            try:
                target = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if not os.path.isdir(path):
                    access &= FILE_ONLY
                rule = _PathBeneath(access & handled, target)
                if int(_libc.syscall(_SYS_ADD_RULE, fd, _RULE_PATH_BENEATH, ctypes.byref(rule),
                                     ctypes.c_uint32(0))) < 0:
                    raise _failed(f"landlock_add_rule({path})")
                added += 1
            finally:
                os.close(target)
        if net_rights(abi):
            for access, ports in ((NET_CONNECT_TCP, connect_ports), (NET_BIND_TCP, bind_ports)):
                for port in ports:
                    net_rule = _NetPort(access, port)
                    if int(_libc.syscall(_SYS_ADD_RULE, fd, _RULE_NET_PORT,
                                         ctypes.byref(net_rule), ctypes.c_uint32(0))) < 0:
                        raise _failed(f"landlock_add_rule(tcp port {port})")
        if int(_libc.syscall(_SYS_RESTRICT_SELF, fd, ctypes.c_uint32(0))) < 0:
            raise _failed("landlock_restrict_self")
    finally:
        os.close(fd)
    return added


# --- capabilities and privileges -------------------------------------------------------


def set_pdeathsig(signal: int) -> None:
    """Have the kernel send ``signal`` to this process when its parent thread exits."""
    if _prctl(_PR_SET_PDEATHSIG, signal) != 0:
        raise _failed("prctl(PR_SET_PDEATHSIG)")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63


def drop_bounding_set() -> tuple[bool, str]:
    """Empty the bounding and ambient sets (needs CAP_SETPCAP, so before anything drops
    it): then no exec, not even of a root-owned program by uid 0, gains a capability."""
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)
    kept = [cap for cap in range(_last_cap() + 1)
            if _prctl(_PR_CAPBSET_READ, cap) == 1 and _prctl(_PR_CAPBSET_DROP, cap) != 0]
    if kept:
        return False, (f"{len(kept)} capabilities left in the bounding set (no CAP_SETPCAP); "
                       "harmless under no_new_privs for a non-root uid")
    return True, "bounding and ambient sets empty"


def clear_capabilities() -> tuple[bool, str]:
    """Empty effective, permitted and inheritable sets, checked back with capget()."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capset(ctypes.byref(header), data) != 0:
        return False, f"capset() failed: {os.strerror(ctypes.get_errno())}"
    if _libc.capget(ctypes.byref(header), data) != 0:
        return False, f"capget() failed: {os.strerror(ctypes.get_errno())}"
    if any(d.effective or d.permitted or d.inheritable for d in data):
        return False, "capabilities left after capset()"
    return True, "no capabilities (effective, permitted, inheritable, ambient, bounding)"


def set_no_new_privs() -> tuple[bool, str]:
    if _prctl(_PR_SET_NO_NEW_PRIVS, 1) != 0 or _prctl(_PR_GET_NO_NEW_PRIVS) != 1:
        return False, f"PR_SET_NO_NEW_PRIVS failed: {os.strerror(ctypes.get_errno())}"
    return True, "no_new_privs: no exec can gain privileges"


# --- network namespace -----------------------------------------------------------------


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_netns() -> str:
    """Move this single-threaded process into a new, empty network namespace.

    Root (or CAP_SYS_ADMIN): ``unshare(CLONE_NEWNET)``. Otherwise a user namespace too,
    with this uid and gid mapped to themselves and setgroups denied. Returns how it was
    done; raises KernelError when neither works (user namespaces disabled).
    """
    if _libc.unshare(CLONE_NEWNET) == 0:
        return "unshare(CLONE_NEWNET)"
    direct = os.strerror(ctypes.get_errno())
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise KernelError(err, f"unshare(CLONE_NEWNET) failed ({direct}) and so did "
                               f"unshare(CLONE_NEWUSER|CLONE_NEWNET): {os.strerror(err)} "
                               "(user namespaces disabled?)")
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
    _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    return f"unshare(CLONE_NEWUSER|CLONE_NEWNET), uid {uid} and gid {gid} mapped to themselves"


def loopback_up() -> None:
    """Set IFF_UP on ``lo`` in this namespace (``_kernel.loopback_up``, raising on failure)."""
    layer = _kernel.loopback_up()
    if not layer.in_force:
        raise KernelError(0, layer.reason)
