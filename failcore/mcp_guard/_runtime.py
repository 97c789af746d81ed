"""What a program needs to run, as Landlock rules: the plan the confined launcher applies.

Why planned here, in the parent: the launcher must stay small and do no guessing, and the
plan is recorded in the trace, so an audit shows exactly which paths a guarded server
could touch and why. Everything not named is refused by the kernel.

A server gets, besides its grants (``fs:read`` read-only, ``fs:write`` read-write
without device nodes or exec, ``proc:exec`` runnable):

- its executable and what the kernel opens to run it: a ``#!`` interpreter (followed
  through ``/usr/bin/env NAME`` on the server's PATH), an ELF program interpreter
  (``ld-linux``), recursively; read and execute;
- the interpreter's trees: a Python's prefix ``lib`` and, when run from a virtualenv,
  the venv (read and execute: its console scripts are programs); node's
  ``lib/node_modules`` next to its ``bin``;
- the program's own install directory: the outermost ``node_modules`` above any file
  of the exec chain or argument, the directory of a script named as an argument,
  ``npx``/``npm exec --prefix DIR``'s ``DIR``, and ``runtime_paths`` from the policy;
- shared libraries (the loader's directories, ``ld.so.conf``'s, ``/etc/ld.so.cache``);
  DNS, TLS, time-zone and user-database configuration (never ``/etc/ssl/private``);
  ``/proc`` and CPU/cgroup facts in ``/sys`` read-only (Landlock's ptrace rule keeps
  other processes' private entries closed); ``/dev/null`` read-write, the random devices
  read;
- a private scratch directory, read-write, as ``HOME`` and ``TMPDIR``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from failcore_worker._exec_kernel import (
    FILE_ONLY,
    IOCTL_DEV,
    READ,
    READ_FILE,
    RUN,
    TRUNCATE,
    WRITE,
    WRITE_FILE,
    describe_fs,
)
from failcore_worker._landlock import library_dirs
from failcore_worker._program_files import elf_interpreter

_CONFIG = ("/etc/ld.so.cache", "/etc/ld.so.preload", "/etc/hosts", "/etc/resolv.conf",
           "/etc/nsswitch.conf", "/etc/host.conf", "/etc/gai.conf", "/etc/services",
           "/etc/protocols", "/etc/passwd", "/etc/group", "/etc/localtime", "/etc/timezone",
           "/usr/share/zoneinfo", "/etc/ssl/certs", "/etc/ssl/openssl.cnf",
           "/etc/ca-certificates", "/usr/share/ca-certificates", "/etc/pki/tls/certs",
           "/etc/mime.types", "/usr/share/locale", "/usr/lib/locale",
           "/proc", "/sys/devices/system/cpu", "/sys/fs/cgroup")
_DEVICES = {"/dev/null": READ_FILE | WRITE_FILE | TRUNCATE | IOCTL_DEV,
            "/dev/zero": READ_FILE, "/dev/urandom": READ_FILE, "/dev/random": READ_FILE}
_MAX_CHAIN = 8


@dataclass(frozen=True)
class RuntimePlan:
    """``paths``: resolved path -> Landlock rights; ``why``: path -> the reasons;
    ``executable``: argv[0] resolved on the server's PATH; ``notes``: what was left out."""

    executable: str
    paths: dict[str, int]
    why: dict[str, list[str]]
    notes: list[str] = field(default_factory=list)

    def rules(self) -> list[tuple[str, int]]:
        """(path, rights) pairs without those an ancestor's rule already covers."""
        kept = []
        for path in sorted(self.paths):
            covered, parent = 0, path
            while parent != "/":
                parent = os.path.dirname(parent)
                covered |= self.paths.get(parent, 0)
            if self.paths[path] & ~covered:
                kept.append((path, self.paths[path]))
        return kept

    def summary(self) -> list[dict[str, object]]:
        """For the trace: every rule, its rights by name, and why it is there."""
        return [{"path": path, "rights": describe_fs(rights), "why": sorted(set(self.why[path]))}
                for path, rights in self.rules()]


class _Builder:
    def __init__(self, path_env: str) -> None:
        self.path_env = path_env
        self.paths: dict[str, int] = {}
        self.why: dict[str, list[str]] = {}
        self.notes: list[str] = []

    def allow(self, path: str, rights: int, why: str) -> None:
        real = os.path.realpath(path)
        if not os.path.exists(real):
            self.notes.append(f"{why}: {path} does not exist, no rule")
            return
        if not os.path.isdir(real):
            rights &= FILE_ONLY
        self.paths[real] = self.paths.get(real, 0) | rights
        self.why.setdefault(real, []).append(why)

    def which(self, name: str) -> str | None:
        if "/" in name:
            return os.path.abspath(name) if os.path.isfile(name) else None
        return shutil.which(name, path=self.path_env)

    def program(self, program: str, why: str, depth: int = 0) -> str | None:
        """Allow ``program`` to be executed, with everything the kernel opens to run it."""
        found = self.which(program)
        if found is None:
            self.notes.append(f"{why}: {program} not found on PATH={self.path_env}")
            return None
        if depth > _MAX_CHAIN:
            self.notes.append(f"{why}: interpreter chain deeper than {_MAX_CHAIN} at {found}")
            return found
        self.allow(found, RUN, why)
        self.trees(found, why)
        words = _shebang(found)
        if words:
            interp, rest = words[0], words[1:]
            self.program(interp, f"{why} (#! of {found})", depth + 1)
            if os.path.basename(interp) == "env":
                names = [w for w in rest if not w.startswith("-")]
                if names:
                    self.program(names[0], f"{why} (#!{interp} {names[0]})", depth + 1)
        loader = elf_interpreter(os.path.realpath(found))
        if loader:
            self.allow(loader, RUN, f"{why} (ELF interpreter)")
        return found

    def trees(self, path: str, why: str) -> None:
        """The interpreter's library trees and the package directory around ``path``."""
        real = os.path.realpath(path)
        name = os.path.basename(real)
        for candidate in (path, real):
            venv = os.path.dirname(os.path.dirname(candidate))
            if os.path.isfile(os.path.join(venv, "pyvenv.cfg")):
                self.allow(venv, RUN, f"{why}: its virtualenv")
        prefix = os.path.dirname(os.path.dirname(real))
        if name.startswith("python"):
            self.allow(os.path.join(prefix, "lib"), READ, f"{why}: Python's prefix")
        if name in ("node", "nodejs"):
            for lib in ("lib/node_modules", "share/nodejs", "lib/nodejs"):
                if os.path.isdir(os.path.join(prefix, lib)):
                    self.allow(os.path.join(prefix, lib), READ, f"{why}: node's library tree")
        self.package(path, why)
        if real != path:
            self.package(real, why)

    def package(self, path: str, why: str) -> None:
        parts = path.split("/")
        if "node_modules" in parts:
            top = "/".join(parts[:parts.index("node_modules") + 1])
            self.allow(top, RUN, f"{why}: its node_modules")


def _shebang(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return []
    if not head.startswith(b"#!"):
        return []
    return [os.fsdecode(w) for w in head[2:].split(b"\n", 1)[0].split()]


def _loader_dirs() -> list[str]:
    return sorted(d for d in library_dirs() if os.path.isdir(d))


def _prefix_arg(argv: Sequence[str]) -> str | None:
    """``DIR`` of ``--prefix DIR`` / ``--prefix=DIR`` (npx, npm exec)."""
    for i, arg in enumerate(argv):
        if arg == "--prefix" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--prefix="):
            return arg.split("=", 1)[1]
    return None


def plan_runtime(argv: Sequence[str], *, path_env: str, scratch: str,
                 read: Iterable[str] = (), write: Iterable[str] = (),
                 programs: Iterable[str] = (), runtime_paths: Iterable[str] = ()) -> RuntimePlan:
    """The Landlock paths for running ``argv`` with these grants (see the module doc).

    Raises FileNotFoundError when ``argv[0]`` is not found on ``path_env``.
    """
    b = _Builder(path_env)
    executable = b.program(argv[0], "the server")
    if executable is None:
        raise FileNotFoundError(f"{argv[0]}: not found on PATH={path_env}")
    for arg in argv[1:]:
        if arg.startswith("/") and os.path.isfile(arg):
            b.allow(os.path.dirname(arg), READ, "a script the server runs")
            b.package(arg, "a script the server runs")
    prefix = _prefix_arg(argv)
    if prefix:
        b.allow(prefix, READ, "the package prefix (--prefix)")
        if os.path.isdir(os.path.join(prefix, "node_modules")):
            b.allow(os.path.join(prefix, "node_modules"), RUN, "the package prefix (--prefix)")
    for path in runtime_paths:
        b.allow(path, RUN, "runtime_paths")
    for program in programs:
        b.program(program, f"proc:exec:{program}")
    for lib in _loader_dirs():
        b.allow(lib, READ, "shared libraries")
    for path in _CONFIG:
        if os.path.exists(path):
            b.allow(path, READ, "system configuration")
    for dev, rights in _DEVICES.items():
        b.allow(dev, rights, "device")
    for path in read:
        b.allow(path, READ, "fs:read")
    for path in write:
        b.allow(path, WRITE, "fs:write")
    b.allow(scratch, WRITE, "scratch (HOME, TMPDIR)")
    return RuntimePlan(executable, b.paths, b.why, b.notes)
