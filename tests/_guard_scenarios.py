"""Scenarios for ``failcore mcp guard``, run INSIDE a network namespace the test created.

``tests/test_mcp_guard_servers.py`` runs ``unshare -n -m python tests/_guard_scenarios.py
NAME`` (or, for the unprivileged variant, the same with ``unshare -U`` mapping the test to
uid 65534 for the part that runs the guard). This script refuses to run unless the only
network interface is loopback, so nothing it does can leave the machine even when the
guard under test is broken. In the namespace it plays the world:

- ``lo`` up, with 93.184.216.34 ("public", granted as public.test), 93.184.216.35
  ("public", not granted), 10.0.0.5 ("internal") and 169.254.169.254 (cloud metadata);
- a private hosts file bind-mounted over /etc/hosts (names resolve offline);
- an HTTP server on public.test:80 (``/`` and redirects to the internal and metadata
  addresses) and tripwire listeners on every other address, counting connections.

It prints one JSON document: what each step saw, and the tripwire counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

PUBLIC, OTHER, INTERNAL, METADATA = "93.184.216.34", "93.184.216.35", "10.0.0.5", "169.254.169.254"
HOSTS = (f"127.0.0.1 localhost\n{PUBLIC} public.test\n{OTHER} other.test\n"
         f"{INTERNAL} internal.test\n")
MARKER = "public page served inside the test namespace"
REPO = Path(__file__).resolve().parent.parent
PREFIX = REPO / ".mcp-servers"
TIMEOUT = 60.0


def only_loopback() -> bool:
    return {name for _, name in socket.if_nameindex()} <= {"lo"}


class World:
    """The namespace's fake internet: one public HTTP server and the tripwires."""

    def __init__(self, tmp: Path) -> None:
        self.hits: dict[str, int] = {}
        self.tripped: dict[str, int] = {INTERNAL: 0, METADATA: 0, OTHER: 0}
        self.servers: list[Any] = []
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        for addr in (PUBLIC, OTHER, INTERNAL, METADATA):
            subprocess.run(["ip", "addr", "add", f"{addr}/32", "dev", "lo"], check=True)
        hosts = tmp / "hosts"
        hosts.write_text(HOSTS)
        subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
        self._public()
        for addr in self.tripped:
            self._tripwire(addr)

    def _public(self) -> None:
        world = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                world.hits[self.path] = world.hits.get(self.path, 0) + 1
                targets = {"/redirect-internal": f"http://{INTERNAL}/",
                           "/redirect-metadata": f"http://{METADATA}/latest/meta-data/"}
                if self.path in targets:
                    self.send_response(302)
                    self.send_header("Location", targets[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = MARKER.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer((PUBLIC, 80), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)

    def _tripwire(self, addr: str) -> None:
        listener = socket.create_server((addr, 80))

        def accept() -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                self.tripped[addr] += 1
                conn.close()

        threading.Thread(target=accept, daemon=True).start()
        self.servers.append(listener)


def as_unprivileged(argv: list[str]) -> list[str]:
    """``argv`` run as uid/gid 65534 in a user namespace of its own (kuid stays the
    caller's, so the interpreter under /root stays readable; no capability anywhere)."""
    return ["unshare", "-U", "--map-user=65534", "--map-group=65534", *argv]


NOBODY = False  # set by main() for the "nobody" mode


def as_nobody(launch: Any) -> list[str]:
    """The launcher as the real uid 65534 (no user namespace trick): the interpreter is the
    system's /usr/bin/python3, which nobody can read, and failcore_worker (standard library
    only) comes from the checkout's typings/ link. The launcher's socket and scratch dir are
    opened to that uid."""
    os.chmod(launch.workdir, 0o711)
    os.chmod(os.path.join(launch.workdir, "control"), 0o777)
    os.chown(launch.scratch, 65534, 65534)
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env",
            f"PYTHONPATH={REPO / 'typings'}", "/usr/bin/python3", "-m",
            "failcore_worker.confined_exec", launch.launcher_argv[-1]]


def guard_argv(policy: Path, trace: Path, command: list[str], unprivileged: bool) -> list[str]:
    argv = [sys.executable, "-m", "failcore._cli", "mcp", "guard", "--policy", str(policy),
            "--trace", str(trace), "--", *command]
    return as_unprivileged(argv) if unprivileged else argv


def fetch_command() -> list[str]:
    # The server's own private-address guard is switched off: FailCore must do the refusing.
    return [str(Path(sys.executable).parent / "mcp-server-fetch"), "--ignore-robots-txt",
            "--allow-private-ips"]


def fs_command(allowed: Path) -> list[str]:
    return ["npx", "--prefix", str(PREFIX), "--no-install", "mcp-server-filesystem", str(allowed)]


def _text(result: Any) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


async def _drive(argv: list[str], steps: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any]:
    """Connect the MCP SDK's client to ``argv`` (over stdio) and run the steps."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    out: dict[str, Any] = {}
    params = StdioServerParameters(command=argv[0], args=argv[1:],
                                   env={"PATH": os.environ["PATH"]})
    with open(os.devnull, "w") as devnull:
        async with stdio_client(params, errlog=devnull) as (read, write), \
                ClientSession(read, write) as client:
            await asyncio.wait_for(client.initialize(), TIMEOUT)
            tools = await asyncio.wait_for(client.list_tools(), TIMEOUT)
            out["tools"] = sorted(t.name for t in tools.tools)
            for label, tool, args in steps:
                result = await asyncio.wait_for(client.call_tool(tool, args), TIMEOUT)
                out[label] = {"is_error": bool(result.is_error), "text": _text(result)}
    return out


async def _direct(command: list[str], policy: Any,
                  steps: list[tuple[str, str, dict[str, Any]]]) -> dict[str, Any]:
    """The confined server with no gate in front: what it does when asked directly."""
    from mcp import ClientSession, StdioServerParameters, stdio_client

    from failcore.mcp_guard._launch import prepare
    from failcore.mcp_guard._proxy import EgressProxy

    launch = prepare(command, policy)
    out: dict[str, Any] = {"proxy": []}
    params = StdioServerParameters(command=launch.launcher_argv[0], args=launch.launcher_argv[1:])
    try:
        with open(os.devnull, "w") as devnull:
            async with stdio_client(params, errlog=devnull) as (read, write):
                started = await asyncio.to_thread(launch.handshake)
                out["layers"] = {k: v["in_force"] for k, v in started.report["layers"].items()}
                tasks = []
                if started.listener is not None:
                    proxy = EgressProxy(started.listener, policy.server_grants(),
                                        out["proxy"].append)
                    tasks.append(asyncio.ensure_future(proxy.serve()))
                try:
                    async with ClientSession(read, write) as client:
                        await asyncio.wait_for(client.initialize(), TIMEOUT)
                        for label, tool, args in steps:
                            result = await asyncio.wait_for(client.call_tool(tool, args), TIMEOUT)
                            out[label] = {"is_error": bool(result.is_error), "text": _text(result)}
                finally:
                    for task in tasks:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
    finally:
        launch.close()
    return out


def _trace_summary(trace: Path) -> dict[str, Any]:
    from failcore._trace import read_trace, verify_trace

    records = read_trace(trace)
    report = verify_trace(trace)
    return {"verify_ok": report.ok, "verify_errors": report.errors[:5],
            "kinds": [r["kind"] for r in records],
            "refused": [r["body"] for r in records if r["kind"] == "mcp.refuse"],
            "guard": [r["body"] for r in records if r["kind"] == "guard"],
            "responses": [r["body"] for r in records if r["kind"] == "mcp.response"
                          and r["body"]["method"] == "tools/call"],
            "start": next((r["body"] for r in records if r["kind"] == "mcp.server.start"), None)}


def scenario_fetch(tmp: Path, unprivileged: bool) -> dict[str, Any]:
    policy = tmp / "fetch.toml"
    policy.write_text('[policy]\ninclude = ["net_safe.toml"]\n\n[server]\n'
                      'capabilities = ["net:connect:public.test:80"]\ntimeout_s = 60\n')
    trace = tmp / "trace.jsonl"

    def fetch(url: str) -> dict[str, Any]:
        return {"url": url, "raw": True, "max_length": 2000}

    steps = [("public", "fetch", fetch("http://public.test/")),
             ("metadata", "fetch", fetch(f"http://{METADATA}/latest/meta-data/")),
             ("internal", "fetch", fetch(f"http://{INTERNAL}/")),
             ("internal_name", "fetch", fetch("http://internal.test/")),
             ("other", "fetch", fetch("http://other.test/")),
             ("redirect_internal", "fetch", fetch("http://public.test/redirect-internal")),
             ("redirect_metadata", "fetch", fetch("http://public.test/redirect-metadata")),
             ("bad_args", "fetch", {"url": "http://public.test/", "max_length": "many"})]
    out = asyncio.run(_drive(guard_argv(policy, trace, fetch_command(), unprivileged), steps))
    out["trace"] = _trace_summary(trace)
    return out


def scenario_fetch_direct(tmp: Path, unprivileged: bool) -> dict[str, Any]:
    from failcore.mcp_guard import load_guard_policy

    policy = tmp / "fetch.toml"
    policy.write_text('[policy]\ninclude = ["net_safe.toml"]\n\n[server]\n'
                      'capabilities = ["net:connect:public.test:80"]\n')
    steps = [(name, "fetch", {"url": url, "raw": True})
             for name, url in (("public", "http://public.test/"),
                               ("internal", f"http://{INTERNAL}/"),
                               ("metadata", f"http://{METADATA}/latest/meta-data/"),
                               ("other", f"http://{OTHER}/"),
                               ("redirect_internal", "http://public.test/redirect-internal"))]
    return asyncio.run(_direct(fetch_command(), load_guard_policy(policy), steps))


def _fs_tree(tmp: Path) -> tuple[Path, Path]:
    data, outside = tmp / "data", tmp / "outside"
    data.mkdir()
    outside.mkdir()
    (data / "a.txt").write_text("hello from the granted tree\n")
    (outside / "secret.txt").write_text("TOP SECRET outside the grants\n")
    (data / "link.txt").symlink_to(outside / "secret.txt")
    for path in (tmp, data, outside):
        path.chmod(0o755)
    return data, outside


def scenario_fs(tmp: Path, unprivileged: bool) -> dict[str, Any]:
    data, outside = _fs_tree(tmp)
    policy = tmp / "fs.toml"
    policy.write_text(f'[server]\ncapabilities = ["fs:read:{data}", "proc:exec:/bin/sh"]\n'
                      f'\n[tools.write_file]\nenabled = false\n\n'
                      f'[tools.read_text_file]\ntimeout_s = 20\n'
                      f'arguments = {{ properties = {{ head = {{ maximum = 100 }} }} }}\n')
    trace = tmp / "trace.jsonl"
    steps = [("good", "read_text_file", {"path": str(data / "a.txt")}),
             ("traversal", "read_text_file", {"path": f"{data}/../outside/secret.txt"}),
             ("absolute_outside", "read_text_file", {"path": str(outside / "secret.txt")}),
             ("relative_traversal", "read_text_file", {"path": "../../outside/secret.txt"}),
             ("symlink_out", "read_text_file", {"path": str(data / "link.txt")}),
             ("policy_schema", "read_text_file", {"path": str(data / "a.txt"), "head": 1000}),
             ("disabled", "write_file", {"path": str(data / "b.txt"), "content": "x"}),
             ("unknown", "no_such_tool", {})]
    out = asyncio.run(_drive(guard_argv(policy, trace, fs_command(data), unprivileged), steps))
    out["trace"] = _trace_summary(trace)
    return out


def scenario_fs_direct(tmp: Path, unprivileged: bool) -> dict[str, Any]:
    """The server is told (by its own arguments) that ``outside`` is allowed; the guard's
    policy grants only ``data``. Asked directly, the server tries and the kernel refuses."""
    from failcore.mcp_guard import load_guard_policy

    data, outside = _fs_tree(tmp)
    policy = tmp / "fs.toml"
    policy.write_text(f'[server]\ncapabilities = ["fs:read:{data}", "proc:exec:/bin/sh"]\n')
    steps = [("outside", "read_text_file", {"path": str(outside / "secret.txt")}),
             ("list_outside", "list_directory", {"path": str(outside)})]
    command = ["npx", "--prefix", str(PREFIX), "--no-install", "mcp-server-filesystem",
               str(data), str(outside)]
    return asyncio.run(_direct(command, load_guard_policy(policy), steps))


HOSTILE_PY = r"""
import json, os, socket, subprocess
out = {}
def attempt(name, fn):
    try:
        fn(); out[name] = "ok"
    except OSError as e:
        out[name] = f"{type(e).__name__}:{e.errno}"
def connect(addr):
    s = socket.socket(); s.settimeout(3)
    try: s.connect((addr, 80))
    finally: s.close()
attempt("read_secret", lambda: open(os.environ["SECRET"]).read())
attempt("read_etc_shadow", lambda: open("/etc/shadow").read())
attempt("write_outside", lambda: open(os.environ["OUTSIDE"] + "/new.txt", "w").write("x"))
attempt("write_scratch", lambda: open(os.environ["HOME"] + "/note.txt", "w").write("x"))
for label, addr in (("internal", "10.0.0.5"), ("metadata", "169.254.169.254"),
                    ("public_not_granted", "93.184.216.35"), ("public_granted", "93.184.216.34")):
    attempt("connect_" + label, lambda a=addr: connect(a))
attempt("exec_sh", lambda: subprocess.run(["/bin/sh", "-c", "true"], check=True))
attempt("signal_parent", lambda: os.kill(os.getppid(), 0))
attempt("bind_port", lambda: socket.create_server(("127.0.0.1", 8080)).close())
attempt("mknod_char", lambda: os.mknod(os.environ["HOME"] + "/dev", 0o600 | 0o020000, os.makedev(1, 3)))
try:
    bytearray(512 * 2**20)
    out["allocate_512mb"] = "ok"
except MemoryError:
    out["allocate_512mb"] = "MemoryError"
kids = []
try:
    for _ in range(40):
        pid = os.fork()
        if pid == 0:
            import time
            time.sleep(2)
            os._exit(0)
        kids.append(pid)
    out["fork_40"] = "ok"
except OSError as e:
    out["fork_40"] = f"{type(e).__name__}:{e.errno} after {len(kids)}"
for pid in kids:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
print(json.dumps(out))
"""

HOSTILE_JS = r"""
const fs = require("fs"), net = require("net"), cp = require("child_process");
const out = {};
function attempt(name, fn) { try { fn(); out[name] = "ok"; } catch (e) { out[name] = e.code || String(e); } }
attempt("read_secret", () => fs.readFileSync(process.env.SECRET));
attempt("write_outside", () => fs.writeFileSync(process.env.OUTSIDE + "/js.txt", "x"));
attempt("exec_sh", () => cp.execFileSync("/bin/sh", ["-c", "true"]));
const targets = [["internal", "10.0.0.5"], ["metadata", "169.254.169.254"]];
let pending = targets.length;
for (const [label, host] of targets) {
  const s = net.connect({host, port: 80, timeout: 3000});
  s.on("connect", () => { out["connect_" + label] = "ok"; s.destroy(); done(); });
  s.on("error", (e) => { out["connect_" + label] = e.code; done(); });
  s.on("timeout", () => { out["connect_" + label] = "timeout"; s.destroy(); done(); });
}
function done() { if (--pending === 0) console.log(JSON.stringify(out)); }
"""


def scenario_hostile(tmp: Path, unprivileged: bool) -> dict[str, Any]:
    """Code that tries to escape, confined exactly like a guarded server (no MCP here):
    it reads, writes, connects, execs, signals; the kernel must refuse each."""
    from failcore.mcp_guard import load_guard_policy
    from failcore.mcp_guard._launch import prepare

    data, outside = _fs_tree(tmp)
    policy = tmp / "p.toml"
    policy.write_text(f'[server]\ncapabilities = ["fs:read:{data}", '
                      '"net:connect:public.test:80", "env:SECRET", "env:OUTSIDE"]\n'
                      'memory_mb = 256\nprocesses = 16\n')
    os.environ["SECRET"], os.environ["OUTSIDE"] = str(outside / "secret.txt"), str(outside)
    out: dict[str, Any] = {}
    python = "/usr/bin/python3" if NOBODY else sys.executable
    for label, command in (("python", [python, "-I", "-c", HOSTILE_PY]),
                           ("node", ["node", "-e", HOSTILE_JS])):
        launch = prepare(command, load_guard_policy(policy))
        argv = as_unprivileged(launch.launcher_argv) if unprivileged else launch.launcher_argv
        if NOBODY:
            argv = as_nobody(launch)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            started = launch.handshake()
            if started.listener is not None:
                started.listener.close()  # no proxy here: a connect to it finds no one
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
            out[label] = json.loads(stdout.decode() or "{}") if proc.returncode == 0 else {
                "returncode": proc.returncode, "stderr": stderr.decode()[-2000:]}
            out[label + "_layers"] = {k: v["in_force"] for k, v in started.report["layers"].items()}
            out[label + "_netns"] = started.report["layers"]["netns"]["reason"]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
            launch.close()
    out["outside_files"] = sorted(p.name for p in outside.iterdir())
    return out


SCENARIOS = {"fetch": scenario_fetch, "fetch_direct": scenario_fetch_direct, "fs": scenario_fs,
             "fs_direct": scenario_fs_direct, "hostile": scenario_hostile}


def main() -> int:
    global NOBODY
    name, mode = sys.argv[1], sys.argv[2]
    NOBODY = mode == "nobody"
    if not only_loopback():
        print(json.dumps({"error": "refusing to run: this is not a private network namespace"}))
        return 3
    with tempfile.TemporaryDirectory(prefix="guard-scenario-") as tmp:
        Path(tmp).chmod(0o755)
        world = World(Path(tmp))
        result = SCENARIOS[name](Path(tmp), mode == "unprivileged")
        result["uid"] = os.getuid()
        result["tripped"] = world.tripped
        result["hits"] = world.hits
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
