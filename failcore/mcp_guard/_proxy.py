"""The egress proxy: a guarded server's only way out of its empty network namespace.

Why a proxy and not the socket broker: the server is a program FailCore did not write
(node, Go, Python), so there is no socket object to put a brokered descriptor under. Its
HTTP clients honour ``HTTP_PROXY``/``HTTPS_PROXY`` (set by the launcher), and the one
listening socket inside its namespace belongs to this proxy, which runs in the parent,
outside. Everything else the server tries fails in the kernel (no route; Landlock allows
TCP connect to that one port only).

Each request is judged like a brokered connect, on the address actually dialled:

1. whether the name may be looked up at all (``check_resolve``, the socket broker's
   rule): an internal name, or a name no grant covers when no address grant could cover
   what it resolves to, is refused unresolved (a lookup is a data channel of its own);
2. the name is resolved *here* (the server's own resolver is never consulted);
3. every resolved address is judged with ``rules.check_connect`` (names: the host as
   asked), and only an allowed address is dialled, so a name that resolves to both a
   public and a private address reaches the public one or nothing.

``CONNECT host:port`` tunnels (HTTPS) and absolute-form ``GET http://...`` requests
(plain HTTP, one request per connection: ``Connection: close``) are served; anything
else is a 400/405. A redirect is the client's next request, judged again. A refusal is
``403`` with the rule in ``X-FailCore-Rule`` and the body. Every decision is a
``GuardEvent`` (``observed: "parent"``) for the trace. Bounded: connections at once,
request head size, and time to send the head, connect and stay idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from failcore_worker import rules
from failcore_worker.protocol import GuardEvent
from failcore_worker.rules import Grants, Verdict, check_resolve

__all__ = ["EgressProxy", "ProxyLimits"]

_HOP_HEADERS = {"proxy-connection", "proxy-authorization", "connection", "keep-alive",
                "te", "trailer", "upgrade"}


@dataclass(frozen=True)
class ProxyLimits:
    connections: int = 64
    head_bytes: int = 64 * 1024
    head_timeout_s: float = 30.0
    resolve_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    idle_timeout_s: float = 120.0


def _split_authority(authority: str) -> tuple[str, int] | None:
    if authority.startswith("["):
        host, _, rest = authority[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = authority.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    return host, int(port_text)


class EgressProxy:
    """Serve the proxy on ``listener`` (a listening TCP socket, possibly of another
    network namespace) until cancelled. ``record`` receives every decision."""

    def __init__(self, listener: socket.socket, grants: Grants,
                 record: Callable[[GuardEvent], None], limits: ProxyLimits = ProxyLimits()) -> None:
        self.listener = listener
        self.grants = grants
        self.record = record
        self.limits = limits
        self._slots = asyncio.Semaphore(limits.connections)
        self.handled = 0

    async def serve(self) -> None:
        self.listener.setblocking(False)
        server = await asyncio.start_server(self._handle, sock=self.listener,
                                            limit=self.limits.head_bytes)
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            await _reply(writer, 503, "too many connections through the FailCore proxy at once",
                         "proxy: connection limit")
            return
        async with self._slots:
            self.handled += 1
            try:
                await self._serve_one(reader, writer)
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"),
                                          self.limits.head_timeout_s)
        except (asyncio.LimitOverrunError, ValueError):
            await _reply(writer, 431, "request head too large", "proxy: head too large")
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await _reply(writer, 400, "malformed request line", "proxy: malformed request")
            return
        method, target, version = parts
        if method == "CONNECT":
            where = _split_authority(target)
            if where is None:
                await _reply(writer, 400, f"CONNECT needs host:port, got {target!r}",
                             "proxy: malformed request")
                return
            host, port = where
            label, path = f"CONNECT {host}:{port}", ""
        else:
            url = urlsplit(target)
            if url.scheme != "http" or not url.hostname:
                await _reply(writer, 400, "only absolute http:// requests and CONNECT are "
                             "proxied (use CONNECT for https)", "proxy: unsupported request")
                return
            try:
                port = url.port or 80
            except ValueError:
                await _reply(writer, 400, "bad port", "proxy: malformed request")
                return
            host = url.hostname
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            label = f"{method} {target}"
        upstream = await self._open(host, port, label, writer)
        if upstream is None:
            return
        up_reader, up_writer = upstream
        try:
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                headers = [line for line in lines[1:] if line and
                           line.split(":", 1)[0].strip().lower() not in _HOP_HEADERS]
                out = "\r\n".join([f"{method} {path} {version}", *headers, "Connection: close",
                                   "", ""])
                up_writer.write(out.encode("latin-1"))
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            up_writer.close()

    async def _open(self, host: str, port: int, label: str, writer: asyncio.StreamWriter,
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        literal = rules.parse_ip(host.strip("[]"))
        if literal is not None:
            candidates, names = [str(literal)], []
        else:
            verdict = check_resolve(self.grants, host, port)  # the socket broker's rule
            if not verdict.allowed:
                self.record({"op": "net.resolve", "target": label, "host": host, "port": port,
                             "action": "block", "rule": verdict.rule, "reason": verdict.reason,
                             "observed": "parent"})
                await _reply(writer, 403, verdict.reason, verdict.rule)
                return None
            try:
                infos = await asyncio.wait_for(
                    asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM),
                    self.limits.resolve_timeout_s)
            except (TimeoutError, OSError) as exc:
                await _reply(writer, 502, f"cannot resolve {host}: {exc}", "proxy: lookup failed")
                return None
            candidates = list(dict.fromkeys(str(info[4][0]) for info in infos))
            names = [host.lower().rstrip(".")]
        refusal: Verdict | None = None
        for ip in candidates:
            verdict = rules.check_connect(self.grants, ip, port, names)
            shown = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            self.record({"op": "net.connect", "target": f"{label} -> {shown}", "host": ip,
                         "port": port, "names": names, "action": verdict.action,
                         "rule": verdict.rule, "reason": verdict.reason, "observed": "parent"})
            if not verdict.allowed:
                refusal = refusal or verdict
                continue
            try:
                return await asyncio.wait_for(asyncio.open_connection(ip, port),
                                              self.limits.connect_timeout_s)
            except (TimeoutError, OSError) as exc:
                await _reply(writer, 502, f"cannot connect to {shown}: {exc}",
                             "proxy: connect failed")
                return None
        assert refusal is not None or not candidates
        if refusal is None:
            await _reply(writer, 502, f"{host} resolved to no address", "proxy: lookup failed")
        else:
            await _reply(writer, 403, refusal.reason, refusal.rule)
        return None

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                chunk = await asyncio.wait_for(src.read(65536), self.limits.idle_timeout_s)
                if not chunk:
                    break
                dst.write(chunk)
                await dst.drain()
        except (TimeoutError, OSError):
            pass
        finally:
            with contextlib.suppress(OSError):
                if dst.can_write_eof():
                    dst.write_eof()


async def _reply(writer: asyncio.StreamWriter, status: int, text: str, rule: str) -> None:
    reasons = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed",
               431: "Request Header Fields Too Large", 502: "Bad Gateway",
               503: "Service Unavailable"}
    body = f"FailCore proxy refused ({rule}): {text}\n".encode()
    safe_rule = rule.encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")
    writer.write(f"HTTP/1.1 {status} {reasons.get(status, 'Error')}\r\nContent-Type: text/plain; "
                 f"charset=utf-8\r\nX-FailCore-Rule: {safe_rule}\r\nContent-Length: {len(body)}"
                 "\r\nConnection: close\r\n\r\n".encode() + body)
    with contextlib.suppress(OSError):
        await writer.drain()
