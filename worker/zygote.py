"""The zygote: a clean, spawned interpreter that forks workers on request.

Spawning a Python interpreter costs tens of milliseconds; forking a preloaded one costs
about two. The zygote is started with ``sys.executable -I`` and an environment reduced to
a fixed minimal set, so the workers it forks never saw the parent's memory, environment
or file descriptors (the point of "spawn, never fork" is kept: nothing of the parent is
inherited).

Kernel confinement that costs once, not per call, happens here before the first fork:
with ``options["netns"]`` the zygote enters an empty network namespace (``_kernel``), so
every worker inherits it; with ``options["selftest"]`` it forks a throwaway child that
confines itself with no grants and tries what it must not (``_selftest``), and reports.

Control channel (SOCK_SEQPACKET, one JSON message per packet: see
``failcore_worker.protocol.encode_control``):
  zygote -> parent: ["ready", pid, report] once, first
  parent -> zygote: ["fork", worker_id, warm_up] with the worker's channel fd attached
                    (SCM_RIGHTS); warm_up=False for a worker whose init follows at once
  zygote -> parent: ["forked", worker_id, pid, chan_fd] | ["exited", pid, wait_status]
                    (chan_fd: the channel's descriptor number in the worker, so the parent
                    knows the worker's descriptor set before any tool code runs)
When the control channel closes (the parent exited or died), the zygote kills every
worker it forked and exits. Workers get PR_SET_PDEATHSIG so they die with the zygote.
"""

from __future__ import annotations

# Preloaded so forked workers do not pay for these imports (and read no files for them
# once the guards are on).
import asyncio  # noqa: F401
import ctypes
import gc
import http.client  # noqa: F401
import json  # noqa: F401
import os
import pickle  # noqa: F401 - preloaded: workers decode the parent's frames with it
import select
import shutil
import signal
import socket
import ssl  # noqa: F401
import subprocess  # noqa: F401
import time
import urllib.request  # noqa: F401
from typing import Any

import cloudpickle  # noqa: F401

from failcore_worker import (  # noqa: F401
    _kernel,
    _landlock,
    _seccomp,
    _selftest,
    _tree,
    guards,
    main,
    protocol,
    rules,
)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)


def _child(ctl: socket.socket, chan_fd: int, warm_up: bool) -> None:
    try:
        ctl.close()
        os.setsid()
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == 1:  # the zygote died between fork and prctl
            os._exit(1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        # stdin/stdout/stderr: /dev/null. Sharing the zygote's log would let one tool that
        # prints forever push the shared offset past RLIMIT_FSIZE for every later worker.
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        if null > 2:
            os.close(null)
        os.closerange(3, chan_fd)
        os.closerange(chan_fd + 1, 65536)
        chan = socket.socket(fileno=chan_fd)
        main.serve(chan, warm_up=warm_up)
    finally:
        os._exit(0)


def _adopted(children: set[int]) -> list[int]:
    """Processes re-parented to the zygote (orphans of a dead worker), not forked by it."""
    found: list[int] = []
    me = os.getpid()
    try:
        with open(f"/proc/{me}/task/{me}/children", "rb") as f:
            found = [int(p) for p in f.read().split()]
    except OSError:
        return []
    return [p for p in found if p not in children]


def _reap(ctl: socket.socket, children: set[int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            break
        if pid not in children:
            continue  # an adopted orphan we killed
        children.discard(pid)
        try:
            ctl.send(protocol.encode_control("exited", pid, status))
        except OSError:
            pass
    # The zygote is a child subreaper: a worker's orphans (even ones that called setsid)
    # land here instead of at pid 1. They belong to a call that is over: kill them.
    for pid in _adopted(children):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


_session_root: str | None = None


def _shutdown(children: set[int]) -> None:
    # Everything below the zygote, setsid'd grandchildren included: listed first, since
    # once a worker dies its orphans would be re-parented (here, then to pid 1 when the
    # zygote exits).
    try:
        below = _tree.descendants(os.getpid())
    except _tree.NoChildrenFile:
        below = []
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    for pid in list(children):
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except OSError:
                pass
    for pid in list(children):
        try:
            os.waitpid(pid, 0)
        except OSError:
            pass
    if _session_root is not None:
        # A parent killed with SIGKILL cannot remove its scratch space (on tmpfs: memory).
        shutil.rmtree(_session_root, ignore_errors=True)
    os._exit(0)


def _prepare(options: dict[str, Any], resolve: tuple[str, ...]) -> dict[str, Any]:
    """Once per zygote: the network namespace, the loader's paths, the self-test."""
    report: dict[str, Any] = {}
    started = time.perf_counter()
    if options.get("netns"):
        netns, userns = _kernel.enter_empty_netns(allow_userns=bool(options.get("userns", True)))
        report["netns"], report["userns"] = netns.to_wire(), userns.to_wire()
    if options.get("kernel"):
        report["bounding"] = _kernel.drop_bounding_set().to_wire()  # inherited by every fork
        if options.get("netns") and report["netns"]["in_force"]:
            report["loopback"] = _kernel.loopback_up().to_wire()  # this namespace's own
        report["landlock_abi"] = _landlock.cached_abi()
        # Resolved once here, inherited by every worker (a worker that stacks a narrower
        # ruleset plans for itself); the parent plans each tool's ruleset with these.
        _landlock.warm(resolve)
        report["loader_paths"] = list(_landlock.loader_paths())
    probe = options.get("selftest")
    confined = bool(options.get("kernel") and options.get("netns"))
    if probe is not None:
        report["selftest"] = _selftest.run(dict(probe, seccomp=confined), resolve)
    if confined:
        # After the self-test (which listens, here, for its abstract-socket probe): the
        # seccomp filter every worker of this zygote inherits (no listen, no UDP, no
        # io_uring: what Landlock cannot say). The self-test child installed its own.
        _kernel.set_no_new_privs()
        report["seccomp"] = _seccomp.deny_network_escapes().to_wire()
    report["prepare_ms"] = (time.perf_counter() - started) * 1000
    return report


def serve(ctl_fd: int, session_root: str | None = None, resolve: tuple[str, ...] = (),
          options: dict[str, Any] | None = None) -> None:
    global _session_root
    _session_root = session_root
    # The implicit-read directories of every worker of this session, resolved once here
    # and inherited by each fork (pinned before any tool code runs, as in the worker).
    for path in resolve:
        rules._resolve_base(path)
    report = _prepare(options or {}, resolve)
    # Preloaded objects never change; keep the collector from touching (and so copying)
    # their pages in every forked worker.
    gc.freeze()
    _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    ctl = socket.socket(fileno=ctl_fd)
    children: set[int] = set()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, lambda *_: _shutdown(children))
    ctl.send(protocol.encode_control("ready", os.getpid(), report))
    while True:
        ready, _, _ = select.select([ctl.fileno(), wake_r], [], [], 1.0)
        if wake_r in ready:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
        _reap(ctl, children)
        if ctl.fileno() not in ready:
            continue
        try:
            msg, fds, _flags, _addr = socket.recv_fds(ctl, 4096, 1)
        except OSError:
            _shutdown(children)
        if not msg:
            _shutdown(children)
        try:
            kind, worker_id, warm_up = protocol.decode_control(msg)
        except (protocol.BadFrame, ValueError):
            kind = ""
        if kind != "fork" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        pid = os.fork()
        if pid == 0:
            os.close(wake_r)
            os.close(wake_w)
            _child(ctl, fds[0], bool(warm_up))
        os.close(fds[0])
        children.add(pid)
        ctl.send(protocol.encode_control("forked", worker_id, pid, fds[0]))

