"""A brokered loopback connect against a direct one, both timed in the same child process.

The child first times direct connects (and ``getaddrinfo("localhost")``) in this
process's network namespace, then enters an empty one of its own, installs
``failcore_worker._broker`` and times the same operations through this process's
``failcore._broker.Broker``. One process, one run: the ratio is what a confined worker
pays per connection (not per request: a kept-alive connection costs nothing more).
Each sample is ``socket()`` + ``connect()`` + ``close()`` to a loopback listener that
accepts and closes; the child is waited for before the function returns.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._timing import Row, Unavailable, latency_row

_ROOT = Path(__file__).resolve().parent.parent
CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000


def _accept_forever(listener: socket.socket) -> None:
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        conn.close()


def measure_connect(n: int, warmup: int) -> list[Row] | Unavailable:
    """Rows ``connect_direct``, ``connect_brokered``, ``resolve_direct``, ``resolve_brokered``."""
    from failcore._broker import Broker, BrokerLimits, serve
    from failcore_worker.rules import Grants, NetRule

    if not sys.platform.startswith("linux"):
        return Unavailable("connect_brokered", "brokered connect", "needs Linux network namespaces")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    port = int(listener.getsockname()[1])
    acceptor = threading.Thread(target=_accept_forever, args=(listener,), daemon=True)
    acceptor.start()
    ours, theirs = socket.socketpair()
    grants = Grants(net=(NetRule("127.0.0.1", port, port, f"net:connect:127.0.0.1:{port}"),
                         NetRule("localhost", port, port, f"net:connect:localhost:{port}")),
                    block_ranges=True)
    budget = 2 * (n + warmup) + 16
    broker = Broker(grants, deadline=time.monotonic() + 3600,
                    limits=BrokerLimits(resolves=budget, connects=budget))
    server = threading.Thread(target=serve, args=(ours, broker), daemon=True)
    server.start()
    spec = {"port": port, "chan": theirs.fileno(), "n": n, "warmup": warmup,
            "privileged": os.geteuid() == 0}
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks._broker_bench", json.dumps(spec)],
                              pass_fds=[theirs.fileno()], capture_output=True, cwd=_ROOT,
                              timeout=600, check=False)
    finally:
        theirs.close()
        server.join(10)
        ours.close()
        listener.close()
        acceptor.join(5)
    if proc.returncode != 0:
        reason = proc.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return Unavailable("connect_brokered", "brokered connect", reason[0][:200])
    data = json.loads(proc.stdout)
    direct = latency_row("connect_direct", "loopback socket()+connect()+close(), direct",
                         data["connect_direct"])
    brokered = latency_row("connect_brokered", "loopback socket()+connect()+close(), brokered "
                           "(worker in an empty netns)", data["connect_brokered"],
                           note=f"{brokered_ratio(data, 'connect')} the direct connect, same process")
    resolve_direct = latency_row("resolve_direct", 'getaddrinfo("localhost"), direct',
                                 data["resolve_direct"])
    resolve_brokered = latency_row("resolve_brokered", 'getaddrinfo("localhost"), brokered',
                                   data["resolve_brokered"],
                                   note=f"{brokered_ratio(data, 'resolve')} the direct lookup")
    return [direct, brokered, resolve_direct, resolve_brokered]


def brokered_ratio(data: dict[str, list[int]], what: str) -> str:
    a = sorted(data[f"{what}_brokered"])[len(data[f"{what}_brokered"]) // 2]
    b = sorted(data[f"{what}_direct"])[len(data[f"{what}_direct"]) // 2]
    return f"{a / b:.2f}x (+{(a - b) / 1000:.0f} µs)" if b else "n/a"


# --- the child --------------------------------------------------------------------------------


def _child(spec: dict[str, Any]) -> dict[str, list[int]]:
    import ctypes

    from benchmarks._timing import sample_ns
    from failcore_worker import _broker

    port, n, warmup = spec["port"], spec["n"], spec["warmup"]

    def connect() -> None:
        s = socket.socket()
        s.connect(("127.0.0.1", port))
        s.close()

    def resolve() -> None:
        socket.getaddrinfo("localhost", port, socket.AF_INET, socket.SOCK_STREAM)

    out = {"connect_direct": sample_ns(connect, n, warmup),
           "resolve_direct": sample_ns(resolve, n, warmup)}
    libc = ctypes.CDLL(None, use_errno=True)
    flags = CLONE_NEWNET if spec["privileged"] else CLONE_NEWUSER | CLONE_NEWNET
    if libc.unshare(flags) != 0:
        raise SystemExit(f"unshare: {os.strerror(ctypes.get_errno())}")
    if {name for _, name in socket.if_nameindex()} - {"lo"}:
        raise SystemExit("not in an empty network namespace")
    _broker.install(_broker.channel_ask(socket.socket(fileno=spec["chan"])))
    _broker.begin_call()
    out["connect_brokered"] = sample_ns(connect, n, warmup)
    out["resolve_brokered"] = sample_ns(resolve, n, warmup)
    return out


if __name__ == "__main__":
    sys.stdout.write(json.dumps(_child(json.loads(sys.argv[1]))))
