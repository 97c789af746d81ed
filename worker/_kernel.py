"""Process-wide kernel confinement of a worker: no capabilities, no-new-privs, no network.

Why: the layer-3 guards judge what Python announces; a tool that re-imports a C module,
reaches libc through ctypes or runs a program goes around them. What is set here is
enforced by the kernel on every syscall and cannot be undone from inside the process:

- ``drop_bounding_set`` (while still privileged) and ``clear_capabilities``: an empty
  capability bounding set, no ambient capabilities, empty effective/permitted/inheritable
  sets, in every worker, root or not. A worker that keeps uid 0 (the interpreter is not
  readable by ``nobody``) is then a uid without powers: no CAP_NET_RAW (``AF_PACKET``),
  no CAP_MKNOD, no CAP_DAC_OVERRIDE, no CAP_SYS_ADMIN.
- ``set_no_new_privs``: no exec can gain privileges (setuid binaries, file capabilities);
  also what Landlock requires of an unprivileged process.
- ``enter_empty_netns``: the zygote moves once into a network namespace with no usable
  interface (loopback down), so every worker it forks inherits it for free: a direct
  ``connect(2)`` fails with ENETUNREACH, UDP and DNS go nowhere.

Standard library and ctypes only (no libcap, no seccomp). Every function reports
``Layer(in_force, reason)`` and never raises: a kernel that lacks a mechanism makes the
session say so (``failcore._confinement``), and ``Session(confinement="require")`` turns
that into a refusal to start.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from typing import Any

_PR_CAPBSET_READ = 23
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_GET_NO_NEW_PRIVS = 39
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
# Looked up once, at import in the zygote: every forked worker inherits the bound
# functions instead of paying dlsym and a new function object at lock-down.
_capset, _capget, _prctl_fn, _unshare = _libc.capset, _libc.capget, _libc.prctl, _libc.unshare
_prctl_fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]


@dataclass(frozen=True)
class Layer:
    """Whether one mechanism is in force in this process, and why (not)."""

    in_force: bool
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {"in_force": self.in_force, "reason": self.reason}


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_CapSets = _CapData * 2  # version 3: two 32-bit halves of each set


def _prctl(option: int, arg: int = 0) -> int:
    result: int = _prctl_fn(option, arg, 0, 0, 0)
    return result


def _errno_text() -> str:
    err = ctypes.get_errno()
    return f"{os.strerror(err)} (errno {err})"


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 63


def single_threaded() -> bool:
    """Capabilities, no-new-privs, Landlock and unshare act on the calling thread only."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def drop_bounding_set() -> Layer:
    """Empty the capability bounding set (and the ambient set). Needs CAP_SETPCAP, so it
    runs while still privileged: once in the zygote (after it entered its namespaces),
    and every worker inherits the empty set across fork. It removes nothing from the
    zygote's own permitted set (workers can still drop their uid); it bounds what any
    later exec could gain. Without CAP_SETPCAP (an unprivileged process outside a user
    namespace) the bounding set stays, which no_new_privs makes harmless."""
    if _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL) != 0 and ctypes.get_errno() != 22:
        return Layer(False, f"clearing the ambient capabilities failed: {_errno_text()}")
    kept = []
    for cap in range(last_cap() + 1):
        if _prctl(_PR_CAPBSET_READ, cap) != 1:
            continue
        if _prctl(_PR_CAPBSET_DROP, cap) != 0:
            kept.append(cap)
    if kept:
        return Layer(False, f"{len(kept)} bounding-set capabilities kept (no CAP_SETPCAP: "
                            f"{_errno_text()}); harmless under no_new_privs")
    return Layer(True, "bounding set and ambient set empty")


def clear_capabilities() -> Layer:
    """Empty effective, permitted and inheritable sets (after any uid drop); the ambient
    set, a subset of permitted, empties with them. Checked back with capget()."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = _CapSets()
    if _capset(ctypes.byref(header), data) != 0:
        return Layer(False, f"capset() failed: {_errno_text()}")
    if _capget(ctypes.byref(header), data) != 0:
        return Layer(False, f"capget() failed: {_errno_text()}")
    if any(d.effective or d.permitted or d.inheritable for d in data):
        return Layer(False, "capabilities left after capset()")
    return Layer(True, "no capabilities (effective, permitted, inheritable, ambient empty)")


def set_no_new_privs() -> Layer:
    if _prctl(_PR_SET_NO_NEW_PRIVS, 1) != 0:
        return Layer(False, f"PR_SET_NO_NEW_PRIVS failed: {_errno_text()}")
    if _prctl(_PR_GET_NO_NEW_PRIVS) != 1:
        return Layer(False, "PR_SET_NO_NEW_PRIVS did not stick")
    return Layer(True, "no_new_privs set: no exec can gain privileges")


def drop_uid(uid: int, gid: int) -> Layer:
    """setgroups/setgid/setuid to an unprivileged user (the privilege plan's choice)."""
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        return Layer(False, f"dropping to uid {uid} failed: {exc}")
    return Layer(True, f"uid {uid}, gid {gid}, no supplementary groups")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def enter_empty_netns(allow_userns: bool) -> tuple[Layer, Layer]:
    """Move this (single-threaded) process into a new network namespace with no usable
    interface. Returns (netns, userns): as root ``unshare(CLONE_NEWNET)``; otherwise, when
    ``allow_userns``, ``unshare(CLONE_NEWUSER | CLONE_NEWNET)`` with the real uid and gid
    mapped to themselves and setgroups denied (so nothing gains a uid it did not have)."""
    if not single_threaded():
        why = "the process has several threads (unshare needs one)"
        return Layer(False, why), Layer(False, why)
    no_userns = Layer(False, "not needed: the zygote may create a network namespace itself")
    if _unshare(_CLONE_NEWNET) == 0:
        return Layer(True, "empty network namespace: unshare(CLONE_NEWNET)"), no_userns
    direct = _errno_text()
    if not allow_userns:
        why = f"unshare(CLONE_NEWNET) failed: {direct}; a user namespace would break the uid drop"
        return Layer(False, why), Layer(False, "not used: workers drop to another uid")
    uid, gid = os.getuid(), os.getgid()
    if _unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        why = (f"unshare(CLONE_NEWNET) failed ({direct}) and so did "
               f"unshare(CLONE_NEWUSER|CLONE_NEWNET): {_errno_text()} (user namespaces disabled?)")
        return Layer(False, why), Layer(False, why)
    try:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
    except OSError as exc:
        # Still in the new network namespace (the part that matters); ids unmapped.
        return (Layer(True, "empty network namespace inside a new user namespace: "
                      "unshare(CLONE_NEWUSER|CLONE_NEWNET)"),
                Layer(False, f"user namespace created but the id maps failed: {exc}"))
    return (Layer(True, "empty network namespace in its own user namespace: "
                  "unshare(CLONE_NEWUSER|CLONE_NEWNET)"),
            Layer(True, f"user namespace: uid {uid} and gid {gid} mapped to themselves, "
                        "setgroups denied"))


_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = struct.Struct("16sH22x")


def loopback_up() -> Layer:
    """Set IFF_UP on ``lo`` in this (new, empty) namespace, as ``ip link set lo up`` does:
    a loopback only this namespace's processes share (urllib3 probes IPv6 by binding ::1).
    Nothing reaches the host through it; the seccomp filter keeps it from being a channel
    (no UDP, no listen)."""
    import fcntl
    import socket

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            got = fcntl.ioctl(s.fileno(), _SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0))
            flags = _IFREQ.unpack(got)[1]
            fcntl.ioctl(s.fileno(), _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))
    except OSError as exc:
        return Layer(False, f"could not bring lo up: {exc}")
    return Layer(True, "loopback up (this namespace only)")
