"""Landlock: the kernel refuses a worker every file, TCP port, signal and abstract socket
its grants do not name.

Why: the layer-3 guards see what Python announces. Code trying to escape (a re-imported
``posix``/``_posixsubprocess``, ctypes reaching libc, a compiled extension such as
sqlite3, a program run under ``proc:exec``) goes around them. A Landlock domain is checked
by the kernel on every open, exec, mknod, rename, connect and bind of this process and of
everything it starts; it cannot be lifted, and a second ruleset stacked later only narrows
it (``rights only shrink``).

What a worker's domain allows (``plan``), nothing else:
  * implicit reads, read-only: the interpreter's trees, the worker package, the shared
    libraries and ``/etc/ld.so.cache`` the dynamic loader needs, DNS/TLS/time-zone
    configuration (resolved real paths, never ``/etc/ssl/private``), ``/proc`` and the
    CPU list in ``/sys`` (read-only: other processes' ``/proc`` entries are further
    refused by Landlock's ptrace rule), ``/dev/null`` (read-write), ``/dev/zero``,
    ``/dev/urandom``, ``/dev/random``;
  * ``fs:read`` paths read-only; ``fs:write`` paths and the worker's scratch directory
    read-write *without* MAKE_CHAR/MAKE_BLOCK (no device nodes) and without EXECUTE (a
    tool cannot write a binary and run it);
  * ``proc:exec`` programs executable (plus the ELF interpreter or ``#!`` interpreter
    the kernel itself opens to run them);
  * TCP: in a confined worker neither bind nor connect (its namespace has no network:
    sockets come from the parent's broker); for a host-network tool connect only to the
    granted ports, bind only to port 0 (an ephemeral port: what a client binding its
    source address, or urllib3's IPv6 probe, asks for; never a chosen port);
  * signals and abstract unix sockets scoped to the worker's own domain (ABI 6).

Rights exist by ABI version (REFER 2, TRUNCATE 3, TCP 4, IOCTL_DEV 5, scopes 6); the
running kernel's ABI is read at run time and every right it has is handled. A tool whose
``default_policy`` is not BLOCK may touch files no grant names, so its files are not
handled (except device nodes); the plan says so in ``notes``. Standard library only:
ctypes syscalls 444-446 (the same number on every architecture).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from failcore_worker._program_files import program_files
from failcore_worker.rules import Grants

_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1 << 0
_RULE_PATH_BENEATH, _RULE_NET_PORT = 1, 2

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

# Rights the kernel accepts on a rule for a non-directory.
FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
READ = READ_FILE | READ_DIR
WRITE = (READ | WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SOCK
         | MAKE_FIFO | MAKE_SYM | REFER | TRUNCATE)
RUN = EXECUTE | READ_FILE
DEVICES = {"/dev/null": READ_FILE | WRITE_FILE | TRUNCATE | IOCTL_DEV, "/dev/zero": READ_FILE,
           "/dev/urandom": READ_FILE, "/dev/random": READ_FILE}
# Most ports a host-network tool's connect rules may list; wider grants leave TCP connect
# to the guards and the watchdog (one rule per port).
MAX_PORTS = 256
# Read by native code the Python guards never see (the loader, glibc's NSS, sysconf).
_NATIVE_READ = ("/etc/ld.so.cache", "/etc/ld.so.preload", "/etc/passwd", "/etc/group",
                "/proc", "/sys/devices/system/cpu")
_LIB_DIRS = ("/lib", "/lib32", "/lib64", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/local/lib")

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall  # bound once, in the zygote: workers inherit it
_syscall.restype = ctypes.c_long
_O_PATH = os.O_PATH | os.O_CLOEXEC


class LandlockError(OSError):
    """A Landlock syscall failed (the message names which and why)."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def abi_version() -> int:
    """The running kernel's Landlock ABI (0: none, or disabled at boot)."""
    version = int(_syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                                ctypes.c_uint32(_CREATE_RULESET_VERSION)))
    return max(version, 0)


@functools.cache
def cached_abi() -> int:
    """``abi_version()`` once per zygote; its workers inherit the answer."""
    return abi_version()


def fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1
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


_NAMES = ("execute", "write_file", "read_file", "read_dir", "remove_dir", "remove_file",
          "make_char", "make_dir", "make_reg", "make_sock", "make_fifo", "make_block",
          "make_sym", "refer", "truncate", "ioctl_dev")


def describe_fs(rights: int) -> list[str]:
    return [name for bit, name in enumerate(_NAMES) if rights & (1 << bit)]


@dataclass(frozen=True)
class Plan:
    """One ruleset: rights handled (denied unless a rule allows them) and the rules.

    ``paths``: (resolved path, rights) pairs; ``ports``: TCP ports connect may reach;
    ``bind_ports``: TCP ports bind may take (0: an ephemeral one); ``missing``: named
    paths that did not exist (a plan with some is worth making again later);
    ``notes``: what was left out and why (a path that does not exist, a port range too
    wide for per-port rules, files not handled under a permissive default).
    """

    abi: int
    fs: int
    net: int
    scoped: int
    paths: tuple[tuple[str, int], ...] = ()
    ports: tuple[int, ...] = ()
    notes: tuple[str, ...] = field(default=())
    bind_ports: tuple[int, ...] = ()
    missing: tuple[str, ...] = ()

    def with_scratch(self, path: str) -> Plan:
        """This plan plus a worker's own scratch directory, read-write (when files are
        handled at all)."""
        access = WRITE & self.fs
        return replace(self, paths=(*self.paths, (path, access))) if access else self

    def summary(self) -> dict[str, object]:
        return {"abi": self.abi, "fs": describe_fs(self.fs),
                "net": [n for b, n in ((NET_BIND_TCP, "bind_tcp"), (NET_CONNECT_TCP, "connect_tcp"))
                        if self.net & b],
                "scoped": [n for b, n in ((SCOPE_ABSTRACT_UNIX_SOCKET, "abstract_unix_socket"),
                                          (SCOPE_SIGNAL, "signal")) if self.scoped & b],
                "rules": len(self.paths) + len(self.ports) + len(self.bind_ports),
                "notes": list(self.notes)}


def library_dirs() -> set[str]:
    """The dynamic loader's trusted library directories and those ``ld.so.conf`` (and its
    ``.d`` files) name; not checked for existence. Also the MCP guard's, for its server."""
    dirs: set[str] = set(_LIB_DIRS)
    for conf in ["/etc/ld.so.conf", *sorted(glob.glob("/etc/ld.so.conf.d/*.conf"))]:
        try:
            with open(conf, encoding="utf-8", errors="replace") as f:
                dirs.update(line.split("#", 1)[0].strip() for line in f
                            if line.strip().startswith("/"))
        except OSError:
            continue
    return dirs


@functools.cache
def loader_paths() -> tuple[str, ...]:
    """What the dynamic loader and glibc read for native code: library directories (the
    trusted defaults, ``ld.so.conf``'s, and those of every object mapped now) and a few
    files. Resolved and existing only. Computed once in the zygote."""
    dirs = library_dirs()
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.split(None, 5)[-1].strip() if line.count(" ") >= 5 else ""
                if path.startswith("/") and not path.endswith("(deleted)"):
                    dirs.add(os.path.dirname(path))
    except OSError:
        pass
    found = {os.path.realpath(p) for p in (*dirs, *_NATIVE_READ) if p and os.path.exists(p)}
    return tuple(sorted(found))


@functools.lru_cache(maxsize=1024)
def _kind(path: str) -> tuple[str, bool] | None:
    """(real path, is a directory) or None when it does not exist. Cached: the zygote
    resolves the implicit reads once (``warm``) and every worker inherits the answers
    (only a worker that stacks a narrower ruleset plans for itself)."""
    real = os.path.realpath(path)
    if not os.path.exists(real):
        return None
    return real, os.path.isdir(real)


def _minimal(rights: dict[str, int]) -> tuple[tuple[str, int], ...]:
    """The rules without those an ancestor's rules already cover (Landlock grants the
    union of the rights of every rule on a path's ancestors): same domain, fewer rules."""
    kept = []
    for path in sorted(rights):
        covered, parent = 0, path
        while parent != "/":
            parent = os.path.dirname(parent)
            covered |= rights.get(parent, 0)
        if rights[path] & ~covered:
            kept.append((path, rights[path]))
    return tuple(kept)


def warm(implicit: Iterable[str]) -> None:
    """In the zygote: resolve what every worker's ruleset names (the implicit reads and
    the loader's paths) so that a worker's ``plan`` only resolves its own grants."""
    for path in (*implicit, *loader_paths()):
        _kind(path)


def plan(grants: Grants, scratch: Sequence[str], implicit: Iterable[str], abi: int,
         host_network: bool = False, search_path: str | None = None) -> Plan:
    """The ruleset for a worker running with ``grants`` (pure but for stat/realpath and
    reading the headers of granted programs). The parent makes it once per tool and
    sends it with ``init`` (the worker adds its scratch directory: ``with_scratch``), so a
    worker's lock-down is only ``restrict``."""
    notes: list[str] = []
    all_fs = fs_rights(abi)
    files_handled = grants.default == "block" or grants.fs_root is not None
    exec_free = grants.default != "block" and not grants.deny_exec
    handled = all_fs if files_handled else (MAKE_CHAR | MAKE_BLOCK | (0 if exec_free else EXECUTE))
    if exec_free:
        handled &= ~EXECUTE
    if not files_handled:
        notes.append(f"files not handled: default_policy={grants.default.upper()} allows what no "
                     "grant names (device nodes are still refused)")
    rights: dict[str, int] = {}
    missing: list[str] = []

    def allow(path: str, access: int, why: str) -> None:
        if not path:
            return
        found = _kind(path)
        if found is None:
            if why != "implicit read":
                notes.append(f"{why} {path}: does not exist, no rule")
                missing.append(path)
            return
        real, is_dir = found
        if not is_dir:
            access &= FILE_ONLY
        access &= handled
        if access:
            rights[real] = rights.get(real, 0) | access

    if files_handled:
        for path in implicit:
            allow(path, DEVICES.get(path, READ), "implicit read")
        for rule in grants.fs:
            allow(rule.path, WRITE if rule.write else READ, "fs:write" if rule.write else "fs:read")
        for path in scratch:
            allow(path, WRITE, "scratch")
        if grants.fs_root is not None and grants.default != "block":
            allow(grants.fs_root, WRITE, "fs_safe root")
    if handled & EXECUTE and not grants.deny_exec:
        for program in grants.exec:
            files = program_files(program, search_path)
            if not files:
                notes.append(f"proc:exec:{program}: not found, no rule")
                missing.append(program)
            for path in files:
                allow(path, RUN, f"proc:exec:{program}")
    net = net_rights(abi)
    ports: list[int] = []
    if net and host_network:
        if grants.default != "block":
            net &= ~NET_CONNECT_TCP
            notes.append(f"TCP connect not handled: default_policy={grants.default.upper()} "
                         "allows any port")
        else:
            wanted = sorted({p for r in grants.net for p in range(max(r.port_lo, 1), r.port_hi + 1)
                             if r.port_hi - r.port_lo < MAX_PORTS})
            wide = [r.source or r.host for r in grants.net if r.port_hi - r.port_lo >= MAX_PORTS]
            if wide or len(wanted) > MAX_PORTS:
                net &= ~NET_CONNECT_TCP
                notes.append(f"TCP connect not handled: {', '.join(wide) or 'the grants'} span more "
                             f"than {MAX_PORTS} ports (one rule per port); the guards and the "
                             "watchdog judge those connections")
            else:
                ports = wanted
    elif not net:
        notes.append(f"TCP not handled: Landlock ABI {abi} < 4")
    if abi < 6:
        notes.append(f"signals and abstract unix sockets not scoped: Landlock ABI {abi} < 6")
    bind_ports = (0,) if net else ()  # an ephemeral port: a client's bind (urllib3's ::1 probe)
    return Plan(abi, handled, net, scopes(abi), _minimal(rights), tuple(ports), tuple(notes),
                bind_ports, tuple(missing))


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise LandlockError(err, f"{what} failed: {os.strerror(err)}")
    return result


def restrict(p: Plan) -> None:
    """Create ``p``'s ruleset and enforce it on this thread (and what it starts).

    The caller has set no_new_privs (or holds CAP_SYS_ADMIN) and is single-threaded.
    Raises LandlockError; once this returns the domain cannot be lifted.
    """
    attr = _RulesetAttr(p.fs, p.net, p.scoped)
    fd = _check(int(_syscall(_SYS_CREATE_RULESET, ctypes.byref(attr),
                             ctypes.c_size_t(ctypes.sizeof(attr)), 0)), "landlock_create_ruleset")
    try:
        rule = _PathBeneath()
        ref = ctypes.byref(rule)
        for path, access in p.paths:
            try:
                target = os.open(path, _O_PATH)
            except OSError:
                continue  # gone or unreachable since planning: no rule, so no access
            rule.allowed_access, rule.parent_fd = access, target
            done = _syscall(_SYS_ADD_RULE, fd, _RULE_PATH_BENEATH, ref, 0)
            os.close(target)
            _check(done, f"landlock_add_rule({path})")
        net_rule = _NetPort()
        net_ref = ctypes.byref(net_rule)
        for access, ports in ((NET_CONNECT_TCP, p.ports), (NET_BIND_TCP, p.bind_ports)):
            for port in ports:
                net_rule.allowed_access, net_rule.port = access, port
                _check(_syscall(_SYS_ADD_RULE, fd, _RULE_NET_PORT, net_ref, 0),
                       f"landlock_add_rule(port {port})")
        _check(_syscall(_SYS_RESTRICT_SELF, fd, 0), "landlock_restrict_self")
    finally:
        os.close(fd)
