"""Parent side of the zygote: start it, ask it to fork workers, learn when they exit."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import failcore_worker
from failcore._errors import WorkerCrashed
from failcore_worker import protocol

# The fixed environment of every worker process before grants are applied.
MINIMAL_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
# The worker package's own directory: the zygote loads it from there by path, so it never
# depends on sys.path (a user's ``worker.py`` or a source checkout cannot stand in for it).
_WORKER_PACKAGE = os.path.dirname(os.path.abspath(failcore_worker.__file__))
_BOOT = (
    "import importlib.util as u, sys; "
    "s = u.spec_from_file_location('failcore_worker', {init!r}, "
    "submodule_search_locations=[{pkg!r}]); m = u.module_from_spec(s); "
    "sys.modules['failcore_worker'] = m; s.loader.exec_module(m); "
    "from failcore_worker.zygote import serve; serve({fd}, {root!r}, {resolve!r}, {options!r})"
)


class Zygote:
    """A clean interpreter started with ``sys.executable -I`` that forks workers.

    ``options`` (plain data, see ``failcore_worker.zygote``): ``netns`` to enter an empty
    network namespace once, ``userns`` whether a user namespace may be used for it,
    ``kernel`` to prepare Landlock, ``selftest`` the probe targets. ``report`` is what the
    zygote found (``failcore._confinement`` reads it).
    """

    def __init__(self, log_path: str, resolve: tuple[str, ...] = (),
                 options: dict[str, Any] | None = None) -> None:
        ctl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        code = _BOOT.format(init=os.path.join(_WORKER_PACKAGE, "__init__.py"),
                            pkg=_WORKER_PACKAGE, fd=child.fileno(),
                            root=os.path.dirname(os.path.abspath(log_path)),
                            resolve=tuple(resolve), options=dict(options or {}))
        self._log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", code],
                pass_fds=[child.fileno()], env=dict(MINIMAL_ENV), cwd="/",
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
            )
        child.close()
        self._ctl = ctl
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._forked: dict[int, tuple[int, int]] = {}
        self._exited: dict[int, int] = {}
        self._next = 0
        self._closed = False
        ctl.settimeout(30)
        try:
            ready = protocol.decode_control(ctl.recv(1 << 20))
            if ready[0] != "ready":
                raise protocol.BadFrame(f"expected ready, got {ready[0]}")
            self.pid = ready[1]
            self.report: dict[str, Any] = ready[2]
        except (OSError, protocol.BadFrame) as exc:
            self.proc.kill()
            self.proc.wait()
            raise WorkerCrashed(f"the worker zygote failed to start: {self.log_tail()}") from exc
        ctl.settimeout(None)
        self._reader = threading.Thread(target=self._read, name="failcore-zygote", daemon=True)
        self._reader.start()

    def log_tail(self, n: int = 2000) -> str:
        try:
            return Path(self._log_path).read_bytes()[-n:].decode(errors="replace") or "(no output)"
        except OSError:
            return "(no log)"

    def _read(self) -> None:
        while True:
            try:
                data = self._ctl.recv(4096)
            except OSError:
                data = b""
            if not data:
                with self._cond:
                    self._closed = True
                    self._cond.notify_all()
                return
            try:
                msg = protocol.decode_control(data)
            except protocol.BadFrame:
                continue  # not the zygote's word: ignored, never unpickled
            with self._cond:
                if msg[0] == "forked":
                    self._forked[msg[1]] = (msg[2], msg[3])
                elif msg[0] == "exited":
                    self._exited[msg[1]] = msg[2]
                    while len(self._exited) > 4096:  # nobody asked about the oldest ones
                        del self._exited[next(iter(self._exited))]
                self._cond.notify_all()

    def fork(self, warm_up: bool = True) -> tuple[int, socket.socket, int]:
        """A new worker process (waiting for ``init``), the parent end of its channel, and
        the channel's descriptor number inside the worker."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with self._lock:
            self._next += 1
            wid = self._next
            try:
                socket.send_fds(self._ctl, [protocol.encode_control("fork", wid, warm_up)],
                                [theirs.fileno()])
            except OSError as exc:
                ours.close()
                raise WorkerCrashed(f"the worker zygote is gone: {self.log_tail()}") from exc
            finally:
                theirs.close()
        deadline = time.monotonic() + 30
        with self._cond:
            while wid not in self._forked:
                if self._closed or time.monotonic() > deadline:
                    ours.close()
                    raise WorkerCrashed(f"the worker zygote did not fork: {self.log_tail()}")
                self._cond.wait(0.5)
            pid, chan_fd = self._forked.pop(wid)
            return pid, ours, chan_fd

    def wait_exit(self, pid: int, timeout: float) -> int | None:
        """The wait status of worker ``pid`` once the zygote reaped it, or None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while pid not in self._exited:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    return None
                self._cond.wait(remaining)
            return self._exited.pop(pid)

    def forget(self, pid: int) -> None:
        with self._cond:
            self._exited.pop(pid, None)

    def close(self) -> None:
        try:
            self._ctl.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._ctl.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(2)
        try:
            os.unlink(self._log_path)
        except OSError:
            pass
