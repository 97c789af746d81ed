"""Start a third-party program confined: the plan, the launcher, the handshake.

Why this shape: the MCP SDK's ``stdio_client`` already spawns a server in its own session
(process group) and shuts it down carefully (stdin closed, then SIGTERM, then SIGKILL to
the group). FailCore only changes *what* it spawns: ``python -I -m
failcore_worker.confined_exec SOCKET``, which connects back over a private unix socket,
receives the plan, confines itself, reports, and execs the real command. The parent
checks the peer with SO_PEERCRED (the process it spawned, nobody else), and learns
from the close-on-exec channel whether the exec happened: end of file after
``exec.ready``.

The program's environment is built here from nothing: ``PATH``, ``LANG``, ``HOME`` and
``TMPDIR`` (a private scratch directory, removed at the end), the variables its
``env:NAME`` capabilities grant (from the guard's own environment), and the proxy
variables the launcher adds once the proxy's port exists.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from failcore._errors import ConfinementRefused, FailCoreError
from failcore.mcp_guard._guard_policy import GuardPolicy
from failcore.mcp_guard._runtime import RuntimePlan, plan_runtime
from failcore_worker import protocol
from failcore_worker.protocol import ExecPlan, ExecReport
from failcore_worker.rules import env_matches

__all__ = ["Launch", "Started", "prepare"]

_MB = 1024 * 1024
# Layers a guard with ``confinement = "require"`` refuses to run without.
REQUIRED = ["netns", "landlock", "no_new_privs", "capabilities"]
HANDSHAKE_TIMEOUT_S = 20.0


@dataclass
class Started:
    """The confined program is running: its pid, what is in force, and (with network
    grants) the listening socket inside its namespace that the proxy serves."""

    pid: int
    report: ExecReport
    listener: socket.socket | None = None


@dataclass
class Launch:
    """Everything prepared before the spawn; ``close()`` removes the private directory."""

    command: list[str]
    plan: ExecPlan
    runtime: RuntimePlan
    workdir: str
    scratch: str
    control: socket.socket
    launcher_argv: list[str] = field(default_factory=list)

    def handshake(self, timeout: float = HANDSHAKE_TIMEOUT_S) -> Started:
        """Blocking: accept the launcher, send the plan, collect its report; return once
        the program has been exec'd. Raises ConfinementRefused (launcher refused, or
        nothing connected in time)."""
        deadline = time.monotonic() + timeout
        self.control.settimeout(timeout)
        try:
            conn, _ = self.control.accept()
        except TimeoutError:
            raise ConfinementRefused(
                f"the confined launcher did not start within {timeout:.0f} s "
                f"({' '.join(self.launcher_argv)})") from None
        with conn:
            pid, _, _ = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            conn.settimeout(max(deadline - time.monotonic(), 0.1))
            conn.sendall(protocol.encode_data(protocol.EXEC_PLAN, dict(self.plan)))
            listener: socket.socket | None = None
            try:
                while True:
                    kind, body, fds = _recv(conn)
                    if kind == protocol.EXEC_LISTENER and fds and listener is None:
                        listener = socket.socket(fileno=fds[0])
                        for extra in fds[1:]:
                            os.close(extra)
                        continue
                    for fd in fds:
                        os.close(fd)
                    if kind == protocol.EXEC_FAILED:
                        raise ConfinementRefused(
                            f"refused to start {self.command[0]!r} ({body.get('stage')}): "
                            f"{body.get('message')}. Set [server] confinement = \"auto\" in the "
                            "guard policy to run with what this kernel offers")
                    if kind != protocol.EXEC_READY:
                        raise ConfinementRefused(f"unexpected launcher message {kind!r}")
                    report: ExecReport = body  # type: ignore[assignment]
                    # End of file: the channel closed on exec. Another frame: exec failed.
                    tail = conn.recv(protocol.HEADER.size + protocol.MAX_EXEC_FRAME,
                                     socket.MSG_PEEK)
                    if tail:
                        kind, body, _ = _recv(conn)
                        raise ConfinementRefused(
                            f"could not start {self.command[0]!r}: {body.get('message')}")
                    report["pid"] = pid
                    return Started(pid, report, listener)
            except BaseException:
                if listener is not None:
                    listener.close()
                raise

    def close(self) -> None:
        self.control.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _recv(conn: socket.socket) -> tuple[str, dict[str, Any], list[int]]:
    """One JSON frame, with any descriptors sent alongside its first bytes."""
    try:
        head, fds, _, _ = socket.recv_fds(conn, protocol.HEADER.size, 4)
    except TimeoutError:
        raise ConfinementRefused("the confined launcher stopped answering") from None
    if not head:
        raise ConfinementRefused("the confined launcher exited before reporting (see the "
                                 "server's stderr)")
    while len(head) < protocol.HEADER.size:
        more = conn.recv(protocol.HEADER.size - len(head))
        if not more:
            raise ConfinementRefused("the confined launcher closed mid-frame")
        head += more
    (size,) = protocol.HEADER.unpack(head)
    if size > protocol.MAX_EXEC_FRAME:
        raise ConfinementRefused(f"launcher frame of {size} bytes is too large")
    payload = b""
    while len(payload) < size:
        chunk = conn.recv(size - len(payload))
        if not chunk:
            raise ConfinementRefused("the confined launcher closed mid-frame")
        payload += chunk
    try:
        kind, body = protocol.decode_data(payload)
    except protocol.BadFrame as exc:
        raise ConfinementRefused(f"malformed launcher frame: {exc}") from None
    return kind, body, list(fds)


def _environment(policy: GuardPolicy, scratch: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8",
           "HOME": scratch, "TMPDIR": scratch}
    for pattern in policy.env_names():
        for name, value in os.environ.items():
            if env_matches(pattern, name):
                env[name] = value
    return env


def prepare(command: list[str], policy: GuardPolicy) -> Launch:
    """Plan the confinement of ``command`` under ``policy`` and open the control socket.

    Raises FileNotFoundError when the program is not on PATH.
    """
    if not command:
        raise FailCoreError("no server command given: failcore mcp guard --policy FILE -- "
                            "COMMAND ARGS...")
    workdir = tempfile.mkdtemp(prefix="failcore-mcp-guard-")
    try:
        scratch = os.path.join(workdir, "home")
        os.mkdir(scratch, 0o700)
        env = _environment(policy, scratch)
        from failcore._capabilities import FsRead, FsWrite

        caps = policy.policy.intersect(policy.server.capabilities)[0]
        runtime = plan_runtime(
            command, path_env=env["PATH"], scratch=scratch,
            read=[c.path for c in caps if isinstance(c, FsRead)],
            write=[c.path for c in caps if isinstance(c, FsWrite)],
            programs=policy.programs(), runtime_paths=policy.server.runtime_paths)
        server = policy.server
        plan: ExecPlan = {
            "argv": [runtime.executable, *command[1:]],
            "env": env,
            "cwd": scratch,
            "netns": True,
            "proxy": policy.has_network(),
            "landlock_paths": runtime.rules(),
            "connect_ports": [],
            "rlimits": {"data_bytes": server.memory_mb * _MB, "processes": server.processes,
                        "open_files": server.open_files,
                        "file_size_bytes": server.file_size_mb * _MB},
            "uid": None,
            "gid": None,
            "require": REQUIRED if server.confinement == "require" else [],
        }
        control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        path = os.path.join(workdir, "control")
        control.bind(path)
        control.listen(1)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    launcher = [sys.executable, "-I", "-m", "failcore_worker.confined_exec", path]
    return Launch(list(command), plan, runtime, workdir, scratch, control, launcher)
