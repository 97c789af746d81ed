"""Real HTTP clients inside a tool, through the Session, against loopback servers.

urllib.request, http.client, httpx and requests must work when the exact loopback address
and port are granted, fail with ``SecurityError`` when they are not, and fail at the
second connect when a granted server redirects to a port that is not granted (the guard
judges every connect, not just the URL the tool was given). Every server listens on
127.0.0.1 or ::1 and is stopped by its fixture.

What the rules say about loopback (``worker/rules.py``): net_safe blocks loopback unless a
capability names the address by IP or CIDR, or names ``localhost``, which covers every
loopback address (127.0.0.0/8 and ::1) whatever name the tool used. A grant for any other
name that resolves to loopback is the DNS trick net_safe exists to stop.
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _broker_harness import HTTPServer as Server

from failcore import Policy, SecurityError, Session, SideEffect, ToolMetadata, presets


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HOSTS = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(
    not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine"))]


@pytest.fixture(params=HOSTS, ids=["v4", "v6"])
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    srv = Server(request.param)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def other() -> Iterator[Server]:
    """A second server on 127.0.0.1 that no tool is granted."""
    srv = Server("127.0.0.1")
    try:
        yield srv
    finally:
        srv.close()


POLICIES: dict[str, Callable[[], Policy | None]] = {
    "no-policy": lambda: None, "net_safe": lambda: presets.net_safe(strict=True)}


@pytest.fixture(params=sorted(POLICIES))
def session(request: pytest.FixtureRequest) -> Iterator[Session]:
    with Session(validator=POLICIES[request.param]()) as s:
        yield s


# --- tools ------------------------------------------------------------------------------------


def urllib_get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def httpclient_get(host: str, port: int, path: str) -> str:
    import http.client

    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def httpx_get(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=5, follow_redirects=True).text


def requests_get(url: str) -> str:
    import requests

    return requests.get(url, timeout=5).text


def _needs(module: str) -> Any:
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed")


URL_CLIENTS = [
    pytest.param(urllib_get, id="urllib"),
    pytest.param(httpx_get, id="httpx", marks=_needs("httpx")),
    pytest.param(requests_get, id="requests", marks=_needs("requests")),
]


def net(*caps: str) -> ToolMetadata:
    return ToolMetadata(side_effect=SideEffect.NETWORK, capabilities=list(caps))


def grant(srv: Server, host: str | None = None) -> str:
    shown = host or (f"[{srv.host}]" if ":" in srv.host else srv.host)
    return f"net:connect:{shown}:{srv.port}"


# --- granted: works ---------------------------------------------------------------------------


@pytest.mark.parametrize("client", URL_CLIENTS)
def test_granted_get_returns_the_body(session: Session, server: Server,
                                      client: Callable[..., str]) -> None:
    session.register("get", client, net(grant(server)))
    assert session.call("get", url=server.url()) == server.body
    assert session.call("get", url=server.url("/again")) == server.body, "warm worker reused"
    assert server.hits == ["/", "/again"]


def test_granted_http_client(session: Session, server: Server) -> None:
    session.register("get", httpclient_get, net(grant(server)))
    assert session.call("get", host=server.host, port=server.port, path="/x") == server.body
    assert server.hits == ["/x"]


# --- not granted: refused ---------------------------------------------------------------------


@pytest.mark.parametrize("client", URL_CLIENTS)
def test_port_not_granted_is_refused_before_dispatch(session: Session, server: Server,
                                                     client: Callable[..., str]) -> None:
    session.register("get", client, net(grant(server)[: -len(str(server.port))] + "1"))
    with pytest.raises(SecurityError) as info:
        session.call("get", url=server.url())
    assert info.value.layer == "precheck"
    assert server.hits == []


def test_port_not_granted_is_refused_in_the_worker(session: Session, server: Server) -> None:
    # host and port passed apart: the pre-check sees no URL, the connect guard does
    session.register("get", httpclient_get, net("net:connect:127.0.0.1:1", "net:connect:[::1]:1"))
    with pytest.raises(SecurityError) as info:
        session.call("get", host=server.host, port=server.port, path="/")
    assert info.value.layer == "worker"
    # net_safe stops a client that resolves the literal first, before it connects
    assert info.value.target in (server.netloc(), server.host)
    assert server.hits == []


@pytest.mark.parametrize("client", URL_CLIENTS)
def test_redirect_to_a_port_not_granted_is_caught_at_the_second_connect(
        session: Session, server: Server, other: Server, client: Callable[..., str]) -> None:
    server.httpd.redirect_to = other.url("/stolen")
    session.register("get", client, net(grant(server)))
    with pytest.raises(SecurityError) as info:
        session.call("get", url=server.url("/redirect"))
    err = info.value
    assert err.layer == "worker", str(err)
    assert err.target in (other.netloc(), other.host), str(err)
    assert server.hits == ["/redirect"], "the first, granted request went through"
    assert other.hits == [], "the redirect target was never reached"


# --- loopback by name -------------------------------------------------------------------------


@pytest.mark.parametrize("client", URL_CLIENTS)
def test_localhost_grant_covers_loopback_by_name_and_address(
        session: Session, other: Server, client: Callable[..., str]) -> None:
    session.register("get", client, net(f"net:connect:localhost:{other.port}"))
    assert session.call("get", url=f"http://localhost:{other.port}/") == other.body
    assert session.call("get", url=other.url()) == other.body, "127.0.0.1 is localhost"
    assert other.hits == ["/", "/"]


@pytest.mark.parametrize("client", URL_CLIENTS)
def test_ip_grant_covers_the_name_localhost(session: Session, other: Server,
                                            client: Callable[..., str]) -> None:
    session.register("get", client, net(grant(other)))
    assert session.call("get", url=f"http://localhost:{other.port}/") == other.body


@pytest.mark.parametrize("client", URL_CLIENTS)
def test_localhost_without_a_covering_grant_is_refused(
        session: Session, other: Server, client: Callable[..., str]) -> None:
    session.register("get", client, net(f"net:connect:api.example.com:{other.port}"))
    with pytest.raises(SecurityError):
        session.call("get", url=f"http://localhost:{other.port}/")
    assert other.hits == []


def _hosts_alias_for_loopback() -> str | None:
    """A name other than localhost that /etc/hosts maps to 127.0.0.0/8, if any."""
    try:
        with open("/etc/hosts") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and fields[0].startswith("127."):
            names = [n for n in fields[1:] if "localhost" not in n and "." not in n]
            if names:
                return names[0]
    return None


@pytest.mark.netns  # resolving a name other than localhost could reach a DNS server
def test_other_name_resolving_to_loopback(other: Server) -> None:
    alias = _hosts_alias_for_loopback()
    if alias is None:
        pytest.skip("/etc/hosts maps no name but localhost to loopback")
    with Session(validator=presets.net_safe(strict=True)) as strict, Session() as plain:
        for s in (strict, plain):
            s.register("get", urllib_get, net(f"net:connect:{alias}:{other.port}"))
        # without net_safe the name grant is honoured wherever it resolves to ...
        assert plain.call("get", url=f"http://{alias}:{other.port}/") == other.body
        # ... with it, the connect to loopback is refused whatever name led there
        with pytest.raises(SecurityError) as info:
            strict.call("get", url=f"http://{alias}:{other.port}/")
    assert info.value.layer == "worker"
    assert info.value.rule == "net_safe: 127.0.0.0/8 (loopback)"
    assert other.hits == ["/"]
