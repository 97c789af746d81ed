"""The MCP server, driven by the official SDK's own client: in process, over stdio against
``failcore mcp serve`` in a subprocess, and over streamable HTTP on loopback.

Every server here listens on loopback or on a pipe, is started and stopped by its test,
and every loop waiting on it is bounded. The SSRF tests are ``netns``: the URL is refused
before dispatch, but were that broken the attempt must still not leave the machine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
from integration_support import TESTS, ended, in_flight, need, records

need("mcp", "mcp")
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402
from mcp.shared.exceptions import MCPError  # noqa: E402

from failcore import Session  # noqa: E402
from failcore._cli import main as cli_main  # noqa: E402
from failcore.mcp import build_server, check_host  # noqa: E402

pytestmark = pytest.mark.integration

import agent_tools  # noqa: E402

SPEC = "agent_tools:make_session"


def _failcore_command() -> list[str]:
    script = shutil.which("failcore", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "failcore._cli"]


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def _text(result: Any) -> str:
    return "".join(c.text for c in result.content)


def _assert_cancelled(trace: Path, cid: str, pid: int) -> None:
    assert _gone(pid), f"worker {pid} still running after the client went away"
    mine = ended(trace, cid)
    kills = [r["body"] for r in mine if r["kind"] == "worker.kill"]
    assert kills and kills[0]["reason"] == "cancelled" and kills[0]["pid"] == pid
    [end] = [r["body"] for r in mine if r["kind"] == "call.end"]
    assert end["status"] == "cancelled" and end["error"]["type"] == "CallCancelled"


def _request_ids(trace: Path) -> list[str | None]:
    return [(r["body"].get("context") or {}).get("mcp_request_id")
            for r in records(trace) if r["kind"] == "call.start"]


async def _check_tools_and_errors(client: Client, trace: Path) -> None:
    """The calls every transport must answer the same way."""
    listed = await client.list_tools()
    session = agent_tools.make_session()
    try:
        expected = session.schemas(format="mcp")
    finally:
        session.close()
    got = [t.model_dump(by_alias=True, exclude_none=True, mode="json") for t in listed.tools]
    assert [{k: t[k] for k in ("name", "description", "inputSchema")} for t in got] == \
        [{k: e[k] for k in ("name", "description", "inputSchema")} for e in expected]
    assert [t.get("outputSchema") for t in got] == [e.get("outputSchema") for e in expected]

    good = await client.call_tool("add", {"a": 2, "b": 3})
    assert not good.is_error and _text(good) == "5" and good.structured_content == {"result": 5}
    made = await client.call_tool("point", {"x": 4})
    assert made.structured_content == {"x": 4, "y": 0}  # an explicit output model, unwrapped

    bad = await client.call_tool("add", {"a": "2", "b": 3})
    assert bad.is_error
    assert _text(bad).startswith("InputValidationError: add: argument 'a'")

    late = await client.call_tool("slow", {"seconds": 5})
    assert late.is_error and _text(late).startswith("ToolTimeout: slow: no answer within timeout_s=1")

    leaked = await client.call_tool("login", {"user": "bob", "password": "hunter2-pass"})
    assert leaked.is_error and "PermissionError" in _text(leaked)
    assert agent_tools.SECRET_VALUE not in _text(leaked) and "hunter2-pass" not in _text(leaked)
    assert _text(leaked).count("<secret>") == 2

    with pytest.raises(MCPError, match="unknown tool 'nope'"):
        await client.call_tool("nope", {})

    ids = _request_ids(trace)
    assert len(ids) == 6 and all(ids) and len(set(ids)) == 6  # every call, the unknown one too
    ends = [r["body"]["status"] for r in records(trace) if r["kind"] == "call.end"]
    assert ends == ["ok", "ok", "invalid_input", "timeout", "failed", "invalid_input"]


# --- in process ----------------------------------------------------------------------------


def test_in_process_tools_and_errors(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    session = agent_tools.make_session(str(trace))
    try:
        async def run() -> None:
            async with Client(build_server(session)) as client:
                await _check_tools_and_errors(client, trace)

        asyncio.run(run())
    finally:
        session.close()


def test_a_replaying_session_answers_from_its_trace(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    with agent_tools.make_session(str(trace)) as recorded:
        recorded.call("add", a=2, b=3)
    replaying = Session(replay=trace)
    try:
        async def run() -> tuple[Any, Any]:
            async with Client(build_server(replaying)) as client:
                return (await client.call_tool("add", {"a": 2, "b": 3}),
                        await client.call_tool("add", {"a": 9, "b": 9}))

        same, other = asyncio.run(run())
    finally:
        replaying.close()
    assert not same.is_error and _text(same) == "5"
    assert other.is_error and _text(other).startswith("ReplayMismatch")


@pytest.mark.netns
def test_in_process_ssrf_is_an_error_result_naming_the_rule(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    session = agent_tools.make_session(str(trace))
    try:
        async def run() -> Any:
            async with Client(build_server(session)) as client:
                return await client.call_tool("fetch", {"url": "http://169.254.169.254/latest/"})

        result = asyncio.run(run())
    finally:
        session.close()
    _assert_ssrf_refused(result, trace)


def _assert_ssrf_refused(result: Any, trace: Path) -> None:
    assert result.is_error
    assert _text(result).startswith("SecurityError: fetch: argument 'url' refused before dispatch")
    assert "[rule: net_safe: 169.254.0.0/16" in _text(result)
    recs = records(trace)
    assert not [r for r in recs if r["kind"] in ("worker.spawn", "ipc.send")]  # nothing ran
    [end] = [r["body"] for r in recs if r["kind"] == "call.end"]
    assert end["status"] == "blocked" and end["error"]["layer"] == "precheck"


# --- stdio: failcore mcp serve in a subprocess ------------------------------------------------


def _stdio(trace: Path) -> StdioServerParameters:
    return StdioServerParameters(
        command=_failcore_command()[0], args=[*_failcore_command()[1:], "mcp", "serve", SPEC],
        cwd=str(TESTS), env={"FAILCORE_TEST_TRACE": str(trace)})


def test_stdio_tools_and_errors(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"

    async def run() -> None:
        async with Client(_stdio(trace)) as client:
            await _check_tools_and_errors(client, trace)

    asyncio.run(run())
    assert records(trace)[-1]["kind"] == "session.end"  # the server closed its session


@pytest.mark.netns
def test_stdio_ssrf_is_an_error_result(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"

    async def run() -> Any:
        async with Client(_stdio(trace)) as client:
            return await client.call_tool("fetch", {"url": "http://169.254.169.254/latest/"})

    _assert_ssrf_refused(asyncio.run(run()), trace)


def test_stdio_cancelled_call_and_disconnect_kill_the_worker(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"

    async def run() -> None:
        async with Client(_stdio(trace)) as client:
            # 1. the client cancels one call (notifications/cancelled); the server goes on
            task = asyncio.create_task(client.call_tool("sleepy", {"seconds": 30}))
            cid, pid = await in_flight(trace, "sleepy")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            _assert_cancelled(trace, cid, pid)
            assert _text(await client.call_tool("add", {"a": 1, "b": 1})) == "2"
            # 2. the client goes away mid-call (stdin closes)
            task = asyncio.create_task(client.call_tool("sleepy", {"seconds": 30}))
            cid, pid = await in_flight(trace, "sleepy", nth=1)
        with pytest.raises(Exception):  # noqa: B017 - whatever the SDK raises for a lost connection
            await task
        _assert_cancelled(trace, cid, pid)

    asyncio.run(run())
    # The server exited on its own, closing its session (the SDK would have had to
    # terminate it after 2 s otherwise, and a terminated server writes no session.end).
    assert records(trace)[-1]["kind"] == "session.end"


# --- streamable HTTP on loopback ---------------------------------------------------------------


@contextmanager
def _http_server(trace: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = dict(os.environ, FAILCORE_TEST_TRACE=str(trace))
    proc = subprocess.Popen([*_failcore_command(), "mcp", "serve", SPEC, "--transport", "http",
                             "--port", "0", *extra], cwd=TESTS, env=env, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # the server says where it listens, once it does
        assert " at http://127.0.0.1:" in line, line + proc.stderr.read()
        yield proc, line.rsplit(" at ", 1)[1].strip()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_http_tools_errors_and_a_clean_stop(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    with _http_server(trace) as (proc, url):
        async def run() -> None:
            async with Client(url) as client:
                await _check_tools_and_errors(client, trace)
            async with Client(url, mode="legacy") as client:  # the 2025 handshake era too
                assert _text(await client.call_tool("add", {"a": 1, "b": 2})) == "3"

        asyncio.run(run())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0  # SIGTERM is a clean stop
    assert records(trace)[-1]["kind"] == "session.end"


@pytest.mark.netns
def test_http_ssrf_is_an_error_result(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    with _http_server(trace) as (_, url):
        async def run() -> Any:
            async with Client(url) as client:
                return await client.call_tool("fetch", {"url": "http://169.254.169.254/latest/"})

        result = asyncio.run(run())
    _assert_ssrf_refused(result, trace)


def test_http_client_that_disconnects_mid_call_kills_the_worker(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    with _http_server(trace) as (proc, url):
        async def run() -> None:
            async with Client(url) as client:
                task = asyncio.create_task(client.call_tool("sleepy", {"seconds": 30}))
                cid, pid = await in_flight(trace, "sleepy")
            task.cancel()
            with pytest.raises(BaseException):  # noqa: B017 - cancelled or connection lost
                await task
            _assert_cancelled(trace, cid, pid)
            async with Client(url) as client:  # the server is fine
                assert _text(await client.call_tool("add", {"a": 1, "b": 1})) == "2"

        asyncio.run(run())


def test_http_refuses_a_non_loopback_host(capsys: pytest.CaptureFixture[str]) -> None:
    # Refused before anything is imported or bound: no socket is opened at all.
    assert cli_main(["mcp", "serve", SPEC, "--transport", "http", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "refusing to serve MCP over HTTP on '0.0.0.0'" in err and "--allow-remote" in err
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.8.9.10"):
        check_host(host)
    for host in ("10.0.0.1", "192.168.1.1", "example.com", "::"):
        with pytest.raises(Exception, match="refusing"):
            check_host(host)
    check_host("0.0.0.0", allow_remote=True)


def test_cli_reports_a_bad_session_spec(capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(TESTS)
    assert cli_main(["mcp", "serve", "agent_tools"]) == 2
    assert "is not MODULE:SESSION" in capsys.readouterr().err
    assert cli_main(["mcp", "serve", "agent_tools:nothing"]) == 2
    assert "has no attribute 'nothing'" in capsys.readouterr().err
    assert cli_main(["mcp", "serve", "agent_tools:SECRET_ENV"]) == 2
    assert "not a failcore Session" in capsys.readouterr().err
    assert cli_main(["mcp", "serve", "no_such_module_here:session"]) == 2
    assert "cannot import 'no_such_module_here'" in capsys.readouterr().err


def test_the_benchmark_measures_the_round_trip_next_to_a_direct_call() -> None:
    sys.path.insert(0, str(TESTS.parent))  # `benchmarks` lives at the repository root
    from benchmarks import _mcp_bench
    from benchmarks._timing import Row

    rows = _mcp_bench.measure_mcp(3, 1)
    assert [r.key for r in rows] == ["mcp_direct_call", "mcp_direct_acall", "mcp_stdio",
                                     "mcp_stdio_start"]
    assert all(isinstance(r, Row) and r.value > 0 for r in rows)
    text = _mcp_bench.summary({r.key: r for r in rows if isinstance(r, Row)})
    assert "x a direct `session.call`" in text and "x `await session.acall`" in text
