"""The local backend: workers forked on this machine by a clean zygote, watched from outside.

Parts: ``_zygote`` (the clean interpreter that forks workers), ``_workers`` (worker handles,
the prespawned pool, tree kills), ``_watchdog`` (layer 4), ``_confinement`` (the kernel
layers: the zygote's self-test, each tool's Landlock plan). This module leases them per
tool and runs one exchange: the frame goes out, the reply comes back within the deadline,
and the parent never reads more than the tool's output bound. Tools whose workers keep
the host's network (``ToolSpec.network == "host"``) get a second pool, whose zygote stays
in the host namespace; it starts when the first such tool is prepared.

Guarantees: a worker serves one call at a time; a tool has at most ``max_workers_per_tool``
warm workers; a worker whose call failed in a way that may leave it inconsistent (timeout,
crash, oversize output, a violation) is killed with its whole tree and never reused; a
fresh (``call``) worker is never reused at all; a warm worker whose call left a thread,
a child or a descriptor behind (``_workers.leftovers``) is retired, not reused.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

from failcore import _confinement
from failcore._backend import Lease, Outcome, ToolSpec, blocked_call, read_reply
from failcore._broker import Broker, send_answer
from failcore._confinement import Confinement, ToolConfinement
from failcore._errors import (
    CallCancelled,
    FailCoreError,
    ResourceLimitExceeded,
    SecurityError,
    ToolTimeout,
    WorkerCrashed,
)
from failcore._privilege import PrivilegePlan
from failcore._privilege import plan as privilege_plan
from failcore._watchdog import Watchdog
from failcore._workers import Pool, Worker, leftovers
from failcore._zygote import MINIMAL_ENV
from failcore_worker import _landlock, protocol
from failcore_worker.rules import env_matches, under

# Room for the reply envelope and guard events on top of the tool's own output limit.
_ENVELOPE_BYTES = 256 * 1024

# Configuration files every worker may read (DNS, TLS roots, time zones) and harmless devices.
# /etc/ssl is added entry by entry, without its private keys (implicit_reads).
_SYSTEM_READ = (
    "/usr/lib/ssl", "/usr/share/ca-certificates", "/etc/ca-certificates",
    "/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf",
    "/etc/services", "/etc/protocols", "/etc/localtime", "/usr/share/zoneinfo",
    "/dev/null", "/dev/urandom", "/dev/random", "/dev/zero",
)


@dataclass
class _Warm:
    """A tool's warm workers: idle ones, and how many exist (at most max_workers_per_tool)."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    free: list[Worker] = field(default_factory=list)
    count: int = 0


class LocalBackend:
    """Runs workers on this machine. ``prespawn``: idle workers kept ready for fresh calls;
    ``max_workers_per_tool``: warm workers a tool may have at once; ``worker_user``: see
    ``Session``; ``watchdog_interval_s``: how often busy workers are looked at from outside;
    ``confinement``: ``"auto"``, ``"require"`` or ``"off"`` (see ``Session``)."""

    def __init__(self, *, prespawn: int = 2, max_workers_per_tool: int = 2,
                 worker_user: str | int | None = "auto",
                 watchdog_interval_s: float = 0.05, confinement: str = "auto") -> None:
        if prespawn < 0 or max_workers_per_tool < 1:
            raise ValueError("prespawn must be >= 0 and max_workers_per_tool >= 1")
        self._mode = _confinement.check_mode(confinement)
        self.privilege: PrivilegePlan = privilege_plan(worker_user)
        self.confinement: Confinement = _confinement.off("not started", self.privilege)
        # The host-network pool and its watchdog, once a tool needs them.
        self._host: list[tuple[Pool, Watchdog]] = []
        self._plans: dict[str, tuple[ToolSpec, _landlock.Plan | None]] = {}
        self._prespawn = prespawn
        self._max_workers = max_workers_per_tool
        self._watchdog_interval = watchdog_interval_s
        self._warm: dict[str, _Warm] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._key = b""
        self._pool: Pool | None = None
        self._watchdog: Watchdog | None = None
        self._root: str | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self, key: bytes) -> None:
        self._key = key
        # tmpfs when there is one: a per-call directory costs ~10 us there, ~160 us on disk.
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else None
        self._root = tempfile.mkdtemp(prefix="failcore-", dir=shm)
        os.chmod(self._root, 0o711)
        self._implicit_read = implicit_reads()
        # Only entries the worker may read: an import that misses would otherwise list a
        # directory the guards refuse (and fail the call) even when the tool expects it.
        self._sys_path = [p for p in sys.path
                          if p and any(under(os.path.realpath(p), r) for r in self._implicit_read)]
        try:
            self._pool = self._start_pool()
            self._watchdog = Watchdog(self._pool, self._watchdog_interval)
        except BaseException:
            self.close()
            raise
        self._finalizer = weakref.finalize(self, LocalBackend._finalize, self._pool,
                                           self._watchdog, self._root, self._host)

    def _start_pool(self) -> Pool:
        """The confined pool: its zygote enters the empty network namespace and runs the
        self-test (``_confinement``) before it forks any worker."""
        assert self._root is not None
        kernel = self._mode != "off"
        probe = _confinement.Probe(self._root) if kernel else None
        try:
            pool = Pool(self._root, self._prespawn, self.privilege.uid,
                        tuple(self._implicit_read), {
                            "netns": kernel, "userns": self.privilege.uid is None,
                            "kernel": kernel,
                            "selftest": probe.options() if probe is not None else None})
            arrived = probe.arrived() if probe is not None else (0, 0)
        finally:
            if probe is not None:
                probe.close()
        self.confinement = _confinement.judge(self._mode, pool.zygote.report, arrived,
                                              self.privilege)
        return pool

    def _host_pool(self) -> Pool:
        """The pool for host-network tools, started once, when the first one is prepared."""
        with self._lock:
            if self._closed:
                raise FailCoreError("the session is closed")
            if not self._host:
                assert self._root is not None
                pool = Pool(self._root, self._prespawn, self.privilege.uid,
                            tuple(self._implicit_read), {"kernel": self._mode != "off"},
                            name="zygote-host")
                self._host.append((pool, Watchdog(pool, self._watchdog_interval)))
            return self._host[0][0]

    def _pool_for(self, spec: ToolSpec) -> Pool:
        return self._host_pool() if spec.network == "host" else self._started()

    @staticmethod
    def _finalize(pool: Pool | None, watchdog: Watchdog | None, root: str | None,
                  host: list[tuple[Pool, Watchdog]] | None = None) -> None:
        if watchdog is not None:
            watchdog.stop()
        if pool is not None:
            pool.close()
        for host_pool, host_watchdog in host or ():
            host_watchdog.stop()
            host_pool.close()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
        else:
            LocalBackend._finalize(self._pool, self._watchdog, self._root, self._host)

    # ------------------------------------------------------------------- leasing
    def prepare(self, spec: ToolSpec) -> ToolConfinement:
        """Plan the tool's Landlock ruleset; start the host-network pool if it needs it."""
        if spec.network == "host":
            self._host_pool()
        plan = self._plan(spec)
        return ToolConfinement(spec.name, spec.network, plan.notes if plan else ())

    def _plan(self, spec: ToolSpec) -> _landlock.Plan | None:
        """The tool's Landlock plan, made once and sent with each ``init``; made again
        while a path it names does not exist yet (a grant's directory created after
        registration gets its rule from then on)."""
        cached = self._plans.get(spec.name)
        if cached is not None and cached[0] is spec and (cached[1] is None or not cached[1].missing):
            return cached[1]
        env = self._granted_env(spec)
        plan = _confinement.tool_plan(spec.grants, spec.network, tuple(self._implicit_read),
                                      self._started().zygote.report, self._mode,
                                      env.get("PATH", MINIMAL_ENV["PATH"]))
        self._plans[spec.name] = (spec, plan)
        return plan

    def lease(self, spec: ToolSpec) -> Lease:
        pool = self._pool_for(spec)
        if spec.isolation == "call":
            ready = pool.take_ready(spec.name)
            if ready is not None:
                return Lease(spec, ready, fresh=True, init_bytes=ready.init_bytes, handle=ready)
            # From now on keep workers of this tool initialised ahead of its calls: a
            # fresh call then costs one round trip, not a lock-down and a load.
            pool.want_ready(spec.name, lambda w: self._init_frame(spec, w))
            worker = pool.take()
            return self._first_use(spec, worker)
        warm = self._warm_of(spec.name)
        with warm.cond:
            while not warm.free:
                if warm.count < self._max_workers:
                    warm.count += 1
                    break
                warm.cond.wait()
            else:
                worker = warm.free.pop()
                return Lease(spec, worker, fresh=False, init_bytes=worker.init_bytes,
                             handle=worker)
        try:
            worker = pool.take()
        except BaseException:
            with warm.cond:
                warm.count -= 1
                warm.cond.notify()
            raise
        return self._first_use(spec, worker)

    def _first_use(self, spec: ToolSpec, worker: Worker) -> Lease:
        worker.tool = spec.name
        worker.isolation = spec.isolation
        worker.pending_init = self._init_frame(spec, worker)
        return Lease(spec, worker, fresh=True, init_bytes=worker.init_bytes, handle=worker)

    def _warm_of(self, tool: str) -> _Warm:
        warm = self._warm.get(tool)
        if warm is None:
            with self._lock:
                warm = self._warm.setdefault(tool, _Warm())
        return warm

    def release(self, lease: Lease, reuse: bool) -> None:
        worker: Worker = lease.handle
        spec = lease.spec
        pool = self._pool_for(spec)
        if spec.isolation == "call":
            pool.retire(worker)
            return
        warm = self._warm_of(spec.name)
        with warm.cond:
            if reuse and not worker.dead and not self._closed:
                warm.free.append(worker)
            else:
                warm.count -= 1
                pool.retire(worker)
            warm.cond.notify()

    def abort(self, lease: Lease, reason: str) -> None:
        lease.handle.kill(reason)

    def _started(self) -> Pool:
        if self._pool is None:
            raise RuntimeError("LocalBackend.start(key) was not called")
        return self._pool

    @staticmethod
    def _granted_env(spec: ToolSpec) -> dict[str, str]:
        """The granted variables of a worker's environment (over MINIMAL_ENV, HOME, TMPDIR)."""
        return {k: v for pattern in spec.env_names for k, v in os.environ.items()
                if env_matches(pattern, k)}

    def init_body(self, spec: ToolSpec, base_dir: str) -> protocol.InitBody:
        """The ``init`` message for a worker of ``spec`` whose directory is ``base_dir``."""
        env = dict(MINIMAL_ENV, HOME=base_dir, TMPDIR=base_dir)
        env.update(self._granted_env(spec))
        return {
            "key": self._key, "tool": spec.name, "grants_obj": spec.grants,
            "grants_bytes": spec.grants_bytes, "limits": spec.limits, "env": env,
            "base_dir": base_dir, "sys_path": self._sys_path,
            "isolation": spec.isolation, "uid": self.privilege.uid, "gid": self.privilege.gid,
            "implicit_read": self._implicit_read, "tool_blob": spec.blob,
            "confinement": self._mode, "network": spec.network, "landlock": self._plan(spec),
        }

    def _init_frame(self, spec: ToolSpec, worker: Worker) -> bytes:
        frame = protocol.encode("init", dict(self.init_body(spec, worker.base_dir)))
        worker.spec = spec
        worker.init_bytes = len(frame)
        return frame

    # ------------------------------------------------------------------ exchange
    def exchange(self, lease: Lease, call_id: str, call_frame: bytes) -> Outcome:
        """Send the call (after ``init`` on a worker's first use), answer the worker's
        socket-broker requests while the call runs, and read its one reply."""
        worker: Worker = lease.handle
        tool, limits = lease.spec.name, lease.spec.limits
        timeout_s, output_bytes = limits["timeout_s"], limits["output_bytes"]
        frame = call_frame
        if worker.pending_init is not None:
            frame, worker.pending_init = worker.pending_init + call_frame, None
        elif _unsolicited(worker):
            # Bytes nobody asked for (a tool thread writing to the channel after its call
            # ended): the worker cannot be trusted to answer this call. Nothing ran.
            worker.kill("unsolicited bytes on its channel")
            return Outcome(status="undelivered", reuse=False, error=WorkerCrashed(
                f"{tool}: the worker wrote to its channel between calls; it was retired"))
        deadline = time.monotonic() + timeout_s
        worker.busy_since = time.monotonic()
        broker: Broker | None = None
        observed: list[dict[str, Any]] = []
        try:
            armed = timeout_s
            worker.chan.settimeout(armed)
            try:
                worker.chan.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                # The worker was dead before the request reached it (e.g. its zygote was
                # killed): nothing ran, so the caller may safely try another worker.
                worker.kill("undelivered")
                self._pool_for(lease.spec).replace_dead_zygote()
                return Outcome(status="undelivered", reuse=False, error=WorkerCrashed(
                    f"{tool}: the worker was gone before the request reached it"))
            while True:
                remaining = max(deadline - time.monotonic(), 0.001)
                if armed - remaining > 0.001:  # re-armed (an ioctl) only when it matters
                    armed = remaining
                    worker.chan.settimeout(armed)
                payload = protocol.recv_frame(worker.chan, protocol.reply_limit(output_bytes))
                if payload[:len(_BROKER_PREFIX)] != _BROKER_PREFIX:
                    break
                # The socket broker: the worker's only way onto the network (issue 16).
                if broker is None:
                    broker = Broker(lease.spec.grants, deadline=deadline, book=worker.names)
                answer = broker.handle_frame(payload)
                observed.extend(dict(e) for e in answer.events)
                send_answer(worker.chan, answer)
                if answer.violation is not None:
                    worker.kill(f"broker protocol violation: {answer.violation}")
                    return Outcome(status="crashed", reuse=False, events=observed,
                                   error=WorkerCrashed(f"{tool}: the worker broke the broker "
                                                       f"protocol ({answer.violation})"))
        except TimeoutError:
            worker.kill("timeout")
            return Outcome(status="timeout", reuse=False, events=observed, error=ToolTimeout(
                f"{tool}: no answer within timeout_s={timeout_s:g}; the worker's process tree "
                "was killed. Raise Limits(timeout_s=...) at registration if the tool needs longer."))
        except protocol.FrameTooLarge as exc:
            worker.kill("output")
            return Outcome(status="resource", reuse=False, events=observed,
                           error=ResourceLimitExceeded(
                f"{tool}: result of {exc.size} bytes exceeds output_bytes={output_bytes} (not "
                "read); return less or raise Limits(output_bytes=...)"))
        except (protocol.PeerClosed, ConnectionError, OSError):
            lost = self._lost(worker, tool, deadline, self._pool_for(lease.spec))
            lost.events = observed
            return lost
        finally:
            worker.busy_since = None
        outcome = read_reply(tool, call_id, payload, output_bytes, worker.kill, observed)
        if outcome.error is None and any(e.get("action") == "block" for e in observed):
            # A refused connect fails the call even when the tool swallowed the error
            # (urllib turns it into URLError): the attempt is what matters.
            blocked_call(tool, outcome, observed)
        if worker.kill_reason is None and _unsolicited(worker):
            # More bytes after the one reply: a second (forged or stale) reply.
            worker.kill("a second reply on its channel")
            return Outcome(status="crashed", reuse=False, events=outcome.events,
                           recv_kind=outcome.recv_kind, recv_bytes=outcome.recv_bytes,
                           error=WorkerCrashed(f"{tool}: the worker sent more than one reply; "
                                               "it was retired and the call's result discarded"))
        if outcome.reuse and lease.spec.isolation == "tool":
            # Warm workers carry nothing across calls: a thread, child or descriptor the
            # call left behind retires the worker, its tree killed now (the Session
            # records the kill and its reason).
            left = leftovers(worker)
            if left is not None:
                outcome.reuse = False
                worker.kill(f"carried over: {left}")
        return outcome

    def _lost(self, worker: Worker, tool: str, deadline: float, pool: Pool) -> Outcome:
        """The channel closed: find out why (our own kill, a limit, a crash)."""
        reason = worker.kill_reason
        worker.kill(reason or "crashed")
        status = pool.wait_status(worker, 2.0)
        if reason == "cancelled":
            return Outcome(status="cancelled", reuse=False, error=CallCancelled(
                f"{tool}: the call was cancelled by its caller; the worker's tree was killed"))
        if reason == "processes":
            return Outcome(status="resource", reuse=False, error=ResourceLimitExceeded(
                f"{tool}: the watchdog killed the worker: {worker.kill_detail}; raise "
                "Limits(processes=...) if the tool needs more"))
        if reason == "memory":
            return Outcome(status="resource", reuse=False, error=ResourceLimitExceeded(
                f"{tool}: the worker exceeded its memory limit and was killed ({worker.kill_detail})"))
        if reason in ("net", "exec"):
            return Outcome(status="blocked", reuse=False, error=SecurityError(
                f"{tool}: the watchdog killed the worker: {worker.kill_detail}",
                rule=f"watchdog: {reason}", layer="watchdog"))
        if reason == "timeout" or time.monotonic() > deadline:
            return Outcome(status="timeout", reuse=False, error=ToolTimeout(
                f"{tool}: timed out; the worker's process tree was killed"))
        if status is not None and os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            if sig in (signal.SIGXCPU, signal.SIGXFSZ):
                return Outcome(status="resource", reuse=False, error=ResourceLimitExceeded(
                    f"{tool}: the worker was stopped by {name} (CPU or file size rlimit)"))
            return Outcome(status="crashed", reuse=False, error=WorkerCrashed(
                f"{tool}: the worker was killed by {name} before answering"))
        zygote = worker.zygote
        if status is None and zygote is not None and zygote.proc.poll() is not None:
            return Outcome(status="crashed", reuse=False, error=WorkerCrashed(
                f"{tool}: the worker died with its zygote (killed from outside, or by the OOM "
                "killer) before answering; a new zygote serves the next calls"))
        code = os.WEXITSTATUS(status) if status is not None and os.WIFEXITED(status) else None
        return Outcome(status="crashed", reuse=False, error=WorkerCrashed(
            f"{tool}: the worker exited (code {code}) before answering"))


_BROKER_PREFIX = b'["broker.'


def _unsolicited(worker: Worker) -> bool:
    """Whether the worker's channel holds bytes the parent did not ask for (a poll, then a
    peek: the channel's own timeout would make a plain recv wait)."""
    try:
        if not select.select([worker.chan], [], [], 0)[0]:
            return False
        return bool(worker.chan.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False  # a dead channel: the exchange finds out


def implicit_reads() -> list[str]:
    """Directories and files every worker on this machine may read."""
    import sysconfig

    # The interpreter's own trees only: other sys.path entries (the script's directory,
    # the cwd under -m, a project checkout) may hold anything, ~/.ssh included.
    trees = {sys.prefix, sys.base_prefix, sys.exec_prefix, *sysconfig.get_paths().values()}
    trees = {os.path.realpath(p) for p in trees if p}
    paths = set(trees)
    paths.update(p for p in map(os.path.realpath, filter(None, sys.path))
                 if any(under(p, t) for t in trees))
    paths.update(_SYSTEM_READ)
    try:  # TLS configuration, but never the private keys beside it
        paths.update(os.path.join("/etc/ssl", e) for e in os.listdir("/etc/ssl") if e != "private")
    except OSError:
        pass
    paths.add(os.path.dirname(os.path.abspath(protocol.__file__)))  # the worker package
    return sorted(os.path.realpath(p) for p in paths if os.path.exists(p))
