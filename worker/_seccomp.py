"""A small seccomp filter for confined workers: what Landlock cannot say about sockets.

A confined worker's network is the parent's socket broker (its namespace has only a
loopback nobody else uses). Landlock (ABI <= 7) denies TCP connect and bind there, but has
no right for ``listen(2)`` (and a brokered socket belongs to the *parent's* namespace: a
tool that disconnects it with ``connect(AF_UNSPEC)`` could listen on it there) and none for
UDP or other protocols. This filter, a classic-BPF program built here and installed with
``prctl(PR_SET_SECCOMP)`` (no seccomp library), refuses with EPERM:

- ``listen(2)``: a confined worker serves nobody;
- ``socket(AF_INET/AF_INET6, ...)`` other than a plain TCP stream (UDP, ICMP, SCTP, MPTCP,
  raw): DNS goes through the broker, nothing else has anywhere to go;
- ``io_uring_setup/enter/register``: io_uring operations are not system calls, so a
  filter could not see the sockets they make;
- any call made through another architecture's entry (``int 0x80``, x32), whose numbers
  this filter does not know.

Inherited by every process the worker starts (programs under ``proc:exec`` included).
Installed once in the zygote of confined workers, so forked workers pay nothing. Linux on
x86_64 or aarch64; elsewhere it reports itself not in force. Standard library only.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import socket

from failcore_worker._kernel import Layer

_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
# Classic BPF opcodes.
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
# struct seccomp_data: nr (u32), arch (u32), instruction_pointer (u64), args[6] (u64, the
# low half first on these little-endian machines).
_NR, _ARCH = 0, 4
_ARGS = 16

# (audit arch, listen, socket, io_uring_setup, first number of another ABI or None)
_ARCHES = {
    "x86_64": (0xC000003E, 50, 41, 425, 0x40000000),  # x32 numbers have bit 30 set
    "aarch64": (0xC00000B7, 201, 198, 425, None),
}
_SOCK_TYPE_MASK = 0xF
_IPPROTO_TCP = 6

_libc = ctypes.CDLL(None, use_errno=True)


class _Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_Filter))]


def program(machine: str | None = None) -> list[tuple[int, int, int, int]] | None:
    """The filter as (code, jt, jf, k) instructions for ``machine`` (None: unknown arch)."""
    known = _ARCHES.get(machine or platform.machine())
    if known is None:
        return None
    arch, listen, sock, uring, foreign = known
    deny = _RET_ERRNO | errno.EPERM
    # Jump offsets are relative to the next instruction; labels are resolved below.
    code: list[tuple[int | str, str | int, str | int, int]] = [
        (_LD_W_ABS, 0, 0, _ARCH),
        (_JEQ_K, 0, "deny", arch),
        (_LD_W_ABS, 0, 0, _NR),
    ]
    if foreign is not None:
        code.append((_JGE_K, "deny", 0, foreign))
    code += [
        (_JEQ_K, "deny", 0, listen),
        (_JGE_K, 0, "socket?", uring),  # io_uring_setup, _enter, _register: 425..427
        (_JGE_K, "socket?", "deny", uring + 3),
        ("socket?", 0, 0, 0),
        (_JEQ_K, 0, "allow", sock),
        (_LD_W_ABS, 0, 0, _ARGS),  # domain
        (_JEQ_K, "inet", 0, socket.AF_INET),
        (_JEQ_K, "inet", "allow", socket.AF_INET6),
        ("inet", 0, 0, 0),
        (_LD_W_ABS, 0, 0, _ARGS + 8),  # type, with SOCK_NONBLOCK / SOCK_CLOEXEC
        (_AND_K, 0, 0, _SOCK_TYPE_MASK),
        (_JEQ_K, 0, "deny", socket.SOCK_STREAM),
        (_LD_W_ABS, 0, 0, _ARGS + 16),  # protocol
        (_JEQ_K, "allow", 0, 0),
        (_JEQ_K, "allow", "deny", _IPPROTO_TCP),
        ("allow", 0, 0, 0),
        (_RET_K, 0, 0, _RET_ALLOW),
        ("deny", 0, 0, 0),
        (_RET_K, 0, 0, deny),
    ]
    labels: dict[str, int] = {}
    out: list[tuple[int | str, str | int, str | int, int]] = []
    for op, jt, jf, k in code:
        if isinstance(op, str):
            labels[op] = len(out)
        else:
            out.append((op, jt, jf, k))

    def offset(at: int, target: str | int) -> int:
        return labels[target] - at - 1 if isinstance(target, str) else target

    return [(int(op), offset(i, jt), offset(i, jf), k) for i, (op, jt, jf, k) in enumerate(out)]


def deny_network_escapes() -> Layer:
    """Install the filter in this process (inherited by its children); needs no_new_privs
    or CAP_SYS_ADMIN. Returns whether it is in force and why not."""
    insns = program()
    if insns is None:
        return Layer(False, f"seccomp filter not built for {platform.machine()}")
    filters = (_Filter * len(insns))(*[_Filter(c, t, f, k) for c, t, f, k in insns])
    prog = _Prog(len(insns), filters)
    if _libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        err = ctypes.get_errno()
        return Layer(False, f"prctl(PR_SET_SECCOMP) failed: {errno.errorcode.get(err, err)}")
    return Layer(True, "seccomp: listen, non-TCP inet sockets, io_uring and foreign "
                       "syscall ABIs refused (EPERM)")


__all__ = ["deny_network_escapes", "program"]
