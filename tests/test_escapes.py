"""Escape attempts from inside a tool, through the real Session with the guards active.

Every attempt must fail the call with ``SecurityError`` raised by the worker layer, the
trace must hold the blocked guard event naming the rule the error names, and the next
call on the same session must work. Paths the tools use are passed as lists of path
components (never as a path string) so the parent's pre-check cannot see them: these
tests are about layer 3, the guards, catching what a tool actually does.

Positive controls show each guard lets through exactly what was granted.
"""

from __future__ import annotations

import _socket
import asyncio
import glob
import io
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from failcore import SecurityError, Session, SideEffect, ToolFailed, ToolMetadata
from failcore._trace import read_trace

_EFFECTS = {"net": SideEffect.NETWORK, "fs": SideEffect.FILESYSTEM,
            "proc": SideEffect.PROCESS, "env": SideEffect.ENVIRONMENT}


def meta(*caps: str, isolation: str = "tool", network: str = "none") -> ToolMetadata:
    """Metadata declaring exactly the side effects ``caps`` need (default_policy=BLOCK)."""
    effects = sorted({_EFFECTS[c.split(":", 1)[0]] for c in caps}, key=lambda e: e.value)
    return ToolMetadata(side_effect=effects or SideEffect.NONE, capabilities=list(caps),
                        isolation=isolation, network=network)  # type: ignore[arg-type]


def parts(path: str | Path) -> list[str]:
    """A path as components, invisible to the pre-check (no string in it is a path)."""
    return [p for p in str(path).split("/") if p]


# --- tools (module level: pickled by value into the worker, globals included) ------------


def at(where: list[str]) -> str:
    return "/" + "/".join(where)


def ping() -> str:
    return "pong"


def raw_socket_connect(port: int) -> str:
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        s.connect(("127.0.0.1", port))
    finally:
        s.close()
    return "connected"


def asyncio_connect(port: int) -> str:
    async def go() -> None:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        writer.close()
        await writer.wait_closed()

    asyncio.run(go())
    return "connected"


def create_connection(port: int) -> str:
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    return "connected"


def connect_localhost(port: int) -> str:
    socket.create_connection(("localhost", port), timeout=5).close()
    return "connected"


def resolve_localhost(port: int) -> list[str]:
    return [str(ai[4][0]) for ai in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)]


def udp_sendto(port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", ("127.0.0.1", port))
    return "sent"


def connect_ex(port: int) -> int:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port))


def unix_connect(where: list[str]) -> str:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(at(where))
    return "connected"


def run_true() -> int:
    return subprocess.run(["/bin/true"], check=False).returncode


def system_true() -> int:
    return os.system("true")


def posix_spawn_true() -> int:
    return os.waitpid(os.posix_spawn("/bin/true", ["/bin/true"], {}), 0)[1]


def fork_child() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    return os.waitpid(pid, 0)[1]


def execv_true() -> None:
    os.execv("/bin/true", ["/bin/true"])


def pty_fork() -> int:
    import pty

    pid, _ = pty.fork()
    if pid == 0:
        os._exit(0)
    return os.waitpid(pid, 0)[1]


def multiprocessing_fork() -> int | None:
    import multiprocessing

    p = multiprocessing.get_context("fork").Process(target=print)
    p.start()
    p.join()
    return p.exitcode


def write_own_memory() -> str:
    with open("/proc/self/mem", "r+b"):
        return "opened"


def read_path(where: list[str]) -> int:
    with open(at(where), "rb") as f:
        return len(f.read(4096))


def read_via_symlink(where: list[str]) -> str:
    os.symlink(at(where), "link")  # inside the call's scratch dir: allowed
    with open("link") as f:
        return f.read()


def read_via_dotdot(where: list[str]) -> str:
    # Climb out of the scratch dir with '..' steps, then down to the target.
    with open("../" * (os.getcwd().count("/") + 2) + "/".join(where)) as f:
        return f.read()


def list_session_root() -> list[str]:
    return os.listdir("../..")  # call dir -> worker base dir -> the session's root


def ctypes_symbol() -> int:
    import ctypes

    return int(ctypes.CDLL(None).getpid())


def ctypes_libc() -> str:
    import ctypes

    return repr(ctypes.CDLL("libc.so.6"))


def write_path(where: list[str], text: str) -> int:
    with open(at(where), "w") as f:
        return f.write(text)


def remove_path(where: list[str]) -> None:
    os.remove(at(where))


def rename_path(src: list[str], dst: list[str]) -> None:
    os.rename(at(src), at(dst))


def os_open_read(where: list[str]) -> int:
    fd = os.open(at(where), os.O_RDONLY)
    os.close(fd)
    return fd


def open_code_read(where: list[str]) -> bytes:
    with io.open_code(at(where)) as f:
        return f.read()


def copy_into_scratch(where: list[str]) -> str:
    shutil.copyfile(at(where), "copy")
    with open("copy") as f:
        return f.read()


def hardlink_into_scratch(where: list[str]) -> str:
    os.link(at(where), "hardlink")
    with open("hardlink") as f:
        return f.read()


def dir_fd_read(where: list[str]) -> int:
    dfd = os.open(at(where[:-1]), os.O_RDONLY | os.O_DIRECTORY)
    return os.open(where[-1], os.O_RDONLY, dir_fd=dfd)


def chdir_then_read(where: list[str]) -> str:
    os.chdir(at(where[:-1]))
    with open(where[-1]) as f:
        return f.read()


def pathlib_read(where: list[str]) -> str:
    return Path(at(where)).read_text()


def glob_listing(where: list[str]) -> list[str]:
    return glob.glob(at(where[:-1]) + "/*")


def swallow_connect(port: int) -> str:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except PermissionError:
        return "nothing to see here"
    return "connected"


def swallow_read(where: list[str]) -> str:
    try:
        with open(at(where)) as f:
            return f.read()
    except OSError:
        return "nothing to see here"


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback TCP listener; connections are never accepted (the backlog is enough)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def port(listener: socket.socket) -> int:
    return int(listener.getsockname()[1])


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """data/ (to grant read), out/ (to grant write), secret/ (never granted)."""
    dirs = {name: tmp_path / name for name in ("data", "out", "secret")}
    for d in dirs.values():
        d.mkdir()
    (dirs["data"] / "in.txt").write_text("granted data")
    (dirs["out"] / "old.txt").write_text("old")
    (dirs["secret"] / "key.txt").write_text("TOP-SECRET")
    return dirs


@pytest.fixture
def trace_path(tmp_path: Path) -> Path:
    return tmp_path / "trace.jsonl"


@pytest.fixture
def session(trace_path: Path) -> Iterator[Session]:
    with Session(trace=trace_path) as s:
        s.register("ping", ping)
        yield s


def last_call(trace: Path, tool: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The call.end body of ``tool``'s last call and the guard events of that call."""
    records = read_trace(trace)
    end = [r for r in records if r["kind"] == "call.end" and r["body"]["tool"] == tool][-1]
    guards = [r["body"] for r in records if r["kind"] == "guard" and r["call_id"] == end["call_id"]]
    return end["body"], guards


def assert_blocked(session: Session, trace: Path, tool: str, op: str | tuple[str, ...],
                   **kwargs: Any) -> SecurityError:
    """The call fails in the worker, the trace names the guard's rule, the session survives."""
    with pytest.raises(SecurityError) as info:
        session.call(tool, **kwargs)
    err = info.value
    assert err.layer == "worker", (err.layer, str(err))
    assert err.rule, str(err)
    end, guards = last_call(trace, tool)
    assert end["status"] == "blocked", end
    assert end["error"]["type"] == "SecurityError"
    blocked = [g for g in guards if g["action"] == "block"]
    assert blocked, f"no blocked guard event recorded for {tool}: {guards}"
    assert blocked[0]["op"] in ((op,) if isinstance(op, str) else op), blocked[0]
    assert blocked[0]["rule"] == err.rule, (blocked[0], err.rule)
    assert blocked[0]["reason"], blocked[0]
    assert session.call("ping") == "pong", "the next call must work"
    return err


# --- network ----------------------------------------------------------------------------------

NET_ESCAPES: list[tuple[str, Callable[..., Any]]] = [
    ("raw _socket", raw_socket_connect),
    ("asyncio.open_connection", asyncio_connect),
    ("socket.create_connection", create_connection),
]


@pytest.mark.parametrize("caps", [(), ("net:connect:127.0.0.1:1",)], ids=["no-net", "other-port"])
@pytest.mark.parametrize(("label", "fn"), NET_ESCAPES, ids=[n for n, _ in NET_ESCAPES])
def test_connect_to_a_port_not_granted(session: Session, trace_path: Path, port: int,
                                       label: str, fn: Callable[..., Any],
                                       caps: tuple[str, ...]) -> None:
    session.register("net", fn, meta(*caps))
    err = assert_blocked(session, trace_path, "net", "net.connect", port=port)
    assert err.target == f"127.0.0.1:{port}"
    assert err.rule == "default_policy=BLOCK"
    assert f"net:connect:127.0.0.1:{port}" in str(err), "the message says what to grant"


@pytest.mark.parametrize(("label", "fn"), NET_ESCAPES, ids=[n for n, _ in NET_ESCAPES])
def test_net_safe_blocks_loopback_even_with_a_name_wildcard_grant(
        trace_path: Path, port: int, label: str, fn: Callable[..., Any]) -> None:
    from failcore import presets

    with Session(validator=presets.net_safe(strict=True), trace=trace_path) as session:
        session.register("ping", ping)
        session.register("net", fn, meta("net:connect:*.example.com"))
        # a client that resolves the literal first is stopped there, before any connect
        err = assert_blocked(session, trace_path, "net", ("net.connect", "net.resolve"), port=port)
    assert err.rule == "net_safe: 127.0.0.0/8 (loopback)"


def test_dns_name_not_granted_is_refused(session: Session, trace_path: Path, port: int) -> None:
    """G1: with only name rules, a name no rule covers is never looked up (the query
    itself would carry data to whoever serves that name)."""
    session.register("dns", resolve_localhost, meta("net:connect:api.example.com:443"))
    err = assert_blocked(session, trace_path, "dns", "net.resolve", port=port)
    assert err.target == "localhost"


def test_connect_through_a_name_not_granted_is_refused(session: Session, trace_path: Path,
                                                       port: int) -> None:
    # A CIDR rule means a name may resolve into it, so the lookup happens and the connect
    # decides, on the address, naming the name that led there.
    session.register("byname", connect_localhost, meta("net:connect:10.0.0.0/8:443"))
    err = assert_blocked(session, trace_path, "byname", "net.connect", port=port)
    assert err.target == f"127.0.0.1:{port}"
    _, guards = last_call(trace_path, "byname")
    blocked = [g for g in guards if g["action"] == "block"][0]
    assert blocked["names"] == ["localhost"], "the event says which name led there"


def raw_connect_localhost(port: int) -> str:
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        s.connect(("localhost", port))  # a name: Python resolves it inside connect
    finally:
        s.close()
    return "connected"


def test_connect_by_name_is_refused_before_the_name_is_resolved(
        session: Session, trace_path: Path, port: int) -> None:
    """G4: the guard must not look up a name the tool may not look up itself. (For a raw
    ``_socket``, CPython has resolved it before any audit hook runs: see G4's open half.)"""
    session.register("raw", raw_connect_localhost, meta())
    assert_blocked(session, trace_path, "raw", "net.resolve", port=port)


def test_dns_without_any_net_capability_is_refused(session: Session, trace_path: Path,
                                                   port: int) -> None:
    session.register("dns", resolve_localhost, meta())
    err = assert_blocked(session, trace_path, "dns", "net.resolve", port=port)
    assert "DNS" in str(err)


# --- processes --------------------------------------------------------------------------------

PROC_ESCAPES: list[tuple[str, Callable[..., Any], str]] = [
    ("subprocess.run", run_true, "/bin/true"),
    ("os.system", system_true, "/bin/sh"),
    ("os.posix_spawn", posix_spawn_true, "/bin/true"),
    ("os.fork", fork_child, "fork"),
]
PROC_OPS = ("proc.exec", "proc.fork")


@pytest.mark.parametrize(("label", "fn", "target"), PROC_ESCAPES, ids=[n for n, *_ in PROC_ESCAPES])
def test_subprocess_without_proc_exec(session: Session, trace_path: Path, label: str,
                                      fn: Callable[..., Any], target: str) -> None:
    session.register("proc", fn, meta())
    err = assert_blocked(session, trace_path, "proc", PROC_OPS)
    assert err.target.startswith(target), err.target


def test_other_program_than_the_granted_one(session: Session, trace_path: Path) -> None:
    session.register("proc", system_true, meta("proc:exec:/bin/true"))
    assert_blocked(session, trace_path, "proc", "proc.exec")


# --- files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["self", "1", "parent"])
def test_reading_process_environments(session: Session, trace_path: Path, which: str) -> None:
    pid = str(os.getpid()) if which == "parent" else which
    session.register("read", read_path, meta())
    err = assert_blocked(session, trace_path, "read", "fs.open", where=["proc", pid, "environ"])
    assert err.target.endswith("/environ"), err.target


def test_reading_proc_environ_even_with_an_unrelated_grant(
        session: Session, trace_path: Path, tree: dict[str, Path]) -> None:
    session.register("read", read_path, meta(f"fs:read:{tree['data']}"))
    assert_blocked(session, trace_path, "read", "fs.open", where=["proc", "self", "environ"])


def test_symlink_from_scratch_dir_to_outside(session: Session, trace_path: Path,
                                             tree: dict[str, Path]) -> None:
    session.register("link", read_via_symlink, meta(f"fs:read:{tree['data']}"))
    err = assert_blocked(session, trace_path, "link", "fs.open",
                         where=parts(tree["secret"] / "key.txt"))
    assert err.target == str(tree["secret"] / "key.txt"), "judged where the link points"


def test_dotdot_out_of_scratch_dir(session: Session, trace_path: Path,
                                   tree: dict[str, Path]) -> None:
    session.register("dotdot", read_via_dotdot, meta(f"fs:read:{tree['data']}"))
    err = assert_blocked(session, trace_path, "dotdot", "fs.open",
                         where=parts(tree["secret"] / "key.txt"))
    assert err.target == str(tree["secret"] / "key.txt")


def test_dotdot_to_the_session_root_and_other_workers(session: Session, trace_path: Path) -> None:
    session.register("ls", list_session_root, meta())
    assert_blocked(session, trace_path, "ls", "fs.open")


def test_ctypes_cannot_reach_the_c_library(session: Session, trace_path: Path) -> None:
    # CDLL(None) itself is allowed ('import ctypes' does the same); every symbol is not.
    session.register("sym", ctypes_symbol, meta())
    err = assert_blocked(session, trace_path, "sym", "ctypes")
    assert err.rule.startswith("ctypes:")
    session.register("libc", ctypes_libc, meta())
    err = assert_blocked(session, trace_path, "libc", "ctypes")
    assert err.rule == "ctypes: ctypes.dlopen denied"


def test_write_where_only_read_is_granted(session: Session, trace_path: Path,
                                          tree: dict[str, Path]) -> None:
    session.register("write", write_path, meta(f"fs:read:{tree['data']}"))
    assert_blocked(session, trace_path, "write", "fs.open",
                   where=parts(tree["data"] / "in.txt"), text="overwritten")
    assert (tree["data"] / "in.txt").read_text() == "granted data"


def test_remove_and_rename_outside_grants(session: Session, trace_path: Path,
                                          tree: dict[str, Path]) -> None:
    key = tree["secret"] / "key.txt"
    session.register("rm", remove_path, meta(f"fs:write:{tree['out']}"))
    assert_blocked(session, trace_path, "rm", "fs.modify", where=parts(key))
    session.register("mv", rename_path, meta(f"fs:write:{tree['out']}"))
    # out of a forbidden dir into a granted one, and out of a granted one into a forbidden one
    assert_blocked(session, trace_path, "mv", "fs.modify", src=parts(key),
                   dst=parts(tree["out"] / "stolen.txt"))
    assert_blocked(session, trace_path, "mv", "fs.modify", src=parts(tree["out"] / "old.txt"),
                   dst=parts(tree["secret"] / "planted.txt"))
    assert key.read_text() == "TOP-SECRET"
    assert (tree["out"] / "old.txt").exists()
    assert not (tree["out"] / "stolen.txt").exists()
    assert not (tree["secret"] / "planted.txt").exists()


def test_remove_where_only_read_is_granted(session: Session, trace_path: Path,
                                           tree: dict[str, Path]) -> None:
    session.register("rm", remove_path, meta(f"fs:read:{tree['data']}"))
    assert_blocked(session, trace_path, "rm", "fs.modify", where=parts(tree["data"] / "in.txt"))
    assert (tree["data"] / "in.txt").exists()


# --- a tool that hides the refusal ----------------------------------------------------------


def test_catching_the_permission_error_does_not_help(session: Session, trace_path: Path,
                                                     port: int, tree: dict[str, Path]) -> None:
    session.register("quiet_net", swallow_connect, meta())
    assert_blocked(session, trace_path, "quiet_net", "net.connect", port=port)
    session.register("quiet_fs", swallow_read, meta())
    assert_blocked(session, trace_path, "quiet_fs", "fs.open",
                   where=parts(tree["secret"] / "key.txt"))


# --- positive controls --------------------------------------------------------------------------


def test_granted_operations_work(session: Session, trace_path: Path, port: int,
                                 tree: dict[str, Path]) -> None:
    session.register("read", read_path, meta(f"fs:read:{tree['data']}"))
    assert session.call("read", where=parts(tree["data"] / "in.txt")) == len("granted data")
    session.register("write", write_path, meta(f"fs:write:{tree['out']}"))
    assert session.call("write", where=parts(tree["out"] / "new.txt"), text="hello") == 5
    assert (tree["out"] / "new.txt").read_text() == "hello"
    session.register("rm", remove_path, meta(f"fs:write:{tree['out']}"))
    session.call("rm", where=parts(tree["out"] / "old.txt"))
    assert not (tree["out"] / "old.txt").exists()
    session.register("exec", run_true, meta("proc:exec:/bin/true"))
    assert session.call("exec") == 0
    for name, fn in NET_ESCAPES:
        tool = "net_" + name.replace(" ", "_").replace(".", "_")
        # A raw _socket object is below the socket broker: in a confined worker even a
        # granted connect from it gets the kernel's refusal; on the host's network
        # (network="host", for clients that connect from C) it works, judged by the guards.
        network = "host" if name == "raw _socket" else "none"
        session.register(tool, fn, meta(f"net:connect:127.0.0.1:{port}", network=network))
        assert session.call(tool, port=port) == "connected", name
    session.register("raw_confined", raw_socket_connect, meta(f"net:connect:127.0.0.1:{port}"))
    with pytest.raises(ToolFailed) as refused:
        session.call("raw_confined", port=port)
    assert refused.value.remote_type == "PermissionError"  # EACCES: Landlock's TCP rule
    ends = [r["body"] for r in read_trace(trace_path) if r["kind"] == "call.end"
            and r["body"]["tool"] != "raw_confined"]
    assert all(e["status"] == "ok" for e in ends), ends
    allowed = [r["body"] for r in read_trace(trace_path)
               if r["kind"] == "guard" and r["body"]["op"] == "net.connect"]
    assert allowed and all(g["rule"] == f"capability net:connect:127.0.0.1:{port}" for g in allowed)


# --- what the worker may always read ----------------------------------------------------------


def test_parent_sys_path_dir_is_not_readable(tmp_path: Path, trace_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """G2: the script's directory is on sys.path but is not the interpreter's own tree."""
    from failcore import presets

    project = tmp_path / "project"  # where a user ran `python agent.py`
    (project / ".ssh").mkdir(parents=True)
    (project / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    monkeypatch.syspath_prepend(str(project))
    with Session(validator=presets.strict(root=tmp_path / "srv"), trace=trace_path) as session:
        session.register("ping", ping)
        session.register("read", read_path, meta())
        assert_blocked(session, trace_path, "read", "fs.open",
                       where=parts(project / ".ssh" / "id_rsa"))


FILE_ROUTES: list[tuple[str, Callable[..., Any], str]] = [
    ("os.open", os_open_read, "fs.open"),
    ("io.open_code", open_code_read, "fs.open"),
    ("shutil.copyfile", copy_into_scratch, "fs.open"),
    ("os.link", hardlink_into_scratch, "fs.modify"),
    ("os.open dir_fd", dir_fd_read, "fs.open"),
    ("chdir", chdir_then_read, "fs.open"),
    ("pathlib", pathlib_read, "fs.open"),
    ("glob", glob_listing, "fs.open"),
]


@pytest.mark.parametrize(("label", "fn", "op"), FILE_ROUTES, ids=[n for n, *_ in FILE_ROUTES])
def test_other_routes_to_a_file_outside_grants(session: Session, trace_path: Path,
                                               tree: dict[str, Path], label: str,
                                               fn: Callable[..., Any], op: str) -> None:
    session.register("route", fn, meta(f"fs:write:{tree['out']}"))
    assert_blocked(session, trace_path, "route", op, where=parts(tree["secret"] / "key.txt"))


def test_other_socket_routes(session: Session, trace_path: Path, port: int,
                             tree: dict[str, Path]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        # Confined: the kernel refuses the UDP socket itself (the seccomp filter).
        session.register("udp", udp_sendto, meta())
        with pytest.raises(ToolFailed) as refused:
            session.call("udp", port=udp.getsockname()[1])
        assert refused.value.remote_type == "PermissionError"
        # On the host's network: the guard refuses the sendto.
        session.register("udp_host", udp_sendto, meta("net:connect:127.0.0.1:1", network="host"))
        assert_blocked(session, trace_path, "udp_host", "net.connect", port=udp.getsockname()[1])
        udp.settimeout(0.2)
        with pytest.raises(TimeoutError):
            udp.recv(16)  # nothing was sent
    session.register("connect_ex", connect_ex, meta())
    assert_blocked(session, trace_path, "connect_ex", "net.connect", port=port)
    path = tree["secret"] / "agent.sock"
    with socket.socket(socket.AF_UNIX) as unix:
        unix.bind(str(path))
        unix.listen(1)
        session.register("unix", unix_connect, meta())
        assert_blocked(session, trace_path, "unix", "fs.open", where=parts(path))  # a file


@pytest.mark.parametrize(("label", "fn"), [("os.execv", execv_true), ("pty.fork", pty_fork),
                                           ("multiprocessing fork", multiprocessing_fork),
                                           ("/proc/self/mem", write_own_memory)])
def test_other_process_routes(session: Session, trace_path: Path, label: str,
                              fn: Callable[..., Any]) -> None:
    session.register("proc", fn, meta())
    assert_blocked(session, trace_path, "proc", (*PROC_OPS, "fs.open"))


def optional_import() -> str:
    try:
        import failcore_absent_optional_dependency  # noqa: F401
    except ImportError:
        return "absent, fine"
    return "present"


def test_absent_optional_import_is_not_an_escape(tmp_path: Path, trace_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """G3: a missed import walks sys.path; the worker must not hold entries it may not list."""
    monkeypatch.syspath_prepend(str(tmp_path))
    with Session(trace=trace_path) as session:
        session.register("opt", optional_import, meta())
        assert session.call("opt") == "absent, fine"
