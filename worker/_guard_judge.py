"""The guards' state and judging, shared by the audit hook and the wrapped functions.

Private to ``failcore_worker.guards``. Everything here runs inside the audit hook, so it imports
nothing at call time and keeps the common case (a stdlib import reading its own files)
to a string prefix test.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import threading
from typing import Any, cast

from failcore_worker import rules
from failcore_worker._guard_names import NameBook
from failcore_worker.protocol import GuardEvent, GuardSubject
from failcore_worker.rules import Grants, Verdict

MAX_EVENTS = 10_000
# Refusals are never lost to the event cap: past it, the first MAX_BLOCKS refusals are
# still kept, and every one is counted (State.block_total).
MAX_BLOCKS = 64
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
_QUIET = frozenset({rules.RULE_IMPLICIT_READ, rules.RULE_SCRATCH})
orig_getaddrinfo = socket.getaddrinfo


class GuardDenied(PermissionError):
    """An operation inside the tool was blocked. ``verdict`` names the rule and the fix."""

    def __init__(self, verdict: Verdict, message: str) -> None:
        super().__init__(errno.EACCES, message)
        self.verdict = verdict
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:
        return GuardDenied, (self.verdict, self.message)


class Local(threading.local):
    busy = False  # inside the hook: its own file and DNS work is not judged again
    skip_open: object = None  # the path object os.open already judged (dir_fd case)
    in_popen = False  # subprocess.Popen was judged; its fork_exec is not recorded twice


@dataclasses.dataclass
class State:
    installed: bool = False
    base: Grants = dataclasses.field(default_factory=Grants)
    grants: Grants = dataclasses.field(default_factory=Grants)
    base_dir: str = ""
    scratch: tuple[str, ...] = ()
    fast_read: tuple[str, ...] = ()
    events: list[GuardEvent] = dataclasses.field(default_factory=list)
    dropped: int = 0
    late_blocks: list[GuardEvent] = dataclasses.field(default_factory=list)
    block_total: int = 0
    names: NameBook = dataclasses.field(default_factory=NameBook)


state = State()
local = Local()


def decide(verdict: Verdict, subject: GuardSubject, quiet: bool = False) -> None:
    event = cast(GuardEvent, subject)  # completed in place: this runs inside the audit hook
    block = verdict.action == "block"
    if block or not quiet:
        event["action"], event["rule"], event["reason"] = (
            verdict.action, verdict.rule, verdict.reason)
        if len(state.events) < MAX_EVENTS:
            state.events.append(event)
        elif block and len(state.late_blocks) < MAX_BLOCKS:
            state.late_blocks.append(event)
        else:
            state.dropped += 1
    if block:
        state.block_total += 1
        raise GuardDenied(verdict, f"FailCore blocked {event.get('op')} {event.get('target')}: "
                                   f"{verdict.rule}: {verdict.reason}")


def default(what: str, add: str) -> Verdict:
    return rules.default_verdict(state.grants, what, add)


def _fd_path(fd: int) -> str | None:
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return target if target.startswith("/") else None


def path_of(path: Any, dir_fd: Any = None) -> str | None:
    """The path an audited call acts on, or None when it names no file (a socket fd)."""
    if isinstance(path, int):
        return _fd_path(path)
    if path is None:
        path = "."
    text = os.fsdecode(os.fspath(path))
    if isinstance(dir_fd, int) and dir_fd >= 0 and not text.startswith("/"):
        base = _fd_path(dir_fd)
        return os.path.join(base, text) if base is not None else "\0"
    return text


def judge_path(op: str, path: str | None, write: bool, follow: bool = True) -> None:
    if path is None:
        return
    if not write and path.startswith(state.fast_read) and "/./" not in path \
            and "/../" not in path and not path.endswith(("/.", "/..")):
        # Implicit read, textually: a file inside the interpreter's trees. Only prefixes
        # no grant can write to are used (guards._activate), so no tool planted a link.
        return
    real = rules.real_path(path, None, follow)
    if real is None:
        verdict = Verdict("block", "fs: invalid path", f"{path!r} is not a usable path")
        decide(verdict, {"op": op, "target": path, "path": path, "write": write})
        return
    verdict = rules.check_resolved_path(state.grants, real, write, state.scratch, shown=path)
    decide(verdict, {"op": op, "target": real, "path": real, "write": write},
            quiet=verdict.rule in _QUIET)


def judge_exec(program: Any, target: str = "") -> None:
    name = os.fsdecode(os.fspath(program))
    verdict = rules.check_exec(state.grants, name)
    decide(verdict, {"op": "proc.exec", "target": target or name, "program": name})


def judge_address(sock: Any, address: Any, op: str) -> None:
    family = getattr(sock, "family", None)
    if family in (socket.AF_INET, socket.AF_INET6):
        host, port = address[0], int(address[1])
        host = os.fsdecode(host) if isinstance(host, bytes) else str(host)
        literal = {"": "0.0.0.0", "<broadcast>": "255.255.255.255"}.get(host, host)
        ip = rules.parse_ip(literal)
        if ip is not None:
            _judge_ip(op, str(ip), port, host)
            return
        # Python resolved the name itself before this event (the socket class wrapper in
        # guards judged the name first); judge every address it may have picked (a
        # resolver that answers differently next time is a known TOCTOU gap).
        judge_resolve(host, port)
        for *_, sockaddr in orig_getaddrinfo(host, port, family, socket.SOCK_STREAM):
            _judge_ip(op, str(rules.parse_ip(str(sockaddr[0]))), port, host, (host,))
        return
    if family == socket.AF_UNIX:
        path = os.fsdecode(address) if isinstance(address, (str, bytes)) else ""
        if path.startswith("\0") or not path:
            target = f"unix:@{path[1:]}"
            decide(default(f"no capability covers the abstract socket {target}",
                             "a default_policy that allows it"), {"op": op, "target": target})
            return
        judge_path("fs.open", path, write=True)
        return
    target = f"family {family} {address!r}"[:200]
    decide(default(f"no capability covers a {target} socket", "a default_policy that allows it"),
            {"op": op, "target": target})


def _judge_ip(op: str, ip: str, port: int, shown: str, names: tuple[str, ...] = ()) -> None:
    known = names or state.names.get(ip)
    verdict = rules.check_connect(state.grants, ip, port, known)
    target = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
    decide(verdict, {"op": op, "target": target, "host": ip, "port": port, "names": list(known)})


def judge_resolve(host: Any, port: Any) -> None:
    if host is None:
        return
    name = os.fsdecode(host) if isinstance(host, bytes) else str(host)
    number = port if isinstance(port, int) else int(port) if str(port).isdigit() else 0
    verdict = rules.check_resolve(state.grants, name, number)
    decide(verdict, {"op": "net.resolve", "target": name, "host": name, "port": number},
           quiet=verdict.rule == rules.RULE_LITERAL)
