"""A worker-side process for the socket broker tests: own empty network namespace, broker installed.

Run by ``tests/_broker_harness.py`` as ``python _broker_child.py SPEC_JSON`` with the
broker channel on ``spec["chan"]``. It enters a fresh network namespace (``unshare``:
CLONE_NEWNET as root, CLONE_NEWUSER|CLONE_NEWNET when unprivileged) and refuses to run
anything unless it really is in a new, interface-less namespace; then installs
``failcore_worker._broker`` on the channel, runs one scenario and prints its result as
JSON. Scenarios only ever name loopback addresses unless the test is ``netns``-marked.
"""

from __future__ import annotations

import sys

if __name__ == "__main__" and len(sys.argv) > 2:  # not the venv's interpreter: add its site dir
    import site

    site.addsitedir(sys.argv[2])

import _socket  # noqa: E402
import asyncio  # noqa: E402
import ctypes  # noqa: E402
import errno  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import select  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import struct  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
LIBC = ctypes.CDLL(None, use_errno=True)


def enter_netns(privileged: bool, outer_inode: int) -> None:
    flags = CLONE_NEWNET if privileged else CLONE_NEWUSER | CLONE_NEWNET
    if LIBC.unshare(flags) != 0:
        code = ctypes.get_errno()
        raise SystemExit(f"unshare failed: {os.strerror(code)}")
    inode = os.stat("/proc/self/ns/net").st_ino
    names = {name for _, name in socket.if_nameindex()}
    if inode == outer_inode or not names <= {"lo"}:
        raise SystemExit(f"not in a fresh network namespace (inode {inode}, interfaces {names})")


def landlock_tcp() -> None:
    """Deny this process TCP connect(2) and bind(2) with Landlock (ABI >= 4), no rules: the
    kernel layer the broker is designed to sit under. Raises SystemExit when unavailable."""
    nr_create, nr_restrict = 444, 446  # x86_64 and aarch64 share these numbers
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(nr_create, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 4:
        raise SystemExit(f"Landlock ABI {abi} has no TCP rules")
    attr = struct.pack("=QQ", 0, 0b11)  # handled_access_fs, handled_access_net: bind, connect
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = libc.syscall(nr_create, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    if fd < 0:
        raise SystemExit(f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise SystemExit("PR_SET_NO_NEW_PRIVS failed")
    if libc.syscall(nr_restrict, ctypes.c_int(fd), ctypes.c_uint32(0)) != 0:
        raise SystemExit(f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
    os.close(fd)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def error(exc: BaseException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "errno": getattr(exc, "errno", None), "message": str(exc),
            "mro": [c.__name__ for c in type(exc).__mro__]}


def attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        return {"ok": fn()}
    except Exception as exc:  # noqa: BLE001 - the scenario reports what a tool would see
        return {"error": error(exc)}


# --- scenarios ----------------------------------------------------------------------------
# Each takes the spec's params and returns JSON-able data.


def http_get_raw(sock: socket.socket, host: str) -> str:
    sock.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def s_clients(p: dict[str, Any]) -> dict[str, Any]:
    import httpx
    import requests

    url, host, port = p["url"], p["host"], p["port"]

    def urllib_get() -> str:
        with urllib.request.urlopen(url, timeout=10) as r:
            return str(r.read().decode())

    def http_client_get() -> str:
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", "/")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def requests_get() -> str:
        with requests.Session() as s:
            return s.get(url, timeout=10).text

    def httpx_sync() -> str:
        with httpx.Client(trust_env=False) as c:
            return c.get(url, timeout=10).text

    def httpx_async() -> str:
        async def go() -> str:
            async with httpx.AsyncClient(trust_env=False) as c:
                return (await c.get(url, timeout=10)).text
        return asyncio.run(go())

    def asyncio_streams() -> str:
        async def go() -> str:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
            data = await reader.read()
            writer.close()
            await writer.wait_closed()
            return data.split(b"\r\n\r\n", 1)[1].decode()
        return asyncio.run(go())

    def sock_connect() -> str:
        async def go() -> str:
            loop = asyncio.get_running_loop()
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setblocking(False)
                await loop.sock_connect(sock, (host, port))
                await loop.sock_sendall(sock, f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                data = b""
                while chunk := await loop.sock_recv(sock, 65536):
                    data += chunk
            return data.split(b"\r\n\r\n", 1)[1].decode()
        return asyncio.run(go())

    def create_connection() -> str:
        with socket.create_connection((host, port), timeout=10) as sock:
            return http_get_raw(sock, host)

    clients = {"urllib": urllib_get, "http.client": http_client_get, "requests": requests_get,
               "httpx": httpx_sync, "httpx.AsyncClient": httpx_async,
               "asyncio.open_connection": asyncio_streams, "loop.sock_connect": sock_connect,
               "socket.create_connection": create_connection}
    return {name: attempt(fn) for name, fn in clients.items()}


def s_tls(p: dict[str, Any]) -> dict[str, Any]:
    import httpx

    ctx = ssl.create_default_context(cafile=p["cafile"])
    url = p["url"]

    def urllib_get() -> str:
        with urllib.request.urlopen(url, timeout=10, context=ctx) as r:
            return str(r.read().decode())

    def wrapped() -> dict[str, Any]:
        with socket.create_connection(("localhost", p["port"]), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return {"version": tls.version(), "body": http_get_raw(tls, "localhost")}

    def httpx_async() -> str:
        async def go() -> str:
            async with httpx.AsyncClient(verify=ctx, trust_env=False) as c:
                return (await c.get(url, timeout=10)).text
        return asyncio.run(go())

    def asyncio_tls() -> str:
        async def go() -> str:
            reader, writer = await asyncio.open_connection("localhost", p["port"], ssl=ctx)
            writer.write(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            data = await reader.read()
            writer.close()
            return data.split(b"\r\n\r\n", 1)[1].decode()
        return asyncio.run(go())

    return {"urllib": attempt(urllib_get), "ssl.wrap_socket": attempt(wrapped),
            "httpx.AsyncClient": attempt(httpx_async), "asyncio ssl": attempt(asyncio_tls)}


def _sockaddr_in(host: str, port: int) -> bytes:
    return struct.pack("=HH4s8x", socket.AF_INET, socket.htons(port), socket.inet_aton(host))


def s_native(p: dict[str, Any]) -> dict[str, Any]:
    """Connects that bypass the socket object: ``_socket`` and libc through ctypes."""
    host, port = p["host"], p["port"]

    def raw() -> int:
        s = _socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.connect((host, port))
        finally:
            s.close()
        return 0

    def libc() -> int:
        fd = LIBC.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
        addr = _sockaddr_in(host, port)
        try:
            if LIBC.connect(fd, addr, len(addr)) != 0:
                code = ctypes.get_errno()
                raise OSError(code, os.strerror(code))
        finally:
            os.close(fd)
        return 0

    def udp() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
        return 0

    def udp_sendto() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return s.sendto(b"x", (host, port))

    return {"_socket": attempt(raw), "ctypes": attempt(libc), "udp connect": attempt(udp),
            "udp sendto": attempt(udp_sendto)}


def s_errors(p: dict[str, Any]) -> dict[str, Any]:
    """Refused, not granted, timed out, and the non-blocking connect_ex dance."""
    host = p["host"]

    def connect(port: int, timeout: float | None = None) -> int:
        with socket.socket() as s:
            s.settimeout(timeout)
            s.connect((host, port))
        return 0

    def connect_ex(port: int, timeout: float | None = None) -> int:
        with socket.socket() as s:
            s.settimeout(timeout)
            return s.connect_ex((host, port))

    def nonblocking(port: int) -> list[int]:
        """connect_ex until connected, waiting for writability in between: the codes seen."""
        with socket.socket() as s:
            s.setblocking(False)
            codes = [s.connect_ex((host, port))]
            for _ in range(50):
                if codes[-1] not in (errno.EINPROGRESS, errno.EALREADY):
                    break
                select.select([], [s], [], 0.1)
                codes.append(s.connect_ex((host, port)))
            codes.append(s.connect_ex((host, port)))
            return codes

    def asyncio_refused(port: int) -> int:
        async def go() -> int:
            loop = asyncio.get_running_loop()
            with socket.socket() as s:
                s.setblocking(False)
                await loop.sock_connect(s, (host, port))
            return 0
        return asyncio.run(go())

    def raw_after_refused() -> int:
        """After a failed brokered connect, is the object's socket the worker's own again?"""
        with socket.socket() as s:
            assert s.connect_ex((host, p["closed"])) == errno.ECONNREFUSED
            _socket.socket.connect(s, (host, p["open"]))
        return 0

    out = {
        "raw connect after refused": attempt(raw_after_refused),
        "refused connect": attempt(lambda: connect(p["closed"])),
        "refused asyncio": attempt(lambda: asyncio_refused(p["closed"])),
        "refused connect_ex": attempt(lambda: connect_ex(p["closed"])),
        "denied connect": attempt(lambda: connect(p["denied"])),
        "denied connect_ex": attempt(lambda: connect_ex(p["denied"])),
        "nonblocking": attempt(lambda: nonblocking(p["open"])),
        "connected twice": attempt(lambda: _connect_twice(host, p["open"])),
    }
    if "stalled" in p:
        out["timeout connect"] = attempt(lambda: connect(p["stalled"], 0.3))
        out["timeout connect_ex"] = attempt(lambda: connect_ex(p["stalled"], 0.3))
    return out


def _connect_twice(host: str, port: int) -> int:
    with socket.socket() as s:
        s.connect((host, port))
        return s.connect_ex((host, port))


def s_concurrent(p: dict[str, Any]) -> dict[str, Any]:
    results: list[Any] = [None] * p["threads"]

    def fetch(i: int) -> None:
        results[i] = attempt(lambda: urllib.request.urlopen(p["url"], timeout=10).read().decode())

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(p["threads"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return {"results": results}


def s_fds(p: dict[str, Any]) -> dict[str, Any]:
    def fetch() -> str:
        conn = http.client.HTTPConnection(p["host"], p["port"], timeout=10)
        try:
            conn.request("GET", "/")
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    fetch()  # first use imports and caches what it needs
    with socket.create_connection((p["host"], p["port"]), timeout=5) as sock:
        inheritable = os.get_inheritable(sock.fileno())
    before = fd_count()
    bodies = {fetch() for _ in range(p["rounds"])}
    refused = [attempt(lambda: socket.create_connection((p["host"], p["closed"]), timeout=5))
               for _ in range(p["rounds"])]
    return {"before": before, "after": fd_count(), "bodies": sorted(bodies),
            "inheritable": inheritable,
            "refused": sorted({r["error"]["type"] for r in refused if "error" in r})}


def s_lookups(p: dict[str, Any]) -> dict[str, Any]:
    return {
        "getaddrinfo": attempt(lambda: sorted({i[4][0] for i in socket.getaddrinfo(
            p["name"], p["port"], type=socket.SOCK_STREAM)})),
        "getaddrinfo types": attempt(lambda: [
            (type(i[0]).__name__, type(i[1]).__name__) for i in socket.getaddrinfo(
                p["name"], p["port"], socket.AF_INET, socket.SOCK_STREAM)][:1]),
        "gethostbyname": attempt(lambda: socket.gethostbyname(p["name"])),
        "gethostbyname_ex": attempt(lambda: socket.gethostbyname_ex(p["name"])[2]),
        "numeric": attempt(lambda: socket.getaddrinfo("127.0.0.1", 80, socket.AF_INET,
                                                      socket.SOCK_STREAM)[0][4]),
        "gethostbyaddr": attempt(lambda: socket.gethostbyaddr(p["address"])[0]),
        "getnameinfo": attempt(lambda: socket.getnameinfo((p["address"], 80), 0)),
        "getnameinfo numeric": attempt(lambda: socket.getnameinfo(
            (p["address"], 80), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)),
        "connect by name": attempt(lambda: http_get_raw(
            socket.create_connection((p["name"], p["port"]), timeout=10), p["name"])),
    }


def s_options(p: dict[str, Any]) -> dict[str, Any]:
    """Options set before connect hold on the connected socket (urllib3 sets TCP_NODELAY)."""
    wanted = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1), (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
              (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77), (socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)]
    with socket.socket() as s:
        for level, name, value in wanted:
            s.setsockopt(level, name, value)
        s.settimeout(7.5)
        s.connect((p["host"], p["port"]))
        return {"options": [s.getsockopt(level, name) for level, name, _ in wanted],
                "timeout": s.gettimeout(), "blocking": s.getblocking()}


def s_unix(p: dict[str, Any]) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(p["path"])
        s.sendall(b"ping")
        return {"reply": s.recv(16).decode()}


def s_between_calls(p: dict[str, Any]) -> dict[str, Any]:
    from failcore_worker import _broker

    inside = attempt(lambda: len(urllib.request.urlopen(p["url"], timeout=10).read()))
    _broker.end_call()
    after = attempt(lambda: socket.create_connection((p["host"], p["port"]), timeout=5).close())
    lookup = attempt(lambda: socket.getaddrinfo("localhost", 80))
    _broker.begin_call()
    again = attempt(lambda: len(urllib.request.urlopen(p["url"], timeout=10).read()))
    return {"inside": inside, "after": after, "lookup": lookup, "again": again}


def s_fork(p: dict[str, Any]) -> dict[str, Any]:
    """A forked child of the worker gets no broker (it would share the worker's channel)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what a connect does, then leave at once
        try:
            outcome = attempt(lambda: socket.create_connection((p["host"], p["port"]), timeout=5))
            os.write(write, json.dumps(outcome, default=repr).encode())
        finally:
            os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    parent = attempt(lambda: socket.create_connection((p["host"], p["port"]), timeout=5).close())
    return {"child": json.loads(data), "worker after": parent}


def s_budget(p: dict[str, Any]) -> dict[str, Any]:
    out = []
    for _ in range(p["tries"]):
        out.append(attempt(lambda: socket.create_connection((p["host"], p["port"]), timeout=5).close()))
    return {"results": out}


def s_with_guards(p: dict[str, Any]) -> dict[str, Any]:
    """The lead's order: guards installed, then the broker; both hold at once."""
    import requests

    from failcore_worker import _broker, guards
    from failcore_worker.rules import Grants

    with requests.Session() as s:  # import-time and first-use file reads before the guards
        s.get(p["url"], timeout=10)
    base = tempfile.mkdtemp()
    grants = Grants.from_wire(p["grants"])
    guards.install(grants, base)
    guards.set_call(grants, base)
    _broker.begin_call()
    with requests.Session() as s:
        body = attempt(lambda: s.get(p["url"], timeout=10).text)
    secret = attempt(lambda: open("/etc/hostname").read())
    return {"body": body, "file outside grants": secret,
            "events": [e.get("op") for e in guards.take_events()]}


def s_disconnect(p: dict[str, Any]) -> dict[str, Any]:
    """What a tool holding a brokered descriptor can do with it below Python: the socket
    belongs to the parent's namespace. Characterises the residual (see the test)."""
    host = p["host"]
    s = socket.create_connection((host, p["granted"]), timeout=5)
    unspec = struct.pack("=H14x", socket.AF_UNSPEC)
    out: dict[str, Any] = {}
    code = LIBC.connect(s.fileno(), unspec, len(unspec))
    out["disconnect"] = 0 if code == 0 else os.strerror(ctypes.get_errno())
    addr = _sockaddr_in(host, p["other"])
    code = LIBC.connect(s.fileno(), addr, len(addr))
    out["reconnect elsewhere"] = 0 if code == 0 else os.strerror(ctypes.get_errno())
    s.close()
    if p.get("listen"):  # netns-only: an autobound listener appears on the parent's 0.0.0.0
        s = socket.create_connection((host, p["granted"]), timeout=5)
        LIBC.connect(s.fileno(), unspec, len(unspec))
        code = LIBC.listen(s.fileno(), 1)
        out["listen"] = 0 if code == 0 else os.strerror(ctypes.get_errno())
        out["listening on"] = list(s.getsockname()) if code == 0 else None
        s.close()
    return out


SCENARIOS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "clients": s_clients, "tls": s_tls, "native": s_native, "errors": s_errors,
    "concurrent": s_concurrent, "fds": s_fds, "options": s_options, "lookups": s_lookups, "unix": s_unix,
    "between_calls": s_between_calls, "fork": s_fork, "budget": s_budget, "with_guards": s_with_guards,
    "disconnect": s_disconnect,
}


def main() -> None:
    spec = json.loads(sys.argv[1])
    enter_netns(spec["privileged"], spec["outer_netns"])
    from failcore_worker import _broker

    chan = socket.socket(fileno=spec["chan"])
    _broker.install(_broker.channel_ask(chan))
    _broker.begin_call()
    if spec["params"].get("landlock"):
        landlock_tcp()
    info = {"uid": os.getuid(), "euid": os.geteuid(),
            "netns": os.stat("/proc/self/ns/net").st_ino}
    try:
        result = SCENARIOS[spec["scenario"]](spec["params"])
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which fails on it
        result = {"crashed": error(exc), "traceback": traceback.format_exc()}
    sys.stdout.write(json.dumps({"info": info, "result": result}, default=repr))
    sys.stdout.flush()
    chan.close()


if __name__ == "__main__":
    main()
