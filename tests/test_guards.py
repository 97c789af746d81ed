"""failcore_worker.guards: layer 3 inside a real, fresh interpreter per test.

Each test runs a short script in ``sys.executable -c`` with the guards installed, and
reads back what happened to each attempt ("ok", "denied: RULE" or "error: ...") plus the
recorded events. Every server is on loopback and stopped by the test; non-loopback
destinations only appear in ``netns`` tests.
"""

from __future__ import annotations

import http.server
import json
import os
import pickle
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from failcore_worker.guards import GuardDenied
from failcore_worker.rules import FsRule, Grants, NetRule, Verdict

REPO = str(Path(__file__).resolve().parent.parent)
IMPLICIT = tuple(sorted({os.path.realpath(p) for p in (
    sys.prefix, sys.base_prefix, *sysconfig.get_paths().values(), os.path.join(REPO, "worker"))}))

PRELUDE = """
import json, os, sys
sys.path.insert(0, {repo!r})
from failcore_worker import guards
from failcore_worker.rules import Grants
{before}
guards.install(Grants.from_wire(json.loads({grants!r})), {cwd!r})
os.chdir({cwd!r})
RESULTS = {{}}
def attempt(label, fn):
    try:
        value = fn()
        RESULTS[label] = "ok"
        return value
    except BaseException as exc:
        # libraries wrap OSErrors (urllib: URLError.reason); the guard's refusal is inside
        seen, cause = set(), exc
        while cause is not None and id(cause) not in seen and not isinstance(cause, guards.GuardDenied):
            seen.add(id(cause))
            cause = getattr(cause, "reason", None) if isinstance(getattr(cause, "reason", None),
                BaseException) else (cause.__cause__ or cause.__context__)
        if isinstance(cause, guards.GuardDenied):
            RESULTS[label] = "denied: " + cause.verdict.rule
        else:
            RESULTS[label] = "error: %s: %s" % (type(exc).__name__, exc)
"""
EPILOGUE = """
print("@@RESULT@@" + json.dumps({"results": RESULTS, "events": guards.take_events()}))
"""


def run_guarded(grants: Grants, body: str, cwd: Path, before: str = "") -> dict[str, Any]:
    """Run ``body`` in a fresh interpreter under ``grants``; return its results and events."""
    wire = Grants(**{**grants.__dict__, "implicit_read": grants.implicit_read or IMPLICIT})
    code = PRELUDE.format(repo=REPO, grants=json.dumps(wire.to_wire()), cwd=str(cwd),
                          before=textwrap.dedent(before)) + textwrap.dedent(body) + EPILOGUE
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=45)
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            out: dict[str, Any] = json.loads(line[len("@@RESULT@@"):])
            return out
    raise AssertionError(f"guarded script failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


@pytest.fixture
def area(tmp_path: Path) -> Path:
    base = Path(os.path.realpath(tmp_path))
    for d in ("scratch", "data/inner", "out", "outside"):
        (base / d).mkdir(parents=True)
    (base / "data" / "f.txt").write_text("data")
    (base / "outside" / "secret").write_text("secret")
    (base / "data" / "esc").symlink_to(base / "outside" / "secret")
    (base / "data" / "dangling").symlink_to(base / "outside" / "created-through-link")
    return base


def fs_grants(area: Path, **kw: Any) -> Grants:
    return Grants(fs=(FsRule(str(area / "data"), False, f"fs:read:{area / 'data'}"),
                      FsRule(str(area / "out"), True, f"fs:write:{area / 'out'}")), **kw)


# --- files ------------------------------------------------------------------------------------

def test_file_access(area: Path) -> None:
    out = run_guarded(fs_grants(area), f"""
        attempt("read granted", lambda: open({str(area / 'data/f.txt')!r}).read())
        attempt("write read-only", lambda: open({str(area / 'data/new')!r}, "w"))
        attempt("write granted", lambda: open({str(area / 'out/new')!r}, "w").close())
        attempt("outside", lambda: open({str(area / 'outside/secret')!r}).read())
        attempt("symlink escape", lambda: open({str(area / 'data/esc')!r}).read())
        attempt("dotdot escape", lambda: open({str(area / 'data/../outside/secret')!r}).read())
        attempt("dotdot via missing dir", lambda: open({str(area / 'data/nope/../../outside/secret')!r}).read())
        attempt("dangling symlink", lambda: open({str(area / 'data/dangling')!r}, "w").write("x"))
        attempt("proc self environ", lambda: open("/proc/self/environ", "rb").read())
        attempt("proc 1 environ", lambda: open("/proc/1/environ", "rb").read())
        attempt("scratch", lambda: open("rel.txt", "w").write("x"))
        import sysconfig
        stdlib = sysconfig.get_paths()["stdlib"]
        attempt("stdlib read", lambda: open(stdlib + "/os.py").close())
        attempt("stdlib write", lambda: open(stdlib + "/failcore-test-x", "w"))
        attempt("dotdot out of stdlib", lambda: open(stdlib + "/.." * 12 + "/etc/passwd").read())
        attempt("os.open write", lambda: os.open({str(area / 'data/x')!r}, os.O_WRONLY | os.O_CREAT))
        attempt("listdir outside", lambda: os.listdir({str(area / 'outside')!r}))
        attempt("remove", lambda: os.remove({str(area / 'data/f.txt')!r}))
        attempt("rename out", lambda: os.rename({str(area / 'data/f.txt')!r}, "stolen"))
        attempt("symlink create", lambda: os.symlink("/etc", {str(area / 'data/l')!r}))
        attempt("chmod", lambda: os.chmod({str(area / 'data/f.txt')!r}, 0o777))
        attempt("mkdir", lambda: os.mkdir({str(area / 'data/d')!r}))
        attempt("link", lambda: os.link({str(area / 'outside/secret')!r}, {str(area / 'out/hard')!r}))
        import shutil
        attempt("rmtree data", lambda: shutil.rmtree({str(area / 'data/inner')!r}))
    """, area / "scratch")
    r = out["results"]
    assert r["read granted"] == "ok" and r["write granted"] == "ok" and r["scratch"] == "ok"
    assert r["stdlib read"] == "ok"
    for label in ("stdlib write", "dotdot out of stdlib", "write read-only", "outside", "symlink escape", "dotdot escape", "dotdot via missing dir",
                  "dangling symlink", "proc self environ", "proc 1 environ", "os.open write",
                  "listdir outside", "remove", "rename out", "symlink create", "chmod", "mkdir", "link",
                  "rmtree data"):
        assert r[label].startswith("denied: "), (label, r[label])
    assert not (area / "outside" / "created-through-link").exists()
    assert (area / "data" / "f.txt").exists() and (area / "data" / "inner").exists()
    assert not (area / "out" / "hard").exists()
    # the trace shows the tool's own file access, not the interpreter's imports or scratch
    events = out["events"]
    assert any(e["op"] == "fs.open" and e["action"] == "allow" and e["path"] == str(area / "data/f.txt")
               for e in events)
    assert not any(e.get("path", "").startswith(tuple(IMPLICIT)) for e in events
                   if e["action"] == "allow")
    assert not any(e.get("path", "").startswith(str(area / "scratch")) for e in events)
    blocked = [e for e in events if e["action"] == "block"]
    assert all(e["rule"] and e["reason"] for e in blocked)


def test_dir_fd_relative_opens_are_judged_against_the_directory(area: Path) -> None:
    out = run_guarded(fs_grants(area), f"""
        import posix
        fd = attempt("open dir", lambda: os.open({str(area / 'data')!r}, os.O_RDONLY))
        attempt("write via dir_fd", lambda: os.open("x", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
        attempt("posix.open via dir_fd", lambda: posix.open("y", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
        attempt("read via dir_fd", lambda: os.close(os.open("f.txt", os.O_RDONLY, dir_fd=fd)))
        import shutil
        os.makedirs({str(area / 'out/t/u')!r})
        open({str(area / 'out/t/u/f')!r}, "w").close()
        attempt("rmtree granted", lambda: shutil.rmtree({str(area / 'out/t')!r}))
    """, area / "scratch")
    r = out["results"]
    assert r["open dir"] == "ok" and r["read via dir_fd"] == "ok" and r["rmtree granted"] == "ok"
    assert r["write via dir_fd"].startswith("denied") and r["posix.open via dir_fd"].startswith("denied")
    assert not (area / "data" / "x").exists() and not (area / "scratch" / "x").exists()
    assert not (area / "out" / "t").exists()


def test_fs_root_confines_even_an_allow_default(area: Path) -> None:
    grants = Grants(default="allow", fs_root=str(area / "data"))
    out = run_guarded(grants, f"""
        attempt("inside", lambda: open({str(area / 'data/f.txt')!r}).read())
        attempt("outside", lambda: open({str(area / 'outside/secret')!r}).read())
        attempt("scratch", lambda: open("s", "w").close())
    """, area / "scratch")
    r = out["results"]
    assert r["inside"] == "ok" and r["scratch"] == "ok"
    assert r["outside"] == f"denied: fs_safe: outside {area / 'data'}"


# --- processes and ctypes -------------------------------------------------------------------

def test_processes_blocked_without_grants(area: Path) -> None:
    out = run_guarded(Grants(), """
        import subprocess, multiprocessing.util
        attempt("os.system", lambda: os.system("true"))
        attempt("subprocess.run", lambda: subprocess.run(["true"]))
        attempt("shell", lambda: subprocess.run("true", shell=True))
        attempt("fork", lambda: os.fork())
        attempt("posix_spawnp", lambda: os.posix_spawnp("true", ["true"], {}))
        attempt("execv", lambda: os.execv("/bin/true", ["true"]))
        attempt("fork_exec", lambda: multiprocessing.util.spawnv_passfds(b"/bin/true", [b"/bin/true"], []))
    """, area / "scratch")
    for label, result in out["results"].items():
        assert result == "denied: default_policy=BLOCK", (label, result)
    strict = run_guarded(Grants(exec=("true",), deny_exec=True), """
        import subprocess
        attempt("run", lambda: subprocess.run(["true"]))
    """, area / "scratch")
    assert strict["results"]["run"] == "denied: strict: exec denied"


def test_granted_program_runs_and_others_do_not(area: Path) -> None:
    true = shutil.which("true")
    assert true is not None
    out = run_guarded(Grants(exec=(true,)), """
        import subprocess
        attempt("granted", lambda: subprocess.run(["true"], check=True))
        attempt("other", lambda: subprocess.run(["false"]))
        attempt("shell", lambda: subprocess.run("true", shell=True))
        def fork_and_reap():
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
        attempt("fork", fork_and_reap)
    """, area / "scratch")
    r = out["results"]
    assert r["granted"] == "ok" and r["fork"] == "ok", r
    assert r["other"].startswith("denied") and r["shell"].startswith("denied")
    execs = [e for e in out["events"] if e["op"] == "proc.exec" and e["target"] == "true"]
    assert len(execs) == 1 and execs[0]["action"] == "allow"  # Popen and fork_exec: one record


def test_ctypes(area: Path) -> None:
    out = run_guarded(Grants(default="allow"), """
        import ctypes
        attempt("import", lambda: ctypes.sizeof(ctypes.c_int))
        attempt("CDLL libc", lambda: ctypes.CDLL("libc.so.6"))
        attempt("symbol of main program", lambda: ctypes.CDLL(None).connect)
        attempt("pythonapi", lambda: ctypes.pythonapi.Py_IncRef)
        attempt("from_address", lambda: ctypes.c_int.from_address(id(1)))
    """, area / "scratch")
    r = out["results"]
    assert r["import"] == "ok"
    for label in ("CDLL libc", "symbol of main program", "pythonapi", "from_address"):
        assert r[label].startswith("denied: ctypes"), (label, r[label])


def test_kill_outside_own_tree(area: Path) -> None:
    out = run_guarded(Grants(), """
        import signal
        attempt("probe parent", lambda: os.kill(os.getppid(), 0))
        attempt("signal parent", lambda: os.kill(os.getppid(), signal.SIGCONT))
        attempt("signal everyone", lambda: os.kill(-1, signal.SIGCONT))
        attempt("signal self", lambda: os.kill(os.getpid(), signal.SIGCONT))
    """, area / "scratch")
    r = out["results"]
    assert r["probe parent"] == "ok" and r["signal self"] == "ok"
    assert r["signal parent"].startswith("denied") and r["signal everyone"].startswith("denied")


# --- the interface ---------------------------------------------------------------------------

def test_install_once_and_set_call_only_narrows(area: Path) -> None:
    out = run_guarded(fs_grants(area), f"""
        from failcore_worker.rules import FsRule
        attempt("install again", lambda: guards.install(Grants(), "/"))
        attempt("widen", lambda: guards.set_call(Grants(default="allow"), {str(area / 'scratch')!r}))
        guards.set_call(Grants(fs=(FsRule({str(area / 'out')!r}, True),)), {str(area / 'scratch/c1')!r})
        attempt("read no longer granted", lambda: open({str(area / 'data/f.txt')!r}).read())
        attempt("still granted", lambda: open({str(area / 'out/z')!r}, "w").close())
        os.makedirs({str(area / 'scratch/c1')!r}, exist_ok=True)
        attempt("new scratch", lambda: open({str(area / 'scratch/c1/f')!r}, "w").close())
    """, area / "scratch")
    r = out["results"]
    assert r["install again"].startswith("error: RuntimeError")
    assert r["widen"].startswith("error: ValueError")
    assert r["read no longer granted"].startswith("denied") and r["still granted"] == "ok"
    assert r["new scratch"] == "ok"


def test_take_events_clears() -> None:
    from failcore_worker import guards

    assert guards.take_events() == []  # not installed: nothing recorded, nothing raised


def test_guard_denied_is_a_permission_error_that_pickles() -> None:
    verdict = Verdict("block", "net_safe: 127.0.0.0/8 (loopback)", "add net:connect:127.0.0.1:80")
    exc = GuardDenied(verdict, "FailCore blocked net.connect 127.0.0.1:80")
    assert isinstance(exc, PermissionError) and exc.errno == 13
    again = pickle.loads(pickle.dumps(exc))
    assert again.verdict == verdict and str(again) == str(exc)


# --- network (loopback only) ----------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    redirect_to = ""

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", self.server.redirect_to)  # type: ignore[attr-defined]
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def servers() -> Iterator[tuple[int, int]]:
    """Two loopback HTTP servers; the first redirects /redirect to the second."""
    started = []
    for _ in range(2):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        srv.daemon_threads = True
        thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        started.append((srv, thread))
    first, second = started[0][0], started[1][0]
    first.redirect_to = f"http://127.0.0.1:{second.server_address[1]}/"  # type: ignore[attr-defined]
    try:
        yield first.server_address[1], second.server_address[1]
    finally:
        for srv, thread in started:
            srv.shutdown()
            srv.server_close()
            thread.join(5)


CLIENTS = """
import _socket, asyncio, http.client, socket, urllib.request
def raw():
    s = _socket.socket()
    s.settimeout(2)
    try:
        s.connect(("127.0.0.1", PORT))
    finally:
        s.close()
async def aio():
    reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
    writer.close()
    await writer.wait_closed()
def hc():
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=2)
    try:
        c.request("GET", "/")
        return c.getresponse().read()
    finally:
        c.close()
attempt("raw _socket", raw)
attempt("asyncio", lambda: asyncio.run(aio()))
attempt("urllib", lambda: urllib.request.urlopen("http://127.0.0.1:%d/" % PORT, timeout=2).read())
attempt("http.client", hc)
attempt("connect_ex", lambda: socket.socket().connect_ex(("127.0.0.1", PORT)))
attempt("udp sendto", lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", PORT)))
"""


@pytest.mark.parametrize("block_ranges", [False, True])
def test_loopback_clients_blocked_without_a_grant(area: Path, servers: tuple[int, int],
                                                  block_ranges: bool) -> None:
    port = servers[0]
    grants = Grants(net=(NetRule("127.0.0.1", port + 1, port + 1),), block_ranges=block_ranges)
    out = run_guarded(grants, f"PORT = {port}\n" + CLIENTS, area / "scratch")
    expected = "net_safe: 127.0.0.0/8" if block_ranges else "default_policy=BLOCK"
    for label, result in out["results"].items():
        assert result.startswith("denied: " + expected), (label, result)


def test_loopback_clients_allowed_with_a_grant(area: Path, servers: tuple[int, int]) -> None:
    port = servers[0]
    grants = Grants(net=(NetRule("127.0.0.1", port, port, f"net:connect:127.0.0.1:{port}"),),
                    block_ranges=True)
    out = run_guarded(grants, f"PORT = {port}\n" + CLIENTS, area / "scratch")
    assert set(out["results"].values()) == {"ok"}, out["results"]
    connects = [e for e in out["events"] if e["op"] == "net.connect"]
    assert connects and all(e["rule"] == f"capability net:connect:127.0.0.1:{port}" and
                            e["host"] == "127.0.0.1" and e["port"] == port for e in connects)


@pytest.mark.parametrize("block_ranges", [False, True])
def test_redirect_to_an_ungranted_port_is_caught_at_the_second_connect(
        area: Path, servers: tuple[int, int], block_ranges: bool) -> None:
    first, second = servers
    grants = Grants(net=(NetRule("127.0.0.1", first, first, f"net:connect:127.0.0.1:{first}"),),
                    block_ranges=block_ranges)
    out = run_guarded(grants, f"""
        import urllib.request
        attempt("follow", lambda: urllib.request.urlopen("http://127.0.0.1:{first}/redirect", timeout=2).read())
    """, area / "scratch")
    rule = "net_safe: 127.0.0.0/8" if block_ranges else "default_policy=BLOCK"
    assert out["results"]["follow"].startswith("denied: " + rule)
    net = [(e["op"], e["port"], e["action"]) for e in out["events"]
           if e["op"] in ("net.connect", "net.resolve") and e["action"] != "allow" or
           e["op"] == "net.connect"]
    # under net_safe the literal is refused as soon as it is resolved, before any socket
    second_op = "net.resolve" if block_ranges else "net.connect"
    assert net == [("net.connect", first, "allow"), (second_op, second, "block")]


def test_names_resolved_in_the_worker_let_name_grants_cover_the_address(
        area: Path, servers: tuple[int, int]) -> None:
    port = servers[0]
    # A stand-in resolver (no DNS): "api.test" resolves to loopback.
    fake_dns = """
        import socket
        _real = socket.getaddrinfo
        def _fake(host, *args, **kwargs):
            return _real("127.0.0.1" if host == "api.test" else host, *args, **kwargs)
        socket.getaddrinfo = _fake
    """
    grants = Grants(net=(NetRule("api.test", port, port, f"net:connect:api.test:{port}"),))
    out = run_guarded(grants, """
        import socket, urllib.request
        attempt("by name", lambda: urllib.request.urlopen("http://api.test:%d/" % PORT, timeout=2).read())
        attempt("by address", lambda: socket.create_connection(("127.0.0.1", PORT + 0), timeout=2).close())
    """.replace("PORT", str(port)), area / "scratch", before=fake_dns)
    r = out["results"]
    # "by address" resolves nothing new, but the address was learnt for api.test: the
    # book is per address, so it is allowed too; a never-resolved address is not.
    assert r["by name"] == "ok", r
    connect = next(e for e in out["events"] if e["op"] == "net.connect")
    assert connect["names"] == ["api.test"] and connect["action"] == "allow"
    fresh = run_guarded(grants, f"""
        import socket
        attempt("unresolved", lambda: socket.create_connection(("127.0.0.1", {port}), timeout=2).close())
    """, area / "scratch", before=fake_dns)
    assert fresh["results"]["unresolved"] == "denied: default_policy=BLOCK"


def test_unix_socket_judged_as_a_file(area: Path) -> None:
    out = run_guarded(fs_grants(area), f"""
        import socket
        s = socket.socket(socket.AF_UNIX)
        attempt("outside", lambda: s.connect({str(area / 'outside/sock')!r}))
        attempt("abstract", lambda: s.connect("\\0failcore-test"))
    """, area / "scratch")
    assert out["results"]["outside"].startswith("denied")
    assert out["results"]["abstract"].startswith("denied")


def test_dns_refused_when_no_net_is_granted(area: Path) -> None:
    out = run_guarded(Grants(), """
        import socket
        attempt("lookup", lambda: socket.getaddrinfo("localhost", 80))
        attempt("byname", lambda: socket.gethostbyname("localhost"))
    """, area / "scratch")
    assert set(out["results"].values()) == {"denied: default_policy=BLOCK"}


def test_internal_names_refused_before_dns_under_net_safe(area: Path) -> None:
    out = run_guarded(Grants(net=(NetRule("*"),), block_ranges=True), """
        import _socket, socket
        attempt("localhost", lambda: socket.create_connection(("localhost", 9), timeout=1))
        attempt("raw localhost", lambda: socket.socket().connect(("localhost", 9)))
        attempt("raw _socket localhost", lambda: _socket.socket().connect(("localhost", 9)))
        attempt("hex literal", lambda: socket.getaddrinfo("0x7f000001", 80))
        attempt("trailing dot", lambda: socket.socket().connect(("127.0.0.1.", 9)))
    """, area / "scratch")
    for label, result in out["results"].items():
        assert result.startswith("denied: net_safe"), (label, result)


@pytest.mark.netns
def test_metadata_names_refused_before_dns(area: Path) -> None:
    out = run_guarded(Grants(net=(NetRule("*"),), block_ranges=True), """
        import socket
        attempt("getaddrinfo", lambda: socket.getaddrinfo("metadata.google.internal", 80))
        attempt("connect", lambda: socket.socket().connect(("metadata.google.internal", 80)))
        attempt("http", lambda: socket.create_connection(("instance-data", 80), timeout=0.5))
    """, area / "scratch")
    for label, result in out["results"].items():
        assert result.startswith("denied: net_safe: internal name"), (label, result)
    assert all(e["op"] == "net.resolve" for e in out["events"])


# --- network (non-loopback: only inside a private network namespace) -------------------------

@pytest.mark.netns
def test_special_destinations_blocked_at_connect(area: Path) -> None:
    out = run_guarded(Grants(net=(NetRule("*"),), block_ranges=True), """
        import socket
        def connect(family, addr):
            s = socket.socket(family, socket.SOCK_STREAM)
            s.settimeout(0.5)
            try:
                s.connect(addr)
            finally:
                s.close()
        for label, family, addr in [
            ("metadata", socket.AF_INET, ("169.254.169.254", 80)),
            ("private", socket.AF_INET, ("10.0.0.1", 80)),
            ("mapped", socket.AF_INET6, ("::ffff:169.254.169.254", 80)),
            ("nat64", socket.AF_INET6, ("64:ff9b::a9fe:a9fe", 80)),
            ("ula", socket.AF_INET6, ("fd00:ec2::254", 80)),
            ("link-local v6", socket.AF_INET6, ("fe80::1%lo", 80, 0, 0)),
        ]:
            attempt(label, lambda: connect(family, addr))
    """, area / "scratch")
    for label, result in out["results"].items():
        assert result.startswith("denied: net_safe"), (label, result)


@pytest.mark.netns
def test_public_destinations_follow_the_grants(area: Path) -> None:
    grants = Grants(net=(NetRule("93.184.216.34", 443, 443, "net:connect:93.184.216.34:443"),),
                    default="warn", block_ranges=True)
    out = run_guarded(grants, """
        import socket
        def connect(addr):
            s = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET)
            s.settimeout(0.5)
            try:
                s.connect(addr)
            finally:
                s.close()
        attempt("granted", lambda: connect(("93.184.216.34", 443)))
        attempt("warned", lambda: connect(("1.1.1.1", 443)))
        attempt("warned v6", lambda: connect(("2606:4700::1111", 443)))
    """, area / "scratch")
    # nothing leaves a private namespace: the connects fail in the kernel, not in the guard
    assert all(v.startswith("error: OSError") or v.startswith("error: ") for v in out["results"].values())
    actions = {e["target"]: e["action"] for e in out["events"] if e["op"] == "net.connect"}
    assert actions == {"93.184.216.34:443": "allow", "1.1.1.1:443": "warn",
                       "[2606:4700::1111]:443": "warn"}
