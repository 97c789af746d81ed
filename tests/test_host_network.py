"""Host-network tools (``ToolMetadata(network="host")``, issue 16 item 7) and the watchdog
watching the whole tree (item 4).

A host-network worker keeps the host's network (for clients that connect from C), so the
kernel limits it differently: Landlock lets TCP connect reach only the granted ports and
bind only an ephemeral port; signals and abstract unix sockets stay scoped; the guards and
the watchdog judge addresses. Every listener here is on loopback, opened by the test, and
checked to have received nothing where nothing may arrive.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from failcore import (
    Limits,
    RegistrationError,
    SecurityError,
    Session,
    SideEffect,
    ToolMetadata,
    presets,
)
from failcore._trace import read_trace
from failcore_worker import _landlock

ABI = _landlock.abi_version()
pytestmark = pytest.mark.skipif(ABI < 6, reason=f"needs Landlock ABI 6 or later (this kernel "
                                                f"has {ABI})")


def host(*caps: str, **extra: Any) -> ToolMetadata:
    effects = [SideEffect.NETWORK] + ([SideEffect.PROCESS] if any(
        c.startswith("proc:") for c in caps) else [])
    return ToolMetadata(side_effect=effects, capabilities=list(caps), network="host", **extra)


# --- tools ------------------------------------------------------------------------------------


def guards_off() -> None:
    from failcore_worker import guards

    guards.runtime_begin()


def connect(port: int, bypass: bool) -> int:
    if bypass:
        guards_off()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        return 0
    except OSError as exc:
        return exc.errno or -1


def bind(port: int) -> int:
    guards_off()
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return 0
        except OSError as exc:
            return exc.errno or -1


def abstract_connect(name: str) -> int:
    guards_off()
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect("\0" + name)
            return 0
        except OSError as exc:
            return exc.errno or -1


def signal_zero(pid: int) -> int:
    try:
        os.kill(pid, 0)
        return 0
    except OSError as exc:
        return exc.errno or -1


def hold_connection(port: int) -> str:
    guards_off()
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    time.sleep(10)
    s.close()
    return "not stopped"


def child_holds_connection(python: list[str], port: int) -> str:
    """A program under proc:exec runs unguarded: the watchdog must see its sockets."""
    import subprocess

    code = (f"import socket, time; s = socket.create_connection(('127.0.0.1', {port}), "
            "timeout=2); time.sleep(10)")
    subprocess.run(["/" + "/".join(python), "-I", "-c", code], timeout=20, check=False)
    return "not stopped"


# --- fixtures ---------------------------------------------------------------------------------


def _listen() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    return srv


@pytest.fixture
def granted() -> Iterator[socket.socket]:
    srv = _listen()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def other() -> Iterator[socket.socket]:
    srv = _listen()
    try:
        yield srv
    finally:
        srv.close()


def port_of(srv: socket.socket) -> int:
    return int(srv.getsockname()[1])


def accepted(srv: socket.socket) -> int:
    n = 0
    while True:
        try:
            srv.accept()[0].close()
            n += 1
        except BlockingIOError:
            return n


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    with Session(trace=tmp_path / "trace.jsonl", confinement="require") as s:
        yield s


# --- registration -----------------------------------------------------------------------------


def test_network_values_are_checked(session: Session) -> None:
    with pytest.raises(RegistrationError, match="network must be one of 'none', 'host'"):
        session.register("t", connect, ToolMetadata(network="lan"))  # type: ignore[arg-type]
    with pytest.raises(RegistrationError, match="needs side_effect=SideEffect.NETWORK"):
        session.register("t", connect, ToolMetadata(network="host"))


def test_confinement_and_trace_say_which_tools_use_the_host_network(
        session: Session, tmp_path: Path) -> None:
    session.register("c_client", connect, host("net:connect:127.0.0.1:5432"))
    session.register("wide", connect, host("net:connect:127.0.0.1"))
    session.register("pure", signal_zero, ToolMetadata())
    assert set(session.confinement.host_network) == {"c_client", "wide"}
    assert "c_client" in str(session.confinement)
    notes = {t.name: t.notes for t in session.confinement.tools}
    assert notes["c_client"] == () and notes["pure"] == ()
    assert any("TCP connect not handled" in n and "more than 256 ports" in n
               for n in notes["wide"]), notes["wide"]
    bodies = {r["body"]["tool"]: r["body"] for r in read_trace(tmp_path / "trace.jsonl")
              if r["kind"] == "tool.register"}
    assert bodies["c_client"]["network"] == "host" and bodies["pure"]["network"] == "none"
    assert bodies["wide"]["kernel_notes"] == list(notes["wide"])


# --- the kernel's rules for a host-network worker ---------------------------------------------


def test_connect_reaches_only_the_granted_port(session: Session, granted: socket.socket,
                                               other: socket.socket) -> None:
    session.register("c", connect, host(f"net:connect:127.0.0.1:{port_of(granted)}"))
    assert session.call("c", port=port_of(granted), bypass=False) == 0
    assert accepted(granted) == 1
    assert session.call("c", port=port_of(other), bypass=True) == errno.EACCES
    assert accepted(other) == 0


def test_bind_only_an_ephemeral_port(session: Session, granted: socket.socket) -> None:
    session.register("b", bind, host(f"net:connect:127.0.0.1:{port_of(granted)}"))
    assert session.call("b", port=0) == 0
    # A chosen port is refused before the kernel even looks whether it is in use.
    assert session.call("b", port=port_of(granted)) == errno.EACCES


def test_signals_and_abstract_sockets_stay_scoped(session: Session) -> None:
    name = f"failcore-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind("\0" + name)
        srv.listen(1)
        srv.setblocking(False)
        session.register("uds", abstract_connect, host("net:connect:127.0.0.1:1"))
        assert session.call("uds", name=name) == errno.EPERM
        with pytest.raises(BlockingIOError):
            srv.accept()
    session.register("sig", signal_zero, host("net:connect:127.0.0.1:1"))
    assert session.call("sig", pid=os.getpid()) == errno.EPERM


# --- the watchdog watches every descendant ------------------------------------------------------


def test_watchdog_sees_the_worker_itself(tmp_path: Path, granted: socket.socket) -> None:
    port = port_of(granted)
    with Session(validator=presets.net_safe(strict=True), confinement="require") as s:
        # The kernel allows the port; net_safe refuses loopback by any name: only the
        # watchdog is left to judge a connection the guards did not see.
        s.register("hold", hold_connection,
                   host(f"net:connect:*.example.com:{port}", limits=Limits(timeout_s=20)))
        started = time.monotonic()
        with pytest.raises(SecurityError) as info:
            s.call("hold", port=port)
    assert info.value.rule == "watchdog: net", str(info.value)
    assert f"127.0.0.1:{port}" in str(info.value)
    assert time.monotonic() - started < 8


def test_watchdog_sees_a_program_run_under_proc_exec(tmp_path: Path,
                                                     granted: socket.socket) -> None:
    port = port_of(granted)
    python = os.path.realpath(sys.executable)
    with Session(validator=presets.net_safe(strict=True), confinement="require") as s:
        s.register("child", child_holds_connection,
                   host(f"net:connect:*.example.com:{port}", f"proc:exec:{python}",
                        limits=Limits(timeout_s=30)))
        with pytest.raises(SecurityError) as info:
            s.call("child", python=[p for p in python.split("/") if p], port=port)
    assert info.value.rule == "watchdog: net", str(info.value)
    assert "descendant" in str(info.value) and f"127.0.0.1:{port}" in str(info.value)
