"""Layers that back each other up: the watchdog (layer 4) when the guards are bypassed,
the SPEC example as written, refusals before any worker runs, and the uid drop.

The watchdog tests run with ``confinement="off"``: with the kernel layers on, the kernel
refuses these escapes first (tests/test_kernel.py); here the watchdog is shown to be the
backstop on a kernel without them."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from failcore import (
    DefaultPolicy,
    InputValidationError,
    Limits,
    RiskLevel,
    SecurityError,
    Session,
    SideEffect,
    ToolMetadata,
    presets,
)
from failcore._privilege import plan


@pytest.fixture
def listener() -> Iterator[int]:
    """A loopback TCP server that accepts and holds connections."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    thread.join(2)
    for c in conns:
        c.close()
    srv.close()


def bypass_and_connect(port: int) -> str:
    # Simulates code the in-process guards cannot see (an extension calling libc): turn
    # the guard off for this thread, then connect and hold the connection.
    import socket
    import time

    from failcore_worker import guards

    guards.runtime_begin()
    s = socket.create_connection(("127.0.0.1", port), timeout=2)
    time.sleep(10)
    s.close()
    return "not stopped"


def bypass_and_spawn() -> str:
    import subprocess
    import time

    from failcore_worker import guards

    guards.runtime_begin()
    subprocess.Popen(["/bin/sleep", "30"])
    time.sleep(10)
    return "not stopped"


def test_watchdog_kills_a_connection_the_guards_missed(listener: int) -> None:
    with Session(confinement="off") as s:
        s.register("sneak", bypass_and_connect, ToolMetadata(limits=Limits(timeout_s=20)))
        started = time.monotonic()
        with pytest.raises(SecurityError) as info:
            s.call("sneak", port=listener)
        assert info.value.layer == "watchdog" and info.value.rule == "watchdog: net"
        assert f"127.0.0.1:{listener}" in str(info.value)
        assert time.monotonic() - started < 5, "the watchdog acts within its poll interval"
        s.register("ok", lambda: "fine")
        assert s.call("ok") == "fine"


def test_watchdog_kills_a_child_process_the_guards_missed() -> None:
    with Session(confinement="off") as s:
        s.register("spawn", bypass_and_spawn, ToolMetadata(limits=Limits(timeout_s=20)))
        with pytest.raises(SecurityError) as info:
            s.call("spawn")
        assert info.value.rule == "watchdog: exec"


def fetch(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as r:
        return str(r.read(100))


def test_spec_example_blocked_call_names_the_rule() -> None:
    with Session(validator=presets.net_safe(strict=True)) as session:
        session.register(
            "http_get", fetch,
            metadata=ToolMetadata(
                risk_level=RiskLevel.HIGH,
                side_effect=SideEffect.NETWORK,
                default_policy=DefaultPolicy.BLOCK,
                capabilities=["net:connect:api.github.com:443"],
                limits=Limits(timeout_s=10, memory_mb=256),
            ),
        )
        with pytest.raises(SecurityError) as info:
            session.call("http_get", url="http://169.254.169.254/latest/meta-data/")
        assert "169.254.0.0/16" in str(info.value) and "link-local" in str(info.value)
        assert info.value.layer == "precheck"


@pytest.mark.netns
def test_spec_example_runs_as_written_in_a_namespace() -> None:
    """The SPEC section 2 example verbatim; the allowed call finds no network in the netns."""
    from failcore import FailCoreError

    session = Session(validator=presets.net_safe(strict=True), trace=None)
    try:
        session.register("http_get", fetch, metadata=ToolMetadata(
            risk_level=RiskLevel.HIGH, side_effect=SideEffect.NETWORK,
            default_policy=DefaultPolicy.BLOCK, capabilities=["net:connect:api.github.com:443"],
            limits=Limits(timeout_s=10, memory_mb=256)))
        try:
            session.call("http_get", url="http://169.254.169.254/latest/meta-data/")
        except SecurityError as e:
            assert "169.254.0.0/16" in str(e)
        else:
            pytest.fail("the metadata URL was not blocked")
        with pytest.raises(FailCoreError) as info:  # no route out of the namespace
            session.call("http_get", url="https://api.github.com")
        assert not isinstance(info.value, SecurityError), "a granted host is not a policy denial"
    finally:
        session.close()


def test_refused_input_never_runs_the_tool(tmp_path: Path) -> None:
    flag = tmp_path / "ran"

    def touch(n: int) -> int:
        open(str(flag), "w").close()
        return n

    with Session() as s:
        s.register("touch", touch, ToolMetadata(side_effect=SideEffect.FILESYSTEM,
                                                capabilities=[f"fs:write:{tmp_path}"]))
        for bad in ({"n": "5"}, {}, {"n": 1, "extra": 2}, {"n": [1]}):
            with pytest.raises(InputValidationError):
                s.call("touch", **bad)
            assert not flag.exists(), f"the tool ran for {bad}"
        assert s.call("touch", n=3) == 3 and flag.exists()


def test_privilege_plan_says_why() -> None:
    p = plan("auto")
    if os.geteuid() != 0:
        assert p.uid is None and "not root" in p.reason
    else:
        assert p.reason
        assert (p.uid is None) == ("cannot read" in p.reason)
    assert plan(None).uid is None


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs a root parent")
def test_forced_drop_runs_the_worker_as_nobody() -> None:
    with Session(worker_user="nobody") as s:
        s.register("ids", lambda: (os.getuid(), os.geteuid(), os.getgid()), ToolMetadata())
        uid, euid, gid = s.call("ids")
    assert uid == euid == plan("nobody").uid and gid == plan("nobody").gid


def test_capabilities_as_objects_register_like_strings() -> None:
    from failcore import Env, FsRead, FsWrite, NetConnect, ProcExec

    objects = [NetConnect("127.0.0.1", 80, 80), FsRead("/tmp"), FsWrite("/tmp/out"),
               Env("FC_OBJ_TEST"), ProcExec("/bin/true")]
    assert [str(o) for o in objects] == [
        "net:connect:127.0.0.1:80", "fs:read:/tmp", "fs:write:/tmp/out", "env:FC_OBJ_TEST",
        "proc:exec:/bin/true"]
    with Session() as s:
        s.register("objs", lambda: "ok", ToolMetadata(
            side_effect=[SideEffect.NETWORK, SideEffect.FILESYSTEM, SideEffect.ENVIRONMENT,
                         SideEffect.PROCESS], capabilities=objects))
        assert s.call("objs") == "ok"
