"""Layer 4: an outside watchdog that kills a worker's tree on a violation the inner
guards missed (a tool that reached libc through ctypes, or an extension module).

It looks only at workers busy for longer than ``min_age_s``: a quick call is over before
an outside observer could act, and polling every call would tax the hot path. It checks
resident memory against ``memory_mb``, child processes when no ``proc:exec`` is granted,
the number of descendants against ``Limits.processes`` (root ignores RLIMIT_NPROC), and
the inet connections of the worker *and every descendant* (a program run under
``proc:exec`` is not guarded inside: this is where its connections are judged) to a
blocked special range or when no network is granted. Connections are judged with
``rules.check_address``: the guards' own decision (net_safe's containment rule,
``public``), wherever it does not depend on names. psutil matches a process's socket
descriptors against the *parent's* network namespace tables: it sees host-network
workers' connections (``ToolMetadata(network="host")``: where this matters most) and
descriptors the broker passed in, not sockets inside a confined worker's empty namespace
(which reach nothing).
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil

from failcore._workers import Pool, Worker, descendants
from failcore_worker import rules


def violation(worker: Worker, proc: psutil.Process) -> tuple[str, str] | None:
    """(reason, detail) when the worker breaks its grants as seen from outside, else None."""
    spec = worker.spec
    if spec is None:
        return None
    grants = spec.grants
    limit = spec.limits["memory_mb"] * 1024 * 1024
    rss = proc.memory_info().rss
    if limit and rss > limit:
        return "memory", f"resident memory {rss // (1024 * 1024)} MB > memory_mb={limit // (1024 * 1024)}"
    children = descendants(worker.pid)
    if children and (not grants.exec or grants.deny_exec) and grants.default == "block":
        return "exec", f"child process {children[0]} with no proc:exec granted"
    most = spec.limits["processes"]
    if most and len(children) > most:
        return "processes", f"{len(children)} descendant processes > processes={most}"
    for pid, conns in _tree_connections(proc, children):
        who = "" if pid == worker.pid else f" (descendant {pid})"
        for conn in conns:
            if not conn.raddr:
                continue
            found = connection_violation(grants, conn.raddr.ip, conn.raddr.port,
                                         conn.type == socket.SOCK_DGRAM)
            if found is not None:
                return "net", found + who
    return None


def _tree_connections(proc: psutil.Process, children: list[int]) -> Iterator[tuple[int, list[Any]]]:
    """(pid, inet connections) for the worker, then each descendant still alive."""
    yield proc.pid, proc.net_connections(kind="inet")
    for pid in children:
        try:
            yield pid, psutil.Process(pid).net_connections(kind="inet")
        except psutil.Error:
            continue  # exited meanwhile


def connection_violation(grants: rules.Grants, ip: str, port: int, udp: bool = False) -> str | None:
    """Why an open connection breaks ``grants`` as seen from outside, or None.

    Judged by ``rules.check_address``: the same decision the guards make, minus what
    needs the names that resolved to the address (a name capability may cover it). The
    C resolver's own queries (UDP to a nameserver in /etc/resolv.conf, port 53) are the
    runtime's, not the tool's: a lookup the guards allowed.
    """
    if udp and port == 53 and ip in _nameservers():
        return None
    if not grants.net and grants.default == "block":
        return f"connection to {ip}:{port} with no net:connect granted"
    verdict = rules.check_address(grants, ip, port)
    if verdict is None or verdict.action != "block":
        return None
    return f"connection to {ip}:{port}: {verdict.reason} [rule: {verdict.rule}]"


@functools.lru_cache(maxsize=1)
def _nameservers() -> frozenset[str]:
    try:
        with open("/etc/resolv.conf", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return frozenset()
    found = set()
    for line in lines:
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            ip = rules.parse_ip(words[1])
            if ip is not None:
                found.add(str(ip))
    return frozenset(found)


class Watchdog:
    def __init__(self, pool: Pool, interval_s: float, min_age_s: float = 0.02) -> None:
        self._pool = pool
        self._interval = interval_s
        self._min_age = min_age_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="failcore-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            now = time.monotonic()

            def busy(w: Worker, now: float = now) -> bool:
                since = w.busy_since
                return since is not None and now - since >= self._min_age and not w.dead

            for worker in self._pool.busy_workers(busy):
                try:
                    proc = worker.proc
                    if proc is None:
                        proc = worker.proc = psutil.Process(worker.pid)
                    found = violation(worker, proc)
                except (psutil.Error, ValueError):
                    continue
                if found is not None and worker.busy_since is not None:
                    worker.kill(*found)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
