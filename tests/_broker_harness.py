"""Run a real worker-side process against the parent-side broker, over a socketpair.

``run_child`` starts ``_broker_child.py`` (root: the test's interpreter; unprivileged: as
uid 65534 through ``setpriv``, with an interpreter that user can read) which enters its own
empty network namespace, installs ``failcore_worker._broker`` on its end of the pair and
runs one scenario. This process answers its requests with ``failcore._broker.Broker``, the
way the exchange loop will, and collects the replies' events. Every process is waited for;
every server here listens on loopback and is closed by its owner.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from failcore._broker import Broker, BrokerAnswer, BrokerLimits, serve
from failcore._broker_lookup import Resolver
from failcore_worker.protocol import GuardEvent
from failcore_worker.rules import Grants, NetRule

CHILD = str(Path(__file__).resolve().parent / "_broker_child.py")
SITE = sysconfig.get_paths()["purelib"]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
CHILD_ENV = {"PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1", "LC_ALL": "C.UTF-8"}


def loopback(*ports: int, block_ranges: bool = True, default: str = "block") -> Grants:
    """Grants naming 127.0.0.1 (and ::1) on ``ports``, net_safe on by default."""
    rules = tuple(NetRule(host, p, p, f"net:connect:{host}:{p}")
                  for p in ports for host in ("127.0.0.1", "::1"))
    return Grants(net=rules, default=default, block_ranges=block_ranges)  # type: ignore[arg-type]


@dataclass
class Run:
    result: dict[str, Any]
    info: dict[str, Any]
    events: list[GuardEvent]
    kinds: list[str]
    violations: list[str]
    stderr: str
    parent_fds: tuple[int, int] = (0, 0)
    replies: list[dict[str, Any]] = field(default_factory=list)


@functools.lru_cache(maxsize=1)
def unprivileged_python() -> str | None:
    """An interpreter uid 65534 can run with this venv's packages, or None.

    The venv's own interpreter may live under /root (pyenv), which nobody can read; a
    system Python of the same minor version reads the venv's site-packages instead.
    """
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{minor}", f"/usr/local/bin/{minor}"):
        if not os.path.exists(candidate):
            continue
        probe = subprocess.run(
            [*NOBODY, candidate, "-c", "import site, sys; site.addsitedir(sys.argv[1]); "
             "import failcore_worker._broker, httpx, requests", SITE],
            env=CHILD_ENV, capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return candidate
    return None


def require_privilege(privileged: bool) -> None:
    if os.geteuid() != 0:
        if privileged:
            pytest.skip("the root variant needs root (CLONE_NEWNET)")
        return
    if not privileged and unprivileged_python() is None:
        pytest.skip("no interpreter uid 65534 can read (setpriv missing or every Python "
                    "is under an unreadable directory)")


class RecordingBroker(Broker):
    """The product's Broker, also noting which request kinds it was asked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kinds: list[str] = []

    def handle(self, kind: str, body: Mapping[str, Any]) -> BrokerAnswer:
        self.kinds.append(kind)
        return super().handle(kind, body)


def run_child(scenario: str, params: dict[str, Any], grants: Grants, *, privileged: bool = True,
              limits: BrokerLimits | None = None, resolver: Resolver | None = None,
              timeout: float = 60.0) -> Run:
    require_privilege(privileged)
    fds_before = len(os.listdir("/proc/self/fd"))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    broker = RecordingBroker(grants, deadline=time.monotonic() + timeout,
                             limits=limits or BrokerLimits(),
                             resolver=resolver)
    spec = {"scenario": scenario, "params": params, "privileged": privileged,
            "chan": theirs.fileno(), "outer_netns": os.stat("/proc/self/ns/net").st_ino}
    if privileged:
        cmd = [sys.executable, CHILD, json.dumps(spec)]
    else:
        python = unprivileged_python()
        assert python is not None
        cmd = [*NOBODY, python, CHILD, json.dumps(spec), SITE]
    run = Run({}, {}, [], broker.kinds, [], "")

    def record(answer: BrokerAnswer) -> None:
        run.events.extend(answer.events)
        run.replies.append(dict(answer.reply))
        if answer.violation is not None:
            run.violations.append(answer.violation)
    try:
        proc = subprocess.Popen(cmd, pass_fds=[theirs.fileno()], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=CHILD_ENV)
    finally:
        theirs.close()
    server = threading.Thread(target=serve, args=(ours, broker, record), daemon=True)
    server.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    finally:
        server.join(10)
        ours.close()
    run.stderr = err.decode(errors="replace")
    if proc.returncode != 0 or not out:
        raise AssertionError(f"broker child {scenario} exited {proc.returncode}: {run.stderr[-3000:]}")
    data = json.loads(out)
    run.result, run.info = data["result"], data["info"]
    if "crashed" in run.result:
        raise AssertionError(f"scenario {scenario} crashed: {run.result['traceback']}")
    run.parent_fds = (fds_before, len(os.listdir("/proc/self/fd")))
    return run


class FakeResolver:
    """A resolver answering from tables: names other than localhost are never really
    looked up outside a private namespace. Records what it was asked."""

    def __init__(self, forward: dict[str, list[str]], reverse: dict[str, str] | None = None) -> None:
        self.forward = forward
        self.reverse = reverse or {}
        self.asked: list[str] = []

    def getaddrinfo(self, host: str, port: int | str | None, family: int, type: int,
                    proto: int, flags: int, timeout: float) -> list[tuple[Any, ...]]:
        self.asked.append(host)
        if host not in self.forward:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        number = int(port) if isinstance(port, int) or (port or "").isdigit() else 0
        out: list[tuple[Any, ...]] = []
        for ip in self.forward[host]:
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            if family in (0, fam):
                sockaddr = (ip, number, 0, 0) if fam == socket.AF_INET6 else (ip, number)
                out.append((fam, type or socket.SOCK_STREAM, 6, "", sockaddr))
        if not out:
            raise socket.gaierror(socket.EAI_ADDRFAMILY, "Address family for hostname not supported")
        return out

    def gethostbyaddr(self, ip: str, timeout: float) -> tuple[str, list[str], list[str]]:
        self.asked.append(ip)
        if ip not in self.reverse:
            raise socket.herror(1, "Unknown host")
        return self.reverse[ip], [], [ip]

    def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int, timeout: float) -> tuple[str, str]:
        self.asked.append(str(sockaddr[0]))
        if sockaddr[0] not in self.reverse:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.reverse[sockaddr[0]], str(sockaddr[1])


# --- loopback servers ------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.server.hits.append(self.path)
        if self.path == "/redirect" and self.server.redirect_to:
            self.send_response(302)
            self.send_header("Location", self.server.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = f"hello from {self.server.server_address[1]}".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hits: list[str]
    redirect_to: str = ""

    def handle_error(self, request: Any, client_address: Any) -> None:
        return None  # a client that connects and closes at once is a scenario, not a fault


class _Server6(_Server):
    address_family = socket.AF_INET6


class HTTPServer:
    """An HTTP server on a loopback address (optionally TLS), serving from a thread until
    ``close``. ``hits`` lists the paths requested; ``GET /redirect`` answers 302 to
    ``httpd.redirect_to`` when that is set."""

    def __init__(self, host: str = "127.0.0.1", tls: tuple[str, str] | None = None) -> None:
        self.httpd = (_Server6 if ":" in host else _Server)((host, 0), _Handler)
        self.httpd.hits = []
        if tls is not None:
            import ssl

            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.host = host
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def body(self) -> str:
        return f"hello from {self.port}"

    @property
    def hits(self) -> list[str]:
        return self.httpd.hits

    def netloc(self, host: str | None = None) -> str:
        h = host or self.host
        return f"[{h}]:{self.port}" if ":" in h else f"{h}:{self.port}"

    def url(self, path: str = "/", *, scheme: str = "http", host: str | None = None) -> str:
        return f"{scheme}://{self.netloc(host)}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class StalledListener:
    """A loopback port whose accept queue is full: further SYNs are dropped, so a connect
    to it neither succeeds nor is refused until its timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(s)
        time.sleep(0.05)

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.sock.close()


class ClosedPort:
    """A loopback port bound but not listening, held until ``close``: connects are refused."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()
