"""Layer 3: the Python-level guards inside a worker, installed before any tool code loads.

One ``sys.addaudithook`` hook judges every file open and modification, socket connect
and send, name resolution, subprocess, fork and ctypes load the interpreter announces,
with the same decision functions the parent's pre-check uses (``failcore_worker.rules``). A
blocked operation raises ``GuardDenied`` (a ``PermissionError``) inside the tool; every
decision except routine reads (stdlib imports, the scratch dir) is recorded for the trace.

What it does not stop (see SECURITY.md): code that is *trying* to escape. Audit hooks
cannot be removed, but the guards' state lives in this process and ctypes' prebuilt
helpers (``memmove``) are not audited; a program started through a granted exec runs
unguarded; a symlink swapped between the check and the syscall (TOCTOU); hard links
made before the call. Layers 2 and 4 (rlimits, uid, the outside watchdog) are the
backstop for those. This layer exists so that honest tools with unsafe inputs (an SSRF
URL, a ``../`` path, a redirect to the metadata service) are stopped where they land.
"""

from __future__ import annotations

import _posixsubprocess
import dataclasses
import os
import posix
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from failcore_worker import rules
from failcore_worker._guard_judge import (
    MAX_EVENTS,
    WRITE_FLAGS,
    GuardDenied,
    decide,
    judge_address,
    judge_exec,
    judge_path,
    judge_resolve,
    local,
    path_of,
    state,
)
from failcore_worker.rules import Grants, GuardEvent, Verdict

__all__ = ["GuardDenied", "install", "runtime_begin", "runtime_end", "set_call", "take_blocks",
           "take_events"]

_orig_os_open = os.open
_activations: dict[int, tuple[Grants, Grants, tuple[str, ...]]] = {}
_orig_fork_exec = _posixsubprocess.fork_exec


# --- public interface ------------------------------------------------------------------


def install(grants: Grants, cwd: str) -> None:
    """Install the guards in this process, judging with ``grants``; ``cwd`` is the
    worker's base directory (read+write: the run loop makes each call's scratch dir in
    it). Call once, before the tool's module is loaded; a second call raises."""
    if state.installed:
        raise RuntimeError("worker guards are already installed in this process")
    state.base = grants
    state.base_dir = os.path.realpath(cwd)
    _activate(grants, (state.base_dir,))
    sys.dont_write_bytecode = True  # no .pyc writes into read-only trees to refuse
    state.names.wrap(socket)
    os.open = posix.open = _guarded_os_open
    for name in ("connect", "connect_ex", "sendto"):
        setattr(socket.socket, name, _name_checked(getattr(socket.socket, name)))
    _posixsubprocess.fork_exec = subprocess._fork_exec = _guarded_fork_exec  # type: ignore[attr-defined]
    sys.addaudithook(_hook)
    state.installed = True


def set_call(grants: Grants, cwd: str) -> None:
    """Judge the next call with ``grants`` (a subset of the installed ones; the
    installed ``implicit_read`` is kept) and give it ``cwd`` as its scratch dir."""
    if not state.installed:
        raise RuntimeError("worker guards are not installed; call install() first")
    cached = _activations.get(id(grants))
    if cached is None or cached[0] is not grants:
        # Once per distinct grants object (the run loop reuses them): the subset check and
        # resolving every granted path cost ~30 us, too much to pay on every warm call.
        if not grants.is_subset_of(state.base):
            raise ValueError("call grants exceed the grants the guards were installed with "
                             "(rights only shrink)")
        call = dataclasses.replace(grants, implicit_read=state.base.implicit_read)
        _activate(call, (state.base_dir,))
        cached = (grants, state.grants, state.fast_read)
        if len(_activations) > 64:
            _activations.clear()
        _activations[id(grants)] = cached
    state.grants, state.fast_read = cached[1], cached[2]
    # The scratch dir is a fresh sub-directory of the (resolved, writable) base dir; it is
    # not resolved through the pinned cache, which would fill up with one entry per call.
    head, tail = os.path.split(cwd)
    real = os.path.join(state.base_dir, tail) if rules._resolve_base(head) == state.base_dir \
        else os.path.realpath(cwd)
    state.scratch = (real, state.base_dir)


def runtime_begin() -> None:
    """The run loop's own file work follows (scratch dirs): not judged, in this thread only."""
    local.busy = True


def runtime_end() -> None:
    local.busy = False


def take_events() -> list[GuardEvent]:
    """The decisions recorded since the last take (oldest first), then forgets them.
    Refusals recorded past the event cap come last (see ``take_blocks``)."""
    events, state.events = state.events, []
    if state.late_blocks:
        events.extend(state.late_blocks)
        state.late_blocks = []
    if state.dropped:
        events.append({"op": "guard.dropped", "target": f"{state.dropped} events",
                       "action": "warn", "rule": "guard: event limit",
                       "reason": f"more than {MAX_EVENTS} guarded operations in one call; "
                                 f"{state.dropped} were not recorded"})
        state.dropped = 0
    return events


def take_blocks() -> int:
    """How many operations were refused since the last take (every one, whatever the
    event cap kept), then forgets them."""
    total, state.block_total = state.block_total, 0
    return total


def _activate(grants: Grants, scratch: tuple[str, ...]) -> None:
    # Resolve (and pin, see rules._resolve_base) every granted path before tool code runs.
    for path in (*grants.implicit_read, *(r.path for r in grants.fs), *scratch):
        rules._resolve_base(path)
    if grants.fs_root is not None:
        rules._resolve_base(grants.fs_root)
    writable = [rules._resolve_base(r.path) for r in grants.fs if r.write] + list(scratch)
    fast = []
    for d in grants.implicit_read:
        base = rules._resolve_base(d).rstrip("/") + "/"
        if base != "/" and not any(w.startswith(base) or base.startswith(w.rstrip("/") + "/")
                                   for w in writable):
            fast.append(base)
    state.grants, state.scratch, state.fast_read = grants, scratch, tuple(fast)


# --- audit events ----------------------------------------------------------------------------


def _on_open(args: tuple[Any, ...]) -> None:
    path, mode, flags = args[0], args[1], args[2]
    if isinstance(path, int) or (path is local.skip_open and path is not None):
        return
    write = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        isinstance(flags, int) and bool(flags & WRITE_FLAGS))
    judge_path("fs.open", path_of(path), write)


def _modify(index: int, dir_index: int | None, follow: bool) -> Callable[[tuple[Any, ...]], None]:
    def handler(args: tuple[Any, ...]) -> None:
        dir_fd = args[dir_index] if dir_index is not None and len(args) > dir_index else None
        judge_path("fs.modify", path_of(args[index], dir_fd), True, follow)
    return handler


def _on_rename(args: tuple[Any, ...]) -> None:
    judge_path("fs.modify", path_of(args[0], args[2]), True, follow=False)
    judge_path("fs.modify", path_of(args[1], args[3]), True, follow=False)


def _on_link(args: tuple[Any, ...]) -> None:
    # A hard link to a file is a second name for it: writing needs rights on the file.
    judge_path("fs.modify", path_of(args[0], args[2]), True)
    judge_path("fs.modify", path_of(args[1], args[3]), True, follow=False)


def _on_list(args: tuple[Any, ...]) -> None:
    judge_path("fs.open", path_of(args[0]), False)


def _on_connect(args: tuple[Any, ...]) -> None:
    judge_address(args[0], args[1], "net.connect")


def _on_sendto(args: tuple[Any, ...]) -> None:
    if args[1] is not None:
        judge_address(args[0], args[1], "net.connect")


def _on_bind(args: tuple[Any, ...]) -> None:
    if getattr(args[0], "family", None) == socket.AF_UNIX and isinstance(args[1], (str, bytes)) \
            and args[1] and not os.fsdecode(args[1]).startswith("\0"):
        judge_path("fs.modify", os.fsdecode(args[1]), True)
        return
    decide(Verdict("allow", "net: bind recorded", "binding is not a capability"),
            {"op": "net.bind", "target": repr(args[1])[:200]})


def _on_popen(args: tuple[Any, ...]) -> None:
    executable, argv = args[0], args[1]
    shell = False
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") != "subprocess":
        frame = frame.f_back  # type: ignore[assignment]
    if frame is not None:
        shell = bool(frame.f_locals.get("shell", False))
    if executable is not None:
        program = executable
    elif shell:
        program = "/bin/sh"
    elif isinstance(argv, (str, bytes, os.PathLike)):
        program = argv
    else:
        program = list(argv)[0]
    judge_exec(program)
    local.in_popen = True  # allowed: its fork_exec is the same program, recorded once


def _on_exec(index: int) -> Callable[[tuple[Any, ...]], None]:
    def handler(args: tuple[Any, ...]) -> None:
        judge_exec(args[index])
    return handler


def _on_system(args: tuple[Any, ...]) -> None:
    judge_exec("/bin/sh", target=f"/bin/sh -c {os.fsdecode(args[0])!r}"[:300])


def _on_fork(args: tuple[Any, ...]) -> None:
    decide(rules.check_fork(state.grants), {"op": "proc.fork", "target": "fork"})


def _on_resolve(args: tuple[Any, ...]) -> None:
    judge_resolve(args[0], args[1] if len(args) > 1 else 0)


def _on_ctypes(event: str) -> Callable[[tuple[Any, ...]], None]:
    def handler(args: tuple[Any, ...]) -> None:
        if event == "ctypes.dlopen" and args[0] is None:
            return  # `import ctypes` opens the main program; its symbols stay unreachable
        verdict = Verdict("block", f"ctypes: {event} denied",
                          "ctypes can call the C library directly, around every guard; "
                          "no capability grants it")
        decide(verdict, {"op": "ctypes", "target": f"{event} {args[-1]!r}"[:200]})
    return handler


def _on_audit_hook(args: tuple[Any, ...]) -> None:
    decide(Verdict("allow", "audit: hook added", "another audit hook cannot remove this one"),
            {"op": "audit.hook", "target": repr(args[0])[:200] if args else ""})


def _on_kill(group: bool) -> Callable[[tuple[Any, ...]], None]:
    def handler(args: tuple[Any, ...]) -> None:
        pid, sig = int(args[0]), args[1]
        if sig == 0 or (not group and pid == os.getpid()):
            return  # probing for a process, or signalling ourselves
        if group or pid <= 0:
            pgid = (pid or os.getpgrp()) if group else (os.getpgrp() if pid == 0 else -pid)
            ok, target = pid != -1 and _own_group(pgid), f"process group {pgid}"
        else:
            ok, target = _in_own_tree(pid), f"pid {pid}"
        verdict = (Verdict("allow", "kill: own process tree", "signalling the worker's own tree")
                   if ok else Verdict("block", "kill: outside the worker's tree",
                                      "a tool may only signal its own process tree"))
        decide(verdict, {"op": "proc.kill", "target": target})
    return handler


def _own_group(pgid: int) -> bool:
    """Ours when we lead it, or when a descendant of ours leads it."""
    own = os.getpgrp()
    return pgid == own == os.getpid() or (pgid != own and _in_own_tree(pgid))


def _in_own_tree(pid: int) -> bool:
    me = os.getpid()
    for _ in range(64):
        if pid == me:
            return True
        if pid <= 1:
            return False
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                pid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
    return False


def _on_reverse(args: tuple[Any, ...]) -> None:
    g = state.grants
    if not g.net and g.default == "block":
        verdict = Verdict("block", "default_policy=BLOCK", "this tool has no net capability, "
                          "so DNS lookups (a data channel of their own) are refused")
        decide(verdict, {"op": "net.resolve", "target": repr(args[0])[:200]})


_HANDLERS: dict[str, Callable[[tuple[Any, ...]], None]] = {
    "open": _on_open,
    "os.remove": _modify(0, 1, follow=False),
    "os.unlink": _modify(0, 1, follow=False),
    "os.rmdir": _modify(0, 1, follow=False),
    "os.mkdir": _modify(0, 2, follow=False),
    "os.rename": _on_rename,
    "os.link": _on_link,
    "os.symlink": _modify(1, 2, follow=False),
    "os.chmod": _modify(0, 2, follow=True),
    "os.chown": _modify(0, 3, follow=True),
    "os.utime": _modify(0, 3, follow=True),
    "os.truncate": _modify(0, None, follow=True),
    "os.chflags": _modify(0, None, follow=True),
    "os.lchflags": _modify(0, None, follow=False),
    "os.setxattr": _modify(0, None, follow=True),
    "os.removexattr": _modify(0, None, follow=True),
    "shutil.rmtree": _modify(0, 1, follow=False),
    "os.listdir": _on_list,
    "os.scandir": _on_list,
    "socket.connect": _on_connect,
    "socket.sendto": _on_sendto,
    "socket.sendmsg": _on_sendto,
    "socket.bind": _on_bind,
    "socket.getaddrinfo": _on_resolve,
    "socket.gethostbyname": _on_resolve,
    "socket.gethostbyname_ex": _on_resolve,
    "socket.gethostbyaddr": _on_reverse,
    "socket.getnameinfo": _on_reverse,
    "subprocess.Popen": _on_popen,
    "os.exec": _on_exec(0),
    "os.posix_spawn": _on_exec(0),
    "os.spawn": _on_exec(1),
    "os.system": _on_system,
    "os.fork": _on_fork,
    "os.forkpty": _on_fork,
    "sys.addaudithook": _on_audit_hook,
    "os.kill": _on_kill(group=False),
    "os.killpg": _on_kill(group=True),
    **{e: _on_ctypes(e) for e in ("ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle",
                                  "ctypes.cdata", "ctypes.cdata/buffer", "ctypes.string_at",
                                  "ctypes.wstring_at", "ctypes.call_function")},
}


def _hook(event: str, args: tuple[Any, ...]) -> None:
    handler = _HANDLERS.get(event)
    if handler is None or local.busy:
        return
    local.busy = True
    try:
        handler(args)
    except GuardDenied:
        raise
    except Exception as exc:  # a guard that cannot judge refuses (fail closed)
        verdict = Verdict("block", "guard: could not judge", f"{type(exc).__name__}: {exc}")
        raise GuardDenied(verdict, f"FailCore blocked {event}: the guard could not judge "
                                   f"its arguments ({type(exc).__name__}: {exc})") from None
    finally:
        local.busy = False


# --- wrapped functions the audit events cannot see through ------------------------------------


def _guarded_os_open(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
    """``os.open`` whose ``dir_fd`` is honoured: its audit event omits ``dir_fd``."""
    if dir_fd is not None and not local.busy:
        target = path_of(path, dir_fd)
        local.busy = True
        try:
            judge_path("fs.open", target, bool(flags & WRITE_FLAGS))
        finally:
            local.busy = False
        local.skip_open = path
    try:
        return _orig_os_open(path, flags, mode, dir_fd=dir_fd)
    finally:
        local.skip_open = None


def _guarded_fork_exec(*args: Any) -> int:
    """``_posixsubprocess.fork_exec`` raises no audit event of its own."""
    argv, candidates = args[0], args[1]
    recorded_by_popen, local.in_popen = local.in_popen, False
    program: Any = argv[0] if argv else ""
    for candidate in candidates or ():
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            program = candidate
            break
    if not local.busy:
        local.busy = True
        try:
            name = os.fsdecode(os.fspath(program))
            verdict = rules.check_exec(state.grants, name)
            decide(verdict, {"op": "proc.exec", "target": name, "program": name},
                    quiet=recorded_by_popen and verdict.allowed)
        finally:
            local.busy = False
    return _orig_fork_exec(*args)


def _name_checked(method: Callable[..., Any]) -> Callable[..., Any]:
    """A ``socket.socket`` method that judges a host *name* before CPython resolves it:
    the audit event for connect/sendto only fires after that resolution (a DNS query
    that could carry data out). Raw ``_socket.socket`` still resolves first."""
    def checked(self: socket.socket, *args: Any) -> Any:
        address = args[-1] if args else None
        if (not local.busy and isinstance(address, tuple) and len(address) >= 2
                and self.family in (socket.AF_INET, socket.AF_INET6)):
            host = os.fsdecode(address[0]) if isinstance(address[0], bytes) else address[0]
            if isinstance(host, str) and not _numeric_host(host):
                local.busy = True
                try:
                    judge_resolve(host, address[1])
                finally:
                    local.busy = False
        return method(self, *args)
    checked.__name__ = checked.__qualname__ = method.__name__
    checked.__doc__ = method.__doc__
    return checked


def _numeric_host(host: str) -> bool:
    """What CPython's setipaddr takes without a resolver call (inet_pton forms)."""
    if host in ("", "<broadcast>", "255.255.255.255"):
        return True
    for family, text in ((socket.AF_INET, host), (socket.AF_INET6, host)):
        try:
            socket.inet_pton(family, text)
            return True
        except (OSError, ValueError):
            pass
    return False

