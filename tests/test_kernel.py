"""Kernel confinement: each escape the Python guards miss fails with a *kernel* error.

Issue 16's attacks, tried the way an attacker would: re-imported C modules, ctypes into
libc, a compiled program and a compiled library, ``os.mknod``/``os.mkfifo``, raw and packet
sockets, signals at the parent, sqlite3, guard state flipped. Tools return the errno they
got instead of raising, so a call that returns at all proves the guards did not refuse it
(a refused guarded operation fails the whole call with ``SecurityError``); the errno then
says which kernel layer did: EACCES (Landlock), EPERM (no capability, or a Landlock
scope), ENETUNREACH (the empty network namespace). Where the guards would catch the plain
form, the tool first switches them off for its thread (``guards.runtime_begin()``: the
same effect as the documented ``gc``/``ctypes.memmove`` route).

Every connection goes to a loopback listener the test opened, and the listener is
checked to have received nothing. The suite runs these as root; ``test_unprivileged_run``
runs this module, tests/test_host_network.py, tests/test_warm_leftovers.py and
tests/test_confinement.py again as ``nobody``.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from failcore import Session, SideEffect, ToolMetadata
from failcore._trace import read_trace
from failcore_worker import _landlock

ABI = _landlock.abi_version()
pytestmark = pytest.mark.skipif(
    ABI < 6, reason=f"needs Landlock ABI 6 or later (this kernel has {ABI}): the kernel layers "
                    "cannot be in force here; Session(confinement='auto') reports why")
KERNEL = (errno.EACCES, errno.EPERM, errno.ENETUNREACH)
_EFFECTS = {"net": SideEffect.NETWORK, "fs": SideEffect.FILESYSTEM,
            "proc": SideEffect.PROCESS, "env": SideEffect.ENVIRONMENT}


def meta(*caps: str, **extra: Any) -> ToolMetadata:
    effects = sorted({_EFFECTS[c.split(":", 1)[0]] for c in caps}, key=lambda e: e.value)
    return ToolMetadata(side_effect=effects or SideEffect.NONE, capabilities=list(caps),
                        **extra)


# --- tools (module level: pickled by value, helpers included) ----------------------------


def at(where: list[str]) -> str:
    return "/" + "/".join(where)


def guards_off() -> None:
    from failcore_worker import guards

    guards.runtime_begin()


def libc() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def libc_open(where: list[str]) -> int:
    import ctypes

    guards_off()
    fd = libc().open(at(where).encode(), os.O_RDONLY)
    return ctypes.get_errno() if fd < 0 else 0


def libc_connect(port: int) -> int:
    import ctypes
    import struct

    guards_off()
    with socket.socket() as s:
        addr = (struct.pack("=H", socket.AF_INET) + struct.pack("!H", port)
                + socket.inet_aton("127.0.0.1") + bytes(8))
        rc = libc().connect(s.fileno(), addr, len(addr))
        return ctypes.get_errno() if rc != 0 else 0


def libc_execv() -> int:
    import ctypes

    guards_off()
    argv = (ctypes.c_char_p * 2)(b"/bin/true", None)
    libc().execv(b"/bin/true", argv)  # returns only when refused
    return ctypes.get_errno()


def raw_connect(port: int) -> int:
    import _socket

    guards_off()
    s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        s.connect(("127.0.0.1", port))
        return 0
    except OSError as exc:
        return exc.errno or -1
    finally:
        s.close()


def reimported_posix_open(granted: list[str], up: int, rel: list[str]) -> int:
    """The issue's attack: a fresh ``posix`` whose ``open`` is not the guard's wrapper; its
    audit event drops ``dir_fd``, so the guard judges ``rel`` against the scratch dir."""
    sys.modules.pop("posix", None)
    import posix

    dfd = os.open(at(granted), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(posix.open(os.sep.join([os.pardir] * up + rel), os.O_RDONLY, dir_fd=dfd))
        return 0
    except OSError as exc:
        return exc.errno or -1
    finally:
        os.close(dfd)


def reimported_posixsubprocess() -> int:
    """A fresh ``_posixsubprocess``: ``fork_exec`` unwrapped, no audit event at all. The
    child's exit code says what happened: 7 when /bin/sh ran, 255 when execve failed
    (spawnv_passfds does not read the error pipe)."""
    sys.modules.pop("_posixsubprocess", None)
    import multiprocessing.util

    pid = multiprocessing.util.spawnv_passfds(b"/bin/sh", [b"/bin/sh", b"-c", b"exit 7"], ())
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def mknod_char_device() -> int:
    import stat

    try:
        os.mknod("null2", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        return 0
    except OSError as exc:
        return exc.errno or -1


def mkfifo_at(where: list[str]) -> int:
    try:
        os.mkfifo(at(where))
        return 0
    except OSError as exc:
        return exc.errno or -1


def packet_socket() -> int:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW).close()
        return 0
    except OSError as exc:
        return exc.errno or -1


def signal_parent(pid: int) -> dict[str, int]:
    import signal

    out = {}
    try:
        os.kill(pid, 0)  # signal 0: nothing is delivered even if the kernel allowed it
        out["kill"] = 0
    except OSError as exc:
        out["kill"] = exc.errno or -1
    fd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(fd, 0)
        out["pidfd"] = 0
    except OSError as exc:
        out["pidfd"] = exc.errno or -1
    finally:
        os.close(fd)
    return out


def read_guards_off(where: list[str]) -> int:
    guards_off()
    try:
        with open(at(where), "rb") as f:
            f.read(1)
        return 0
    except OSError as exc:
        return exc.errno or -1


def flip_guard_state_then_read(where: list[str]) -> int:
    """Documented escape from the guards: mutate their state (here directly)."""
    import dataclasses

    from failcore_worker import _guard_judge

    _guard_judge.state.grants = dataclasses.replace(_guard_judge.state.grants, default="allow")
    try:
        with open(at(where), "rb") as f:
            f.read(1)
        return 0
    except OSError as exc:
        return exc.errno or -1


def write_own_memory() -> int:
    guards_off()
    try:
        with open("/proc/self/mem", "r+b"):
            return 0
    except OSError as exc:
        return exc.errno or -1


def run_program(program: list[str], args: list[list[str] | str]) -> tuple[int, str]:
    """Paths travel as components (``at``): the parent's pre-check judges path strings."""
    argv = [at(program), *(a if isinstance(a, str) else at(a) for a in args)]
    done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace")


def sqlite_write(where: list[str]) -> str:
    import sqlite3

    try:
        db = sqlite3.connect(at(where))
        db.execute("create table t (x)")
        db.commit()
        db.close()
        return "written"
    except sqlite3.Error as exc:
        return f"{type(exc).__name__}: {exc}"


def udp_send(port: int) -> int:
    guards_off()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"leak", ("127.0.0.1", port))
            return 0
    except OSError as exc:
        return exc.errno or -1


def tcp_bind() -> int:
    guards_off()
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", 0))
            s.listen(1)
            return 0
        except OSError as exc:
            return exc.errno or -1


def native_library(lib: str, where: list[str], port: int) -> list[int]:
    import ctypes

    guards_off()
    so = ctypes.CDLL(lib)
    return [so.try_open(at(where).encode()), so.try_connect(port), so.try_exec()]


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """data/ (granted read), out/ (granted write), secret/ (never granted)."""
    dirs = {name: tmp_path / name for name in ("data", "out", "secret")}
    for d in dirs.values():
        d.mkdir()
    (dirs["data"] / "in.txt").write_text("granted data")
    (dirs["secret"] / "key.txt").write_text("TOP-SECRET")
    return dirs


def parts(path: Path) -> list[str]:
    return [p for p in str(path).split("/") if p]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    try:
        yield srv
    finally:
        srv.close()


def nothing_arrived(srv: socket.socket) -> bool:
    try:
        srv.accept()[0].close()
    except BlockingIOError:
        return True
    return False


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    # "require": on a kernel that has every layer, a layer that silently failed fails here.
    with Session(trace=tmp_path / "trace.jsonl", confinement="require") as s:
        yield s


C_PROBE = r"""
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

int try_open(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return errno;
    close(fd);
    return 0;
}

int try_connect(int port) {
    struct sockaddr_in a = {0};
    int s = socket(AF_INET, SOCK_STREAM, 0), rc;
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(0x7f000001);
    rc = connect(s, (struct sockaddr *)&a, sizeof a) < 0 ? errno : 0;
    close(s);
    return rc;
}

int try_exec(void) {
    char *argv[] = {"/bin/true", NULL};
    execv("/bin/true", argv);
    return errno;
}

#ifdef PROGRAM
int main(int argc, char **argv) {
    if (argc < 3) return 2;
    printf("open=%d connect=%d ", try_open(argv[1]), try_connect(atoi(argv[2])));
    fflush(stdout);
    printf("exec=%d\n", try_exec());
    return 0;
}
#endif
"""


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A program and a shared library compiled here with gcc: native code no guard sees."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    where = tmp_path_factory.mktemp("native")
    source = where / "probe.c"
    source.write_text(C_PROBE)
    program, library = where / "probe", where / "libprobe.so"
    subprocess.run(["gcc", "-DPROGRAM", "-o", str(program), str(source)], check=True, timeout=60)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True,
                   timeout=60)
    return {"program": program, "library": library, "dir": where}


# --- files ---------------------------------------------------------------------------------


def test_libc_open_outside_the_grants(session: Session, tree: dict[str, Path]) -> None:
    session.register("t", libc_open, meta(f"fs:read:{tree['data']}"))
    assert session.call("t", where=parts(tree["secret"] / "key.txt")) == errno.EACCES
    assert session.call("t", where=parts(tree["data"] / "in.txt")) == 0, "the grant still works"


def test_reimported_posix_open_with_dir_fd(session: Session, tree: dict[str, Path]) -> None:
    session.register("t", reimported_posix_open, meta(f"fs:read:{tree['data']}"))
    # "../secret/key.txt" built inside: the parent's pre-check would refuse the string
    assert session.call("t", granted=parts(tree["data"]), up=1, rel=["secret", "key.txt"]) \
        == errno.EACCES
    assert session.call("t", granted=parts(tree["data"]), up=0, rel=["in.txt"]) == 0


def test_flipped_guard_state_still_meets_the_kernel(session: Session,
                                                   tree: dict[str, Path]) -> None:
    session.register("t", flip_guard_state_then_read, meta())
    assert session.call("t", where=parts(tree["secret"] / "key.txt")) == errno.EACCES


def test_parent_environment_and_own_memory(session: Session) -> None:
    session.register("env", read_guards_off, meta())
    assert session.call("env", where=["proc", str(os.getpid()), "environ"]) == errno.EACCES
    session.register("mem", write_own_memory, meta())
    assert session.call("mem") == errno.EACCES


@pytest.mark.skipif(not os.path.isdir("/etc/ssl/private"), reason="no /etc/ssl/private here")
def test_tls_private_keys_are_not_an_implicit_read(session: Session) -> None:
    session.register("keys", read_guards_off, meta())
    assert session.call("keys", where=["etc", "ssl", "private"]) == errno.EACCES
    assert session.call("keys", where=["etc", "ssl", "openssl.cnf"]) == 0, "TLS config is"


def test_device_node_and_fifo(session: Session, tree: dict[str, Path]) -> None:
    session.register("mknod", mknod_char_device, meta())
    assert session.call("mknod") in (errno.EACCES, errno.EPERM)
    session.register("fifo", mkfifo_at, meta(f"fs:write:{tree['out']}"))
    assert session.call("fifo", where=parts(tree["secret"] / "fifo")) == errno.EACCES
    assert not (tree["secret"] / "fifo").exists()
    assert session.call("fifo", where=parts(tree["out"] / "fifo")) == 0, "inside the grant"


def test_sqlite_writes_only_inside_the_write_grant(session: Session,
                                                   tree: dict[str, Path]) -> None:
    session.register("db", sqlite_write, meta(f"fs:write:{tree['out']}"))
    assert "unable to open database file" in session.call("db", where=parts(tree["secret"] / "x.db"))
    assert not (tree["secret"] / "x.db").exists()
    assert session.call("db", where=parts(tree["out"] / "x.db")) == "written"


# --- processes ---------------------------------------------------------------------------------


def test_libc_execv_and_reimported_posixsubprocess(session: Session) -> None:
    session.register("execv", libc_execv, meta())
    assert session.call("execv") == errno.EACCES
    session.register("spawn", reimported_posixsubprocess, meta())
    assert session.call("spawn") == 255, "execve of /bin/sh failed in the child"


def run_bare(name: str) -> int:
    return subprocess.run([name], check=False, timeout=10).returncode


def test_bare_program_name_is_found_on_the_workers_path(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``proc:exec:true`` means the ``true`` the worker's PATH finds, not the parent's."""
    shadow = tmp_path / "bin"
    shadow.mkdir()
    (shadow / "true").write_text("#!/bin/sh\nexit 3\n")
    (shadow / "true").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shadow}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    with Session(confinement="require") as s:
        s.register("t", run_bare, meta("proc:exec:true"))
        assert s.call("t", name="true") == 0


def test_granted_program_cannot_read_outside_the_grants(session: Session,
                                                       tree: dict[str, Path]) -> None:
    session.register("cat", run_program, meta("proc:exec:/bin/cat", f"fs:read:{tree['data']}"))
    code, out = session.call("cat", program=["bin", "cat"],
                             args=[parts(tree["secret"] / "key.txt")])
    assert code != 0 and "Permission denied" in out and "TOP-SECRET" not in out
    assert session.call("cat", program=["bin", "cat"], args=[parts(tree["data"] / "in.txt")]) \
        == (0, "granted data")


def test_compiled_program_and_library(session: Session, tree: dict[str, Path],
                                      native: dict[str, Path], listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    program = str(native["program"])
    session.register("prog", run_program, meta(f"proc:exec:{program}"))
    code, out = session.call("prog", program=parts(native["program"]),
                             args=[parts(tree["secret"] / "key.txt"), str(port)])
    assert out.split() == [f"open={errno.EACCES}", f"connect={errno.EACCES}",
                           f"exec={errno.EACCES}"], out
    session.register("lib", native_library, meta(f"fs:read:{native['dir']}"))
    got = session.call("lib", lib=str(native["library"]), where=parts(tree["secret"] / "key.txt"),
                       port=port)
    assert got == [errno.EACCES, errno.EACCES, errno.EACCES]
    assert nothing_arrived(listener)


def test_signals_outside_the_worker_are_refused(session: Session) -> None:
    session.register("sig", signal_parent, meta())
    assert session.call("sig", pid=os.getpid()) == {"kill": errno.EPERM, "pidfd": errno.EPERM}


# --- network ----------------------------------------------------------------------------------


def test_native_and_raw_connects_fail_in_the_kernel(session: Session,
                                                   listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    session.register("libc", libc_connect, meta())
    assert session.call("libc", port=port) in KERNEL
    session.register("raw", raw_connect, meta())
    assert session.call("raw", port=port) in KERNEL
    assert nothing_arrived(listener)


def test_no_udp_leaves_and_nothing_listens(session: Session) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(0.2)
        session.register("udp", udp_send, meta())
        # The seccomp filter refuses the UDP socket itself (DNS goes through the broker).
        assert session.call("udp", port=udp.getsockname()[1]) == errno.EPERM
        with pytest.raises(TimeoutError):
            udp.recv(16)
    session.register("bind", tcp_bind, meta())
    # An ephemeral bind is allowed (a client may bind before connecting); listen(2) is
    # refused by the seccomp filter, so nothing is ever served from a worker.
    assert session.call("bind") == errno.EPERM


def test_packet_socket_is_refused(session: Session) -> None:
    session.register("packet", packet_socket, meta())
    assert session.call("packet") == errno.EPERM


def test_no_blocked_guard_event_was_needed(session: Session, tmp_path: Path,
                                          tree: dict[str, Path]) -> None:
    """The refusals above come from the kernel: the guards recorded no block."""
    session.register("t", libc_open, meta())
    assert session.call("t", where=parts(tree["secret"] / "key.txt")) == errno.EACCES
    guards = [r["body"] for r in read_trace(tmp_path / "trace.jsonl") if r["kind"] == "guard"]
    assert not [g for g in guards if g["action"] == "block"], guards


# --- rights only shrink, in the kernel too ----------------------------------------------------


def test_a_narrower_token_stacks_a_narrower_domain(session: Session, tree: dict[str, Path]) -> None:
    """A warm worker locked down to data/ that receives a token for data/sub/ only: with
    the guards off, the kernel refuses what the token dropped, and the worker retires."""
    import dataclasses

    from failcore import _values
    from failcore._token import ToolGrants
    from failcore_worker import protocol
    from failcore_worker.rules import FsRule

    (tree["data"] / "sub").mkdir()
    (tree["data"] / "sub" / "b.txt").write_text("B")
    session.register("read", read_guards_off, meta(f"fs:read:{tree['data']}", isolation="tool"))
    assert session.call("read", where=parts(tree["data"] / "in.txt")) == 0
    tool: Any = session._tools["read"]
    backend: Any = session._backend
    lease = backend.lease(tool.spec)
    assert not lease.fresh
    worker = lease.handle
    narrower = dataclasses.replace(tool.parts.grants,
                                   fs=(FsRule(str(tree["data"] / "sub"), write=False),))
    token, mac = session._minter.mint("n1", "read", ToolGrants.build(narrower, tool.parts.limits), 5)
    try:
        worker.chan.sendall(protocol.encode("call", {
            "token": token, "mac": mac, "args": {"where": parts(tree["data"] / "in.txt")}}))
        kind, body = _values.decode_reply(protocol.recv_frame(worker.chan),
                                          protocol.reply_limit(1 << 20))
    finally:
        backend.release(lease, False)
    assert (kind, body["value"]) == ("result", errno.EACCES)
    assert body["retire"] is True, "a worker narrowed in the kernel is not reused"


# --- the same, unprivileged ------------------------------------------------------------------

_UNPRIVILEGED = r"""
set -e
mount --bind "$1" "$3"
mount -t tmpfs -o mode=755,size=1m tmpfs "$2"
mkdir -p "$1"
mount --bind "$3" "$1"
shift 3
exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all "$@"
"""


def _hidden_interpreter() -> tuple[str, str] | None:
    """(tree, top): the interpreter's tree and the directory above it that ``nobody``
    cannot enter (pyenv under a 0700 /root), or None when nothing hides it."""
    from failcore._privilege import _other_can_read

    tree = os.path.realpath(sys.base_prefix)
    if _other_can_read(tree):
        return None
    top = "/" + tree.strip("/").split("/")[0]
    return tree, top


@pytest.mark.timeout(600)
@pytest.mark.skipif(os.geteuid() != 0, reason="already unprivileged (this is that run)")
def test_unprivileged_run() -> None:
    """The kernel tests again as ``nobody``: the zygote then enters its network namespace
    through a user namespace. The interpreter here lives in a 0700 home (pyenv under
    /root); a private mount namespace puts a 0755 tmpfs over that home exposing only the
    interpreter's tree, so the host's mounts are untouched."""
    if shutil.which("setpriv") is None or shutil.which("unshare") is None:
        pytest.skip("needs setpriv and unshare (util-linux)")
    repo = Path(__file__).resolve().parent.parent
    tests = [str(repo / "tests" / n) for n in ("test_kernel.py", "test_host_network.py",
                                               "test_warm_leftovers.py", "test_confinement.py")]
    # Somewhere nobody can reach (pytest's own tmp_path sits in a 0700 directory).
    home = Path(tempfile.mkdtemp(prefix="failcore-unprivileged-"))
    try:
        os.chmod(home, 0o777)
        stash = home / "stash"
        stash.mkdir()
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                   f"--basetemp={home / 'run'}", *tests]
        hidden = _hidden_interpreter()
        if hidden is None:
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                    "--inh-caps=-all", *command]
        else:
            argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", _UNPRIVILEGED,
                    "sh", hidden[0], hidden[1], str(stash), *command]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONDONTWRITEBYTECODE": "1",
               "HOME": str(home), "LANG": "C.UTF-8"}
        done = subprocess.run(argv, capture_output=True, timeout=540, cwd=str(home), env=env,
                              check=False)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    out = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, out[-4000:]
    passed = re.search(r"(\d+) passed", out)
    assert passed is not None and int(passed.group(1)) >= 20, out[-2000:]
