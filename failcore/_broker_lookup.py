"""Name lookups for the socket broker: judged before they are made, made with a deadline.

A DNS query is a data channel of its own (the name reaches whoever serves its zone), so
the broker judges a lookup before making it, with the decision the worker's guards use
(``failcore_worker.rules.check_resolve``, called by ``_broker``), and a reverse lookup as
the forward lookup of its PTR name. Lookups run on a few daemon threads so that the
broker can give up when the call's time is up: ``getaddrinfo`` has no timeout of its
own, and a hung resolver must not hold the parent's exchange loop. A lookup it gave up on finishes (or hangs) on its thread; past
``MAX_PENDING`` such lookups new ones are refused at once (``EAI_AGAIN``).

``Resolver`` is the seam tests use: a fake one answers from a table, so names other than
``localhost`` are never looked up for real outside a private network namespace.
"""

from __future__ import annotations

import ipaddress
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Protocol, TypeVar

__all__ = ["Resolver", "SystemResolver", "LookupTimeout", "reverse_name"]

T = TypeVar("T")
THREADS = 4
MAX_PENDING = 32


class LookupTimeout(Exception):
    """The lookup did not finish before the call's deadline (or too many are pending)."""


class Resolver(Protocol):
    """Where the broker's lookups go; each call may block at most ``timeout`` seconds."""

    def getaddrinfo(self, host: str, port: int | str | None, family: int, type: int,
                    proto: int, flags: int, timeout: float) -> list[tuple[Any, ...]]: ...

    def gethostbyaddr(self, ip: str, timeout: float) -> tuple[str, list[str], list[str]]: ...

    def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int,
                    timeout: float) -> tuple[str, str]: ...


class _Pool:
    """A few daemon threads running lookups; callers wait on a future with a timeout."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Future[Any], Callable[[], Any]]] = queue.Queue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._pending = 0

    def run(self, fn: Callable[[], T], timeout: float) -> T:
        future: Future[T] = Future()
        with self._lock:
            if self._pending >= MAX_PENDING:
                raise LookupTimeout(f"{MAX_PENDING} lookups are already pending")
            self._pending += 1
            if len(self._threads) < min(THREADS, self._pending):
                thread = threading.Thread(target=self._serve, name="failcore-lookup", daemon=True)
                thread.start()
                self._threads.append(thread)
        self._jobs.put((future, fn))
        try:
            return future.result(timeout=max(timeout, 0.0))
        except FutureTimeout:
            raise LookupTimeout("the call's time ran out during the lookup") from None

    def _serve(self) -> None:
        while True:
            future, fn = self._jobs.get()
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(exc)
            finally:
                with self._lock:
                    self._pending -= 1


_POOL = _Pool()


class SystemResolver:
    """The parent's own resolver (``socket`` module), bounded by the call's deadline."""

    def getaddrinfo(self, host: str, port: int | str | None, family: int, type: int,
                    proto: int, flags: int, timeout: float) -> list[tuple[Any, ...]]:
        return _POOL.run(lambda: socket.getaddrinfo(host, port, family, type, proto, flags),
                         timeout)

    def gethostbyaddr(self, ip: str, timeout: float) -> tuple[str, list[str], list[str]]:
        return _POOL.run(lambda: socket.gethostbyaddr(ip), timeout)

    def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int,
                    timeout: float) -> tuple[str, str]:
        return _POOL.run(lambda: socket.getnameinfo(sockaddr, flags), timeout)


def reverse_name(ip: str) -> str:
    """The PTR name a reverse lookup of ``ip`` queries (``4.3.2.1.in-addr.arpa``)."""
    return ipaddress.ip_address(ip.split("%", 1)[0]).reverse_pointer
