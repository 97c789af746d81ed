"""Shared fixtures: no process outlives a test; non-loopback tests only inside a netns;
integration tests (third-party SDKs in this process) reach nothing but loopback."""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from hypothesis import settings

# No per-example deadline: the machines are shared and noisy, and a slow example is not a
# wrong one (pytest-timeout still bounds every test). In CI, derandomised: a run that
# fails fails again on a rerun.
settings.register_profile("failcore", deadline=None, print_blob=True)
settings.register_profile("ci", parent=settings.get_profile("failcore"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "failcore")


def in_private_netns() -> bool:
    """True when the only network interface is loopback (a fresh ``unshare -n``)."""
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return False
    return names <= {"lo"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if in_private_netns():
        return
    skip = pytest.mark.skip(
        reason="attempts non-loopback connections: runs only inside a fresh network "
        "namespace (unshare -n), never in the open; .ci/run runs it that way"
    )
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})


def _loopback(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if not isinstance(host, str):
        return False
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True)
def integration_offline(request: pytest.FixtureRequest,
                        monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Integration tests run third-party SDKs in this process; any of them phoning home
    (telemetry, a model call by mistake) would be traffic. For tests marked
    ``integration`` this process may only resolve and connect to loopback."""
    if request.node.get_closest_marker("integration") is None:
        yield
        return
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is not None and not _loopback(host):
            raise OSError(f"integration test tried to resolve {host!r}: only loopback here")
        return real_getaddrinfo(host, *args, **kwargs)

    def refuse(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
            raise OSError(f"integration test tried to connect to {address!r}: only loopback here")

    def connect(sock: socket.socket, address: Any) -> None:
        refuse(sock, address)
        real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        refuse(sock, address)
        return real_connect_ex(sock, address)

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)  # a proxy would take loopback traffic off-box
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield


def _descendants() -> set[int]:
    try:
        return {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
    except psutil.Error:
        return set()


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every process a test starts is gone when the test ends (sessions closed, trees killed)."""
    before = _descendants()
    yield
    deadline = time.monotonic() + 5.0
    left = _descendants() - before
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = _descendants() - before
    if left:
        details = []
        for pid in left:
            try:
                p = psutil.Process(pid)
                details.append(f"{pid} {p.name()} {p.cmdline()[:4]}")
                p.kill()
            except psutil.Error:
                pass
        pytest.fail(f"processes outlived the test: {details}")


def idle_worker_pids(session: object, tool: str) -> list[int]:
    """Pids of ``tool``'s idle warm workers in a session on the local backend."""
    warm = session._backend._warm_of(tool)  # type: ignore[attr-defined]
    with warm.cond:
        return [w.pid for w in warm.free]
