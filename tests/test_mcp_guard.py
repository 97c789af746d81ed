"""``failcore mcp guard``'s parts: the policy file, the runtime plan, the gate, the egress
proxy (on loopback only), the launcher's fail-closed refusal, and the whole guard around a
small SDK server (timeouts, the watchdog, Landlock, the trace). Nothing here attempts a
non-loopback address: the guarded server has no network grant (its namespace is empty),
the proxy is exercised with loopback upstreams, and names it must refuse are refused by
rule before any lookup. The real third-party servers: tests/test_mcp_guard_servers.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from failcore import Policy, PolicyError
from failcore._cli import main as cli_main
from failcore._trace import read_trace, verify_trace
from failcore._trace_schema import KINDS, validate_record
from failcore.mcp_guard import ConfinementRefused, Gate, GuardPolicy, load_guard_policy
from failcore.mcp_guard._launch import prepare
from failcore.mcp_guard._proxy import EgressProxy
from failcore.mcp_guard._runtime import plan_runtime
from failcore_worker import _exec_kernel as k

pytest.importorskip("mcp")
REPO = Path(__file__).resolve().parent.parent
FAKE = REPO / "tests" / "_guard_fake_server.py"


# --- the policy file -----------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "guard.toml"
    path.write_text(text)
    return path


def test_policy_file_shape(tmp_path: Path) -> None:
    policy = load_guard_policy(_write(tmp_path, """
        [policy]
        include = ["net_safe.toml"]
        [server]
        capabilities = ["fs:read:/srv/docs", "net:connect:api.example.com:443", "env:TOKEN"]
        timeout_s = 12
        memory_mb = 256
        processes = 16
        unlisted_tools = "deny"
        [tools.read_file]
        capabilities = ["fs:read:/srv/docs/public"]
        timeout_s = 3
        arguments = { properties = { path = { pattern = "^/srv/" } } }
        [tools.delete]
        enabled = false
    """))
    assert policy.policy.block_ranges  # net_safe.toml found among the shipped policies
    assert policy.server.memory_mb == 256 and policy.server.processes == 16
    assert policy.timeout("read_file") == 3 and policy.timeout("other") == 12
    assert policy.tool("read_file") is not None
    assert policy.tool("delete") is None and policy.tool("unlisted") is None
    assert [r.path for r in policy.tool_grants("read_file").fs] == ["/srv/docs/public"]
    assert policy.env_names() == ["TOKEN"] and policy.has_network()
    assert [r.host for r in policy.server_grants().net] == ["api.example.com"]


def test_the_readme_example_policy_loads(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("### Guard a third-party MCP server", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    policy = load_guard_policy(_write(tmp_path, example))
    assert policy.tool("write_file") is None and policy.timeout("read_text_file") == 5
    assert policy.policy.block_ranges and policy.programs() == ["/bin/sh"]


def test_policy_file_problems_are_all_listed(tmp_path: Path) -> None:
    path = _write(tmp_path, """
        typo = 1
        [server]
        capabilities = ["fs:read:/srv"]
        memory_mb = -1
        colour = "blue"
        [tools.read_file]
        capabilities = ["fs:read:/etc"]
        arguments = { type = 12 }
        enabled = "yes"
    """)
    with pytest.raises(PolicyError) as info:
        load_guard_policy(path)
    text = str(info.value)
    for expected in ("unknown top-level key 'typo'", "unknown key 'colour'",
                     "memory_mb must be a positive integer",
                     "fs:read:/etc is not covered by the server's capabilities",
                     "not a valid JSON Schema", "enabled must be true or false"):
        assert expected in text, text


def test_cli_reports_a_bad_policy_and_a_missing_command(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = _write(tmp_path, "[server]\ncapabilities = [\"fs:read:relative\"]\n")
    assert cli_main(["mcp", "guard", "--policy", str(bad), "--", "true"]) == 2
    assert "fs:read:relative" in capsys.readouterr().err
    assert cli_main(["mcp", "guard"]) == 2
    assert "no server command" in capsys.readouterr().err
    assert cli_main(["mcp", "guard", "--", "no-such-program-anywhere"]) == 2
    assert "not found on PATH" in capsys.readouterr().err


# --- what a program needs to run -------------------------------------------------------


def test_runtime_plan_follows_shebangs_and_keeps_writes_unexecutable(tmp_path: Path) -> None:
    script = tmp_path / "pkg" / "node_modules" / "tool" / "cli.js"
    script.parent.mkdir(parents=True)
    script.write_text("#!/usr/bin/env node\n")
    script.chmod(0o755)
    scratch, out = tmp_path / "scratch", tmp_path / "out"
    scratch.mkdir()
    out.mkdir()
    plan = plan_runtime([str(script)], path_env="/usr/bin:/bin", scratch=str(scratch),
                        read=["/etc/hostname"], write=[str(out)])
    rules = dict(plan.rules())
    assert rules[str(tmp_path / "pkg" / "node_modules")] == k.RUN  # the package's own tree
    assert rules[os.path.realpath("/usr/bin/env")] & k.EXECUTE
    assert rules[os.path.realpath("/usr/bin/node")] & k.EXECUTE
    for writable in (scratch, out):
        assert rules[str(writable)] & k.WRITE_FILE
        assert not rules[str(writable)] & (k.EXECUTE | k.MAKE_CHAR | k.MAKE_BLOCK)
    assert not any(p.startswith("/etc/ssl/private") or p in ("/", "/etc", "/root", "/home")
                   for p in plan.paths)
    with pytest.raises(FileNotFoundError):
        plan_runtime(["no-such-program-anywhere"], path_env="/usr/bin", scratch=str(scratch))


def test_runtime_plan_for_a_virtualenv_interpreter(tmp_path: Path) -> None:
    if sys.prefix == sys.base_prefix:
        pytest.skip("not running from a virtualenv")
    plan = plan_runtime([sys.executable, "-c", "pass"], path_env="/usr/bin", scratch=str(tmp_path))
    assert any(p == os.path.realpath(sys.prefix) and r == k.RUN for p, r in plan.rules())
    assert any(why.endswith("Python's prefix") for whys in plan.why.values() for why in whys)


# --- the gate ---------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"path": {"type": "string"}},
          "required": ["path"]}


def _gate(tmp_path: Path, text: str) -> Gate:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    gate = Gate(load_guard_policy(_write(tmp_path, text)), str(scratch))
    gate.set_tools({"read": SCHEMA, "write": SCHEMA, "other": SCHEMA,
                    "broken": {"type": "object", "properties": 5}})
    return gate


def test_gate_decides_in_order(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "ok.txt").write_text("x")
    gate = _gate(tmp_path, f"""
        [server]
        capabilities = ["fs:read:{tmp_path}"]
        [tools.read]
        capabilities = ["fs:read:{data}"]
        arguments = {{ properties = {{ path = {{ maxLength = 200 }} }} }}
        [tools.write]
        enabled = false
    """)
    assert gate.judge("read", {"path": str(data / "ok.txt")}).refused is None
    assert gate.judge("nope", {}).stage == "unknown"
    assert gate.judge("write", {"path": "x"}).stage == "disabled"
    assert not gate.served("broken")  # its schema is not JSON Schema: never served
    bad = gate.judge("read", {"path": 7})
    assert bad.stage == "validate" and bad.errors[0]["loc"] == "path"
    long = gate.judge("read", {"path": "/" + "a" * 300})
    assert long.stage == "validate" and "maxLength" in long.errors[0]["type"]
    for path in (f"{data}/../secret", str(tmp_path / "elsewhere"), "../elsewhere"):
        decision = gate.judge("read", {"path": path})
        assert decision.stage == "precheck", path
        assert decision.refused is not None and decision.refused.rule == "default_policy=BLOCK"
        assert "before it reached the server" in decision.text()
    # The server-wide grant still covers "other" (no [tools.other] table).
    assert gate.judge("other", {"path": str(tmp_path / "elsewhere")}).refused is None


def test_gate_unlisted_tools_denied(tmp_path: Path) -> None:
    gate = _gate(tmp_path, '[server]\nunlisted_tools = "deny"\n[tools.read]\n')
    assert gate.served("read") and not gate.served("other")
    assert gate.judge("other", {"path": "x"}).stage == "disabled"


# --- the proxy (loopback upstreams only) -------------------------------------------------


class _Upstream:
    """A loopback HTTP server counting requests; ``/hop`` redirects to ``target``."""

    def __init__(self, host: str = "127.0.0.1", target: str = "") -> None:
        self.hits: list[str] = []
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.target = target
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                line = head.split(b"\r\n", 1)[0].decode()
                self.hits.append(line)
                body = b"upstream says hi"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (len(body), body))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def upstreams() -> Iterator[tuple[_Upstream, _Upstream]]:
    good, tripwire = _Upstream("127.0.0.1"), _Upstream("127.0.0.2")
    yield good, tripwire
    good.close()
    tripwire.close()


async def _through_proxy(grants: Any, requests: list[bytes]) -> tuple[list[bytes], list[Any]]:
    events: list[Any] = []
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    proxy = EgressProxy(listener, grants, events.append)
    task = asyncio.ensure_future(proxy.serve())
    await asyncio.sleep(0.05)
    answers = []
    try:
        for raw in requests:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if head.startswith(b"HTTP/1.1 200 Connection established"):
                writer.write(b"GET /tunnel HTTP/1.1\r\nHost: x\r\n\r\n")
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            body = await asyncio.wait_for(reader.read(4096), 10)
            answers.append(head + body)
            writer.close()
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        listener.close()
    return answers, events


def test_proxy_judges_the_address_it_dials(upstreams: tuple[_Upstream, _Upstream]) -> None:
    good, tripwire = upstreams
    policy = Policy(name="net_safe", block_ranges=True)
    grants = policy.grants([f"net:connect:127.0.0.1:{good.port}"])
    answers, events = asyncio.run(_through_proxy(grants, [
        f"GET http://127.0.0.1:{good.port}/page HTTP/1.1\r\nHost: x\r\nProxy-Connection: keep-alive\r\n\r\n".encode(),
        f"CONNECT 127.0.0.1:{good.port} HTTP/1.1\r\n\r\n".encode(),
        f"GET http://localhost:{good.port}/named HTTP/1.1\r\n\r\n".encode(),
        f"GET http://127.0.0.2:{tripwire.port}/ HTTP/1.1\r\n\r\n".encode(),
        f"CONNECT 127.0.0.2:{tripwire.port} HTTP/1.1\r\n\r\n".encode(),
        f"GET http://127.0.0.1:{tripwire.port}/ HTTP/1.1\r\n\r\n".encode(),  # port not granted
        b"GET http://metadata.google.internal/ HTTP/1.1\r\n\r\n",  # refused before any lookup
        b"GET https://127.0.0.1/ HTTP/1.1\r\n\r\n",
        b"nonsense\r\n\r\n",
    ]))
    assert [a.split(b" ", 2)[1] for a in answers] == [
        b"200", b"200", b"200", b"403", b"403", b"403", b"403", b"400", b"400"]
    assert good.hits == ["GET /page HTTP/1.1", "GET /tunnel HTTP/1.1", "GET /named HTTP/1.1"]
    assert tripwire.hits == []
    assert b"X-FailCore-Rule: net_safe: 127.0.0.0/8" in answers[3]
    assert b"net_safe: internal name metadata.google.internal" in answers[6]
    blocked = [e for e in events if e["action"] == "block"]
    assert [e["op"] for e in blocked] == ["net.connect"] * 3 + ["net.resolve"]
    assert all(e["observed"] == "parent" for e in events)


# --- the launcher fails closed -------------------------------------------------------------


def test_launcher_refuses_to_exec_when_a_required_layer_is_missing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    launch = prepare(["/bin/sh", "-c", f"echo > {marker}"], GuardPolicy())
    launch.plan["require"] = ["uid"]  # never in force here: the guard does not drop the uid
    proc = subprocess.Popen(launch.launcher_argv, start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        with pytest.raises(ConfinementRefused, match="required confinement not in force: uid"):
            launch.handshake(30)
        assert proc.wait(30) == 126
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        launch.close()
    assert not marker.exists()


# --- the whole guard around a small SDK server ---------------------------------------------


def _guard_run(tmp_path: Path, policy_text: str, steps: list[tuple[str, dict[str, Any]]],
               ) -> tuple[list[Any], list[dict[str, Any]]]:
    from mcp import ClientSession, StdioServerParameters, stdio_client

    policy = _write(tmp_path, policy_text)
    trace = tmp_path / "trace.jsonl"
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "failcore._cli", "mcp", "guard", "--policy", str(policy), "--trace",
              str(trace), "--", sys.executable, str(FAKE)],
        env={"PATH": os.environ["PATH"]})

    async def drive() -> list[Any]:
        results = []
        with open(os.devnull, "w") as devnull:
            async with stdio_client(params, errlog=devnull) as (read, write), \
                    ClientSession(read, write) as client:
                await asyncio.wait_for(client.initialize(), 60)
                for tool, args in steps:
                    try:
                        results.append(await asyncio.wait_for(client.call_tool(tool, args), 60))
                    except Exception as exc:  # noqa: BLE001 - a dead server, recorded
                        results.append(exc)
        return results

    results = asyncio.run(drive())
    return results, read_trace(trace)


def _text(result: Any) -> str:
    return "\n".join(getattr(c, "text", "") for c in result.content)


@pytest.mark.timeout(120)
def test_guard_timeout_landlock_and_trace(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    results, records = _guard_run(tmp_path, """
        [server]
        timeout_s = 20
        [tools.sleep]
        timeout_s = 1
    """, [("echo", {"text": "hi"}), ("sleep", {"seconds": 5}), ("echo", {"text": "again"}),
          ("read", {"path": "/etc/shadow"}), ("read", {"path": str(FAKE)})])
    echo, slow, again, shadow, own = results
    assert not echo.is_error and _text(echo) == "hi"
    assert slow.is_error and "timeout_s = 1" in _text(slow)
    assert not again.is_error and _text(again) == "again"  # the server survived the timeout
    assert _text(shadow) == "OSError errno 13"  # EACCES: Landlock, in the server itself
    assert not own.is_error and "MCPServer" in _text(own)  # its own script's directory
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "session.start" and kinds[-1] == "session.end"
    assert verify_trace(tmp_path / "trace.jsonl").ok
    for rec in records:  # strict schemas: every record reads back exactly as written
        assert validate_record(rec).model_dump(mode="json", exclude_unset=True) == rec
    assert {k for k in KINDS if k.startswith("mcp.")} <= set(kinds) | {"mcp.refuse"}
    start = next(r["body"] for r in records if r["kind"] == "mcp.server.start")
    assert start["server"] == {"name": "fake-third-party", "version": "1.0"}
    assert all(start["confinement"][k]["in_force"]
               for k in ("netns", "landlock", "no_new_privs", "capabilities"))
    assert start["proxy"] is False  # no net grant: no way out at all
    responses = [r["body"] for r in records if r["kind"] == "mcp.response"
                 and r["body"]["method"] == "tools/call"]
    assert [r["is_error"] for r in responses] == [False, True, False, False, False]
    stop = next(r["body"] for r in records if r["kind"] == "mcp.server.stop")
    assert stop["calls"] == 5 and stop["refused"] == 0
    assert cli_main(["show", str(tmp_path / "trace.jsonl")]) == 0
    shown = capsys.readouterr().out
    assert "mcp-2  sleep" in shown and "failed" in shown and "5 calls (1 failed, 4 ok)" in shown


@pytest.mark.timeout(120)
def test_guard_watchdog_bounds_the_process_tree(tmp_path: Path) -> None:
    results, records = _guard_run(tmp_path, """
        [server]
        capabilities = ["proc:exec:/bin/sleep"]
        processes = 6
    """, [("spawn", {"count": 12}), ("sleep", {"seconds": 3})])
    stop = next(r["body"] for r in records if r["kind"] == "mcp.server.stop")
    if os.geteuid() == 0:
        # Root ignores RLIMIT_NPROC: the watchdog (polling every 0.25 s, hence the sleep)
        # counts the tree and kills its group; the call in flight gets an error.
        assert stop["reason"].startswith("watchdog: the server's tree has"), stop
        assert getattr(results[1], "is_error", True)
    else:
        assert getattr(results[0], "is_error", True)  # RLIMIT_NPROC refused the fork
    assert verify_trace(tmp_path / "trace.jsonl").ok


@pytest.mark.timeout(120)
def test_guard_kills_a_daemonised_server_process(tmp_path: Path) -> None:
    import psutil

    results, records = _guard_run(tmp_path, """
        [server]
        capabilities = ["proc:exec:/bin/sh", "proc:exec:/usr/bin/setsid", "proc:exec:/bin/sleep"]
    """, [("daemon", {})])
    pid = int(_text(results[0]))
    try:
        proc = psutil.Process(pid)
        alive = proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    if alive:  # ours: the test started it through the guard; end it before failing
        proc.kill()
    assert not alive, "a setsid() child of the server outlived the guard"
