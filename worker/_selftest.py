"""The session's start-up self-test: does the kernel refuse what it must, here, now?

Why: a mechanism that exists (an ABI number, an ``unshare`` that returned 0) is not proof
that it holds. The zygote forks a throwaway child that confines itself as a worker does,
with an empty grant set, and then tries what nothing grants:

  * ``connect_before``: connect to a loopback listener the *parent* opened, before
    Landlock (only the network namespace can stop it);
  * ``open``: open a file the parent created outside every grant;
  * ``connect``: connect to a second parent listener, after Landlock (its TCP rule);
  * ``signal``: signal 0 to the zygote (outside the child's Landlock domain; signal 0
    delivers nothing even if it gets through);
  * ``abstract``: connect to an abstract unix socket the zygote listens on;
  * ``listen`` and ``udp``: ``listen(2)`` and a UDP socket (the seccomp filter's);
  * ``exec``: execve ``/bin/true``.

Each probe reports 0 when the operation succeeded, else its errno. The parent also counts
what reached its own listeners, so a connect that got through is seen from outside and not
only on the child's word (``failcore._confinement`` judges the results). Costs one fork and
a Landlock ruleset: a few milliseconds, once per session.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import time
from typing import Any

from failcore_worker import _kernel, _landlock, _seccomp
from failcore_worker.rules import Grants

_TIMEOUT_S = 5.0


def _connect(family: int, address: Any) -> int:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(address)
        return 0
    except TimeoutError:
        return errno.ETIMEDOUT
    except OSError as exc:
        return exc.errno or errno.EIO


def _open(path: str) -> int:
    try:
        os.close(os.open(path, os.O_RDONLY))
        return 0
    except OSError as exc:
        return exc.errno or errno.EIO


def _listen() -> int:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.listen(1)
        return 0
    except OSError as exc:
        return exc.errno or errno.EIO


def _udp() -> int:
    try:
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()
        return 0
    except OSError as exc:
        return exc.errno or errno.EIO


def _signal(pid: int) -> int:
    try:
        os.kill(pid, 0)
        return 0
    except OSError as exc:
        return exc.errno or errno.EIO


def _child(probe: dict[str, Any], implicit: tuple[str, ...], abstract: str, zygote: int,
           out: int) -> None:
    def emit(**values: Any) -> None:
        os.write(out, (json.dumps(values) + "\n").encode())

    emit(connect_before=_connect(socket.AF_INET, ("127.0.0.1", int(probe["port_netns"]))))
    emit(capabilities=_kernel.clear_capabilities().to_wire(),
         no_new_privs=_kernel.set_no_new_privs().to_wire())
    if probe.get("seccomp"):
        emit(seccomp=_seccomp.deny_network_escapes().to_wire())
    abi = _landlock.cached_abi()
    if abi == 0:
        emit(landlock={"in_force": False, "reason": "the kernel has no Landlock (or it is "
                                                    "disabled: check the lsm= boot parameter)"})
    else:
        plan = _landlock.plan(Grants(), (), (*implicit, *_landlock.loader_paths()), abi)
        try:
            _landlock.restrict(plan)
            emit(landlock={"in_force": True, "reason": f"Landlock ABI {abi}",
                           "plan": plan.summary()})
        except OSError as exc:
            emit(landlock={"in_force": False, "reason": f"Landlock ABI {abi}: {exc}"})
    emit(open=_open(str(probe["path"])),
         connect=_connect(socket.AF_INET, ("127.0.0.1", int(probe["port_landlock"]))),
         signal=_signal(zygote), abstract=_connect(socket.AF_UNIX, abstract))
    emit(listen=_listen(), udp=_udp())
    try:
        os.execv("/bin/true", ["/bin/true"])
    except OSError as exc:
        emit(exec=exc.errno or errno.EIO, done=True)


def run(probe: dict[str, Any], implicit: tuple[str, ...]) -> dict[str, Any]:
    """Fork the throwaway child, collect what it reports (in the zygote, before any worker)."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    abstract = f"\0failcore-selftest-{os.getpid()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(abstract)
    listener.listen(1)
    zygote = os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            listener.close()
            _child(probe, implicit, abstract, zygote, write_end)
        finally:
            os._exit(0)
    os.close(write_end)
    data = b""
    deadline = time.monotonic() + _TIMEOUT_S
    try:
        # Until "done" (exec was refused) or end of file (exec closed the pipe: it ran);
        # not until the child has exited, which takes longer than the test itself. The
        # zygote's reaping loop collects it.
        while len(data) < 1 << 16 and b'"done": true' not in data:
            remaining = deadline - time.monotonic()
            ready = select.select([read_end], [], [], max(remaining, 0))[0] if remaining > 0 else []
            if not ready:
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_end)
        listener.close()
        if os.waitpid(pid, os.WNOHANG)[0] == 0:
            os.kill(pid, signal.SIGKILL)  # done with it; the zygote's reaper waits for it
    result: dict[str, Any] = {}
    for line in data.splitlines():
        try:
            result.update(json.loads(line))
        except ValueError:
            continue
    if "open" in result:
        result.setdefault("exec", 0)  # the child got to exec and wrote nothing after: it ran
    return result
