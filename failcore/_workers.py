"""Worker handles and the pool: prespawned idle workers, warm per-tool workers, tree kills.

Guarantees: a worker handed out is used by one call at a time; a worker whose call
failed in a way that may leave it inconsistent (timeout, crash, oversize output, a
violation) is killed with its whole process tree and never reused; a fresh (``call``)
worker is never reused at all.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from failcore._errors import WorkerCrashed
from failcore._zygote import Zygote
from failcore_worker import _tree
from failcore_worker._guard_names import NameBook

if TYPE_CHECKING:
    from failcore._backend import ToolSpec


@dataclass(eq=False)
class Worker:
    """A worker process and the parent's end of its channel.

    ``spec``: the tool it locked down for (None while idle); ``pending_init``: its ``init``
    frame when the next exchange must send it first; ``busy_since``: set while a call is in
    flight (the watchdog looks only at those); ``proc``: the watchdog's psutil handle;
    ``chan_fd``: its channel's descriptor number inside the worker (``leftovers``).
    """

    pid: int
    chan: socket.socket
    base_dir: str
    name: str
    zygote: Zygote | None = None
    tool: str | None = None
    isolation: str = "call"
    spec: ToolSpec | None = None
    dead: bool = False
    kill_reason: str | None = None
    kill_detail: str = ""
    busy_since: float | None = None
    init_bytes: int = 0
    pending_init: bytes | None = None
    proc: psutil.Process | None = None
    # Names the parent itself resolved for this worker's tool (the socket broker's book:
    # a connect is judged by the names that led to its address, never by the worker's word).
    names: NameBook = field(default_factory=NameBook)
    chan_fd: int = -1  # the channel's number inside the worker (reported by the zygote)
    # The parent's descriptor of /proc/PID (``leftovers``): opened at the first check,
    # it names this process for good (a reused pid is not it), closed with the channel.
    proc_dir: int = -1

    def kill(self, reason: str, detail: str = "") -> None:
        """Kill the worker and every process below it. Safe from any thread, idempotent."""
        if self.kill_reason is None:
            self.kill_reason = reason
            self.kill_detail = detail
        kill_tree(self.pid)
        self.dead = True
        try:
            self.chan.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid``: from the kernel's children lists, else from psutil."""
    try:
        return _tree.descendants(pid)
    except _tree.NoChildrenFile:
        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and any descendant that left it (setsid).

    Descendants are listed before the group is killed: once the worker dies its
    orphans are re-parented and can no longer be found from it.
    """
    stragglers = descendants(pid)
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for child in stragglers:
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass


_NULL = os.stat(os.devnull).st_rdev
_STDIO = ("fd/0", "fd/1", "fd/2")


def leftovers(worker: Worker) -> str | None:
    """What a finished call left running in a warm worker, or None when it left nothing.

    Read by the parent from /proc (trusted: not the worker's word). Between calls a worker
    is one thread with no children, holding stdin/stdout/stderr on ``/dev/null`` and its
    channel, whose number the zygote reported before any tool code ran. A thread, child
    process or descriptor beyond that could act on the next call (swap its scratch dir,
    keep serving on a socket, hand call N's data to call N+1): such a worker is retired,
    not reused. On the warm path, so cheap: the thread count is the link count of
    ``task/``, the descriptor count the size of ``fd/`` (Linux 6.2+; else a listing), plus
    the children list and a stat of descriptors 0-2 (a socket dup2'd over stdout keeps the
    count). A worker still removing a scratch directory its tool filled may hold a
    descriptor for that moment and is retired too: that costs a new worker, not a call.
    """
    pid = worker.pid
    proc = f"/proc/{pid}"
    try:
        pdir = worker.proc_dir
        if pdir < 0:
            pdir = worker.proc_dir = os.open(proc, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        threads = os.stat("task", dir_fd=pdir).st_nlink - 2
        if threads != 1:
            return f"{threads - 1} thread(s) still running after the call"
        fd = os.open(f"task/{pid}/children", os.O_RDONLY, dir_fd=pdir)
        try:
            kids = os.read(fd, 64).split()
        finally:
            os.close(fd)
        if kids:
            return f"child process {int(kids[0])} still running after the call"
        count = os.stat("fd", dir_fd=pdir).st_size
        for std in _STDIO:
            if os.stat(std, dir_fd=pdir).st_rdev != _NULL:
                return (f"descriptor {std[3:]} ({os.readlink(std, dir_fd=pdir)}) replaced "
                        "during the call")
        if count == 4:
            return None
        fds = os.listdir(proc + "/fd")
    except (OSError, ValueError) as exc:
        return f"its /proc entries could not be read ({exc})"
    extra = sorted(int(n) for n in fds if n not in ("0", "1", "2", str(worker.chan_fd)))
    if not extra:
        return None
    shown = []
    for n in extra[:3]:
        try:
            shown.append(f"{n} ({os.readlink(f'{proc}/fd/{n}')})")
        except OSError:
            shown.append(str(n))
    more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
    return f"descriptor {', '.join(shown)}{more} still open after the call"


class Pool:
    """Forks workers through the zygote; keeps ``prespawn`` idle ones ready."""

    def __init__(self, root: str, prespawn: int, uid: int | None,
                 resolve: tuple[str, ...] = (), options: dict[str, Any] | None = None,
                 name: str = "zygote") -> None:
        self._zygote_lock = threading.Lock()
        self._resolve = resolve
        self._log = os.path.join(root, f"{name}.log")
        self.zygote = Zygote(self._log, resolve, options)
        # A replacement zygote (the first one died) prepares the same way; the session's
        # self-test ran once, in the first.
        self._options = {k: v for k, v in (options or {}).items() if k != "selftest"}
        self._root = root
        self._prespawn = prespawn
        self._uid = uid
        self._idle: collections.deque[Worker] = collections.deque()
        self._lock = threading.Lock()
        self._refill = threading.Event()
        self._closed = False
        self._all: set[Worker] = set()
        self._counter = 0
        self._cleanup: collections.deque[Worker] = collections.deque()
        # Per tool: workers already sent their ``init`` (locked down and loaded in the
        # background), each to serve exactly one fresh call.
        self._ready: dict[str, collections.deque[Worker]] = {}
        self._builders: dict[str, Callable[[Worker], bytes]] = {}
        self._thread = threading.Thread(target=self._maintain, name="failcore-pool", daemon=True)
        self._thread.start()
        self._refill.set()

    def _new(self, warm_up: bool = True) -> Worker:
        base = tempfile.mkdtemp(prefix="w", dir=self._root)
        if self._uid is not None:
            os.chown(base, self._uid, -1)
        pid, chan, chan_fd = self._fork(warm_up)
        with self._lock:
            self._counter += 1
            worker = Worker(pid=pid, chan=chan, base_dir=base, name=f"w{self._counter}",
                            zygote=self.zygote, chan_fd=chan_fd)
            self._all.add(worker)
        return worker

    def _fork(self, warm_up: bool = True) -> tuple[int, socket.socket, int]:
        """Fork through the zygote; if it died (killed from outside, OOM), start a new one."""
        zygote = self.zygote
        try:
            return zygote.fork(warm_up)
        except WorkerCrashed:
            if zygote.proc.poll() is None or self._closed:
                raise
        self._replace_zygote(zygote)
        return self.zygote.fork(warm_up)

    def replace_dead_zygote(self) -> None:
        """If the zygote died, start a new one and drop the workers it had forked (they
        died with it, PR_SET_PDEATHSIG), so they are not handed out."""
        zygote = self.zygote
        if zygote.proc.poll() is not None and not self._closed:
            self._replace_zygote(zygote)

    def _replace_zygote(self, zygote: Zygote) -> None:
        with self._zygote_lock:
            if self.zygote is zygote:
                zygote.close()
                self.zygote = Zygote(self._log, self._resolve, self._options)
            with self._lock:
                stale = [w for w in self._idle]
                self._idle.clear()
                for queue in self._ready.values():
                    stale.extend(queue)
                    queue.clear()
            for worker in stale:
                worker.dead = True
                with self._lock:
                    self._cleanup.append(worker)
        self._refill.set()

    def _maintain(self) -> None:
        while True:
            self._refill.wait()
            self._refill.clear()
            while not self._closed:
                self._drain_cleanup()
                job = self._next_job()
                if job is None:
                    break
                try:
                    worker = self._new(warm_up=not job)
                    if job:
                        frame = self._builders[job](worker)
                        worker.chan.sendall(frame)
                except Exception:  # noqa: BLE001 - surfaced by the next take()
                    break
                with self._lock:
                    if self._closed:
                        self._cleanup.append(worker)
                        break
                    (self._ready[job] if job else self._idle).append(worker)
            self._drain_cleanup()
            if self._closed:
                return

    def _next_job(self) -> str | None:
        """What to fork next: "" for a generic idle worker, a tool name, or None."""
        with self._lock:
            if len(self._idle) < self._prespawn:
                return ""
            for tool, queue in self._ready.items():
                if len(queue) < self._prespawn:
                    return tool
        return None

    def want_ready(self, tool: str, init_frame: Callable[[Worker], bytes]) -> None:
        """Keep ``prespawn`` workers of ``tool`` locked down and loaded ahead of its calls."""
        with self._lock:
            if tool in self._ready or self._prespawn == 0:
                return
            self._builders[tool] = init_frame
            self._ready[tool] = collections.deque()
        self._refill.set()

    def take_ready(self, tool: str) -> Worker | None:
        """A worker already initialised for ``tool``, or None."""
        with self._lock:
            queue = self._ready.get(tool)
            worker = queue.popleft() if queue else None
        if worker is not None:
            self._refill.set()
        return worker

    def take(self) -> Worker:
        """An idle, not yet locked-down worker (prespawned when possible)."""
        with self._lock:
            worker = self._idle.popleft() if self._idle else None
        self._refill.set()
        return worker if worker is not None else self._new()

    def retire(self, worker: Worker) -> None:
        """Stop a worker (its whole tree) and remove its directory, off the caller's hot path."""
        with self._lock:
            self._cleanup.append(worker)
        self._refill.set()

    def _drain_cleanup(self) -> None:
        while True:
            with self._lock:
                if not self._cleanup:
                    return
                worker = self._cleanup.popleft()
                self._all.discard(worker)
            if not worker.dead:
                worker.kill("retired")
            worker.chan.close()
            if worker.proc_dir >= 0:
                os.close(worker.proc_dir)
                worker.proc_dir = -1
            shutil.rmtree(worker.base_dir, ignore_errors=True)
            self.zygote.forget(worker.pid)

    def wait_status(self, worker: Worker, timeout: float) -> int | None:
        return self.zygote.wait_exit(worker.pid, timeout)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers = list(self._all)
            self._idle.clear()
        for worker in workers:
            worker.kill("session closed")
            with self._lock:
                self._cleanup.append(worker)
        self._refill.set()
        self._thread.join(10)
        self._drain_cleanup()
        self.zygote.close()

    def busy_workers(self, predicate: Callable[[Worker], bool]) -> list[Worker]:
        with self._lock:
            return [w for w in self._all if predicate(w)]
