"""The guard's relay: the agent's MCP server on one side, the confined server's client on
the other, the gate and the trace in between.

    agent ──stdio──► Server (this module) ── gate ──► ClientSession ──stdio──► launcher
                       │ mcp.request / validate.input /   (MCP SDK)          │ confine, exec
                       │ policy.precheck / mcp.refuse /                       ▼
                       │ mcp.response records                        third-party server
                       ▼                                             (empty netns, Landlock)
                     trace (hash-chained)  ◄── guard records ── EgressProxy ◄─┘ HTTP(S)_PROXY

Tools are served as the server lists them (minus those the policy does not serve), and
re-listed from the server on each ``tools/list``. ``tools/call`` is judged by the gate and
forwarded only when allowed, with the tool's timeout; a refusal, a timeout or a dead
server is a tool result with ``isError: true`` naming the rule, never a protocol crash.
Prompts and resources are not relayed (they would need rules of their own).

When the agent closes its side, the server's stdin is closed, then its process group is
killed (the SDK's shutdown); the watchdog kills the group earlier when the tree has more
processes, or more resident memory, than the policy allows.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import anyio

from failcore._recording import NoTrace, ScrubbingTrace
from failcore._tool_views import require
from failcore._trace import TraceWriter
from failcore.mcp_guard._gate import Gate, schema_digest
from failcore.mcp_guard._guard_policy import GuardPolicy
from failcore.mcp_guard._launch import Started, prepare
from failcore.mcp_guard._proxy import EgressProxy
from failcore_worker.protocol import GuardEvent
from failcore_worker.rules import env_matches

__all__ = ["guard", "serve_guarded"]

MAX_TRACE_TEXT = 16 * 1024
WATCH_INTERVAL_S = 0.25
# After the agent leaves: how long the server gets to exit on its own (its stdin closed)
# before its process group is killed. MCP hosts wait about 2 s for the guard itself.
SERVER_GRACE_S = 1.0
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_MB = 1024 * 1024


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":"),
                                     default=str).encode()).hexdigest()


def _traced_content(content: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bool]:
    """The content items for the trace: text past ``MAX_TRACE_TEXT`` cut, binary data
    replaced by its size (the record keeps the digest of the whole result)."""
    out, cut = [], False
    for item in content:
        item = dict(item)
        text = item.get("text")
        if isinstance(text, str) and len(text) > MAX_TRACE_TEXT:
            item["text"], cut = text[:MAX_TRACE_TEXT], True
        for key in ("data", "blob"):
            if isinstance(item.get(key), str):
                item[key], cut = f"<{len(item[key])} characters>", True
        out.append(item)
    return out, cut


class _Relay:
    """State shared by the handlers of one guarded server."""

    def __init__(self, policy: GuardPolicy, trace: Any, gate: Gate) -> None:
        self.policy = policy
        self.trace = trace
        self.gate = gate
        self.calls = 0
        self.refused = 0
        self.in_flight: dict[str, list[str]] = {}
        self.tools: dict[str, Any] = {}
        self.listing_digest = ""

    def proxy_event(self, event: GuardEvent) -> None:
        call_id = next(iter(self.in_flight)) if len(self.in_flight) == 1 else None
        self.trace.record("guard", call_id, dict(event))
        if event["action"] == "block":
            for notes in self.in_flight.values():
                notes.append(f"FailCore proxy refused {event.get('target', '')} "
                             f"(rule: {event['rule']}): {event['reason']}")


def _watchdog(started: Started, policy: GuardPolicy, stop: Callable[[str], None]) -> Callable[[], None]:
    """A blocking loop (run on a thread) that kills the server's process group when its
    tree has more processes or resident memory than the policy allows. Root ignores
    RLIMIT_NPROC, so this count is what bounds a root server's processes."""
    import psutil

    limit_procs = policy.server.processes
    limit_rss = policy.server.memory_mb * _MB
    done = [False]

    def loop() -> None:
        try:
            root = psutil.Process(started.pid)
        except psutil.Error:
            return
        while not done[0]:
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                return  # the server is gone
            rss = 0
            for proc in tree:
                try:
                    rss += proc.memory_info().rss
                except psutil.Error:
                    continue  # exited since the listing
            why = ""
            if len(tree) > limit_procs:
                why = f"the server's tree has {len(tree)} processes (limit {limit_procs})"
            elif rss > limit_rss:
                why = (f"the server's tree uses {rss // _MB} MB resident (limit "
                       f"{policy.server.memory_mb} MB)")
            if why:
                stop(why)
                return
            time.sleep(WATCH_INTERVAL_S)

    def cancel() -> None:
        done[0] = True

    loop.cancel = cancel  # type: ignore[attr-defined]
    return loop


async def serve_guarded(command: list[str], policy: GuardPolicy, *, trace: str | None = None,
                        errlog: TextIO = sys.stderr, agent_streams: Any = None) -> str:
    """Run ``command`` confined under ``policy`` and serve its tools to the agent over this
    process's stdio (or ``agent_streams``, a (read, write) pair) until the agent leaves.
    Returns why it stopped."""
    require("mcp", "mcp", "failcore mcp guard")
    import mcp_types as types
    from mcp import ClientSession, StdioServerParameters, stdio_client
    from mcp.server import Server, ServerRequestContext
    from mcp.server.stdio import stdio_server
    from mcp.shared.exceptions import MCPError

    from failcore import __version__

    hidden = [v for p in policy.env_names() for n, v in os.environ.items()
              if env_matches(p, n) and v]
    writer = TraceWriter(trace) if trace else None
    recorder: Any = ScrubbingTrace(writer, hidden) if writer else NoTrace()
    recorder.record("session.start", None, {"failcore_version": __version__,
                                            "policy": policy.policy.name, "format": 1})
    launch = prepare(command, policy)
    gate = Gate(policy, launch.plan["cwd"])
    relay = _Relay(policy, recorder, gate)
    stopped = "the agent closed the connection"
    proxy: EgressProxy | None = None
    params = StdioServerParameters(command=launch.launcher_argv[0], args=launch.launcher_argv[1:],
                                   env={"LANG": "C.UTF-8"})
    finished = False

    def finish() -> None:
        nonlocal finished
        if finished:
            return
        finished = True
        recorder.record("mcp.server.stop", None, {
            "reason": stopped, "calls": relay.calls, "refused": relay.refused,
            "proxy_connections": proxy.handled if proxy else 0})
        recorder.record("session.end", None, {"calls": relay.calls})
        if writer is not None:
            writer.close()

    async def on_signals(scope: anyio.CancelScope) -> None:
        nonlocal stopped
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                stopped = f"signal {signal.Signals(signum).name}"
                scope.cancel()
                return

    reaper: threading.Timer | None = None
    try:
        async with stdio_client(params, errlog=errlog) as (server_read, server_write):
            started = await anyio.to_thread.run_sync(launch.handshake)
            with anyio.CancelScope() as outer:
                async with anyio.create_task_group() as tg, \
                        ClientSession(server_read, server_write) as client:
                    if threading.current_thread() is threading.main_thread():
                        tg.start_soon(on_signals, outer)
                    if started.listener is not None:
                        proxy = EgressProxy(started.listener, policy.server_grants(), relay.proxy_event)
                        tg.start_soon(proxy.serve)

                    def kill(why: str) -> None:
                        nonlocal stopped
                        stopped = f"watchdog: {why}"
                        try:
                            os.killpg(started.pid, signal.SIGKILL)
                        except OSError:
                            pass

                    watch = _watchdog(started, policy, kill)
                    tg.start_soon(lambda: anyio.to_thread.run_sync(watch, abandon_on_cancel=True))
                    init = await client.initialize()
                    listing = await _list(client, types)
                    recorder.record("mcp.server.start", None, {
                        "command": list(command), "pid": started.pid,
                        "confinement": started.report["layers"],
                        "landlock_abi": started.report["landlock_abi"],
                        "landlock": launch.runtime.summary(), "notes": launch.runtime.notes,
                        "proxy": started.listener is not None,
                        "limits": {"timeout_s": policy.server.timeout_s,
                                   "memory_mb": policy.server.memory_mb,
                                   "processes": policy.server.processes,
                                   "open_files": policy.server.open_files,
                                   "file_size_mb": policy.server.file_size_mb},
                        "server": {"name": init.server_info.name,
                                   "version": init.server_info.version}})
                    _absorb(relay, listing)

                    async def list_tools(ctx: ServerRequestContext[Any],
                                         params: types.PaginatedRequestParams | None,
                                         ) -> types.ListToolsResult:
                        recorder.record("mcp.request", None, {"method": "tools/list",
                                                              "request_id": ctx.request_id})
                        started_at = time.monotonic()
                        _absorb(relay, await _list(client, types))
                        tools = [t for name, t in relay.tools.items() if gate.served(name)]
                        recorder.record("mcp.response", None, {
                            "method": "tools/list", "request_id": ctx.request_id, "is_error": False,
                            "forwarded": True, "content": [t.name for t in tools], "truncated": False,
                            "result_sha256": relay.listing_digest,
                            "duration_ms": round((time.monotonic() - started_at) * 1000, 3)})
                        return types.ListToolsResult(tools=tools)

                    async def call_tool(ctx: ServerRequestContext[Any],
                                        params: types.CallToolRequestParams) -> types.CallToolResult:
                        relay.calls += 1
                        call_id = f"mcp-{relay.calls}"
                        args = dict(params.arguments or {})
                        recorder.record("mcp.request", call_id, {
                            "method": "tools/call", "request_id": ctx.request_id,
                            "tool": params.name, "arguments": args})
                        result: types.CallToolResult = await _call(
                            relay, client, types, MCPError, call_id, ctx.request_id, params.name, args)
                        return result

                    agent = Server(init.server_info.name, version=init.server_info.version,
                                   instructions=(init.instructions or "") +
                                   "\n[FailCore guard: calls are checked against a policy; a "
                                   "refused call returns an error result naming the rule.]",
                                   on_list_tools=list_tools, on_call_tool=call_tool)
                    options = agent.create_initialization_options()
                    if agent_streams is not None:
                        await agent.run(agent_streams[0], agent_streams[1], options)
                    else:
                        async with stdio_server() as (agent_read, agent_write):
                            await agent.run(agent_read, agent_write, options)
                    watch.cancel()  # type: ignore[attr-defined]
                    tg.cancel_scope.cancel()
            # The trace is complete before the server is stopped: an agent that kills the
            # guard soon after closing its side loses no record.
            finish()
            reaper = threading.Timer(SERVER_GRACE_S, _kill_group, (started.pid,))
            reaper.daemon = True
            reaper.start()
        # Leaving stdio_client closed the server's stdin and waited for it; the reaper
        # killed its group if it took longer than SERVER_GRACE_S.
    finally:
        if reaper is not None:
            reaper.cancel()
        finish()
        launch.close()
    return stopped


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


async def _list(client: Any, types: Any) -> list[Any]:
    tools: list[Any] = []
    cursor = None
    for _ in range(100):  # bounded: a server paging forever gets its first 100 pages
        page = await client.list_tools(
            params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


def _absorb(relay: _Relay, tools: list[Any]) -> None:
    schemas = {t.name: t.input_schema for t in tools}
    digest = _digest({name: schema_digest(s) for name, s in schemas.items()})
    if digest == relay.listing_digest:
        return
    relay.listing_digest = digest
    relay.tools = {t.name: t for t in tools}
    relay.trace.record("mcp.tools", None, {"tools": relay.gate.set_tools(schemas)})


async def _call(relay: _Relay, client: Any, types: Any, mcp_error: type[Exception],
                call_id: str, request_id: Any, name: str, args: dict[str, Any]) -> Any:
    recorder, gate = relay.trace, relay.gate
    started_at = time.monotonic()
    decision = gate.judge(name, args)
    if decision.stage not in ("unknown", "disabled"):
        recorder.record("validate.input", call_id, {"ok": not decision.errors,
                                                    "errors": decision.errors})
    if decision.stage in ("precheck", "forward"):
        recorder.record("policy.precheck", call_id, {"findings": [
            {"arg": where, "action": v.action, "rule": v.rule, "reason": v.reason}
            for where, v in decision.findings]})

    def respond(result: Any, forwarded: bool, error: str | None = None) -> Any:
        dumped = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        content, cut = _traced_content(dumped.get("content", []))
        recorder.record("mcp.response", call_id, {
            "method": "tools/call", "request_id": request_id, "tool": name,
            "is_error": bool(result.is_error), "forwarded": forwarded, "content": content,
            "truncated": cut, "result_sha256": _digest(dumped),
            "duration_ms": round((time.monotonic() - started_at) * 1000, 3), "error": error})
        return result

    if decision.refused is not None:
        relay.refused += 1
        recorder.record("mcp.refuse", call_id, {"tool": name, "stage": decision.stage,
                                                "rule": decision.refused.rule,
                                                "reason": decision.refused.reason})
        return respond(types.CallToolResult(content=[types.TextContent(text=decision.text())],
                                            is_error=True), False)
    timeout = relay.policy.timeout(name)
    notes: list[str] = []
    relay.in_flight[call_id] = notes
    try:
        result = await client.call_tool(name, args, read_timeout_seconds=timeout)
    except mcp_error as exc:
        code = getattr(getattr(exc, "error", None), "code", None)
        if code == types.REQUEST_TIMEOUT:
            text = (f"FailCore stopped waiting for {name!r} after {timeout:g} s (rule: guard: "
                    f"timeout_s = {timeout:g}); the server was asked to cancel. Raise "
                    f"[tools.{name}] timeout_s in the guard policy if it needs longer")
        else:
            text = f"the server answered {name!r} with a protocol error: {exc}"
        return respond(types.CallToolResult(content=[types.TextContent(text=text)],
                                            is_error=True), True, str(exc))
    except (anyio.ClosedResourceError, anyio.BrokenResourceError, RuntimeError, OSError) as exc:
        text = (f"FailCore could not get an answer for {name!r} from the server "
                f"({type(exc).__name__}: {exc}); it may have been stopped by the watchdog")
        return respond(types.CallToolResult(content=[types.TextContent(text=text)],
                                            is_error=True), True, str(exc))
    finally:
        relay.in_flight.pop(call_id, None)
    if notes:
        result = result.model_copy(update={"content": [*result.content, *[
            types.TextContent(text=note) for note in notes]]})
    return respond(result, True)


def guard(command: list[str], policy: GuardPolicy, *, trace: str | None = None) -> str:
    """Blocking form of :func:`serve_guarded` over this process's stdio, for a process of
    its own (the CLI): it becomes a child subreaper, so a server's process that left the
    group with ``setsid()`` is re-parented here and killed at the end, not leaked."""
    import ctypes

    import psutil

    libc = ctypes.CDLL(None, use_errno=True)
    # Process-wide and permanent unless undone: remember it and restore it, so a caller
    # that runs the CLI in-process (a test) is not left adopting every orphan around it.
    was = ctypes.c_int(0)
    libc.prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(was), ctypes.c_ulong(0),
               ctypes.c_ulong(0), ctypes.c_ulong(0))
    libc.prctl(_PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), ctypes.c_ulong(0),
               ctypes.c_ulong(0), ctypes.c_ulong(0))
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # not ours to end
    try:
        return anyio.run(lambda: serve_guarded(command, policy, trace=trace))
    finally:
        left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=2)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(was.value), ctypes.c_ulong(0),
                   ctypes.c_ulong(0), ctypes.c_ulong(0))
