"""The MCP server's cost: a ``tools/call`` over stdio next to a direct call, in one run.

The same warm, traced tool (``inc``) is called three ways, one after the other so the
machine's load is as alike as it gets: ``session.call`` in this process, ``await
session.acall`` (the path the MCP server takes), and ``tools/call`` through the official
SDK's client to ``failcore mcp serve benchmarks._mcp_bench:make_session`` in a subprocess
(JSON-RPC over pipes, the SDK's server and client on both ends). The server's start, up
to the client's first answer, is reported too: an MCP host pays it once per session.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._baselines import inc
from benchmarks._timing import Row, Unavailable, latency_row, sample_ns
from failcore import Session, ToolMetadata

ROOT = Path(__file__).resolve().parent.parent
TOOL = "inc"


def make_session(trace: str | None = None) -> Session:
    """The session both sides serve: ``inc`` warm (isolation="tool"), JSONL trace (the
    server's path comes from ``FAILCORE_BENCH_TRACE``)."""
    session = Session(trace=trace or os.environ.get("FAILCORE_BENCH_TRACE"))
    session.register(TOOL, inc, ToolMetadata(isolation="tool"))
    return session


def _direct(n: int, warmup: int, trace: str) -> tuple[Row, Row]:
    with make_session(trace) as session:
        sync = latency_row("mcp_direct_call", "direct session.call (warm, traced; MCP comparison)",
                           sample_ns(lambda: session.call(TOOL, x=1), n, warmup))

        async def acalls() -> list[int]:
            samples = []
            for i in range(warmup + n):
                start = time.perf_counter_ns()
                await session.acall(TOOL, x=1)
                if i >= warmup:
                    samples.append(time.perf_counter_ns() - start)
            return samples

        async_row = latency_row("mcp_direct_acall",
                                "direct await session.acall (warm, traced; the MCP server's path)",
                                asyncio.run(acalls()))
    return sync, async_row


async def _over_stdio(n: int, warmup: int, trace: str) -> tuple[list[int], float]:
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    params = StdioServerParameters(
        command=sys.executable, args=["-m", "failcore._cli", "mcp", "serve",
                                      "benchmarks._mcp_bench:make_session"],
        cwd=str(ROOT), env={"FAILCORE_BENCH_TRACE": trace})
    start = time.perf_counter()
    async with Client(params) as client:
        await client.list_tools()
        startup = time.perf_counter() - start
        samples = []
        for i in range(warmup + n):
            t0 = time.perf_counter_ns()
            result = await client.call_tool(TOOL, {"x": 1})
            if i >= warmup:
                samples.append(time.perf_counter_ns() - t0)
            if result.is_error:
                raise RuntimeError(f"tools/call failed: {result.content}")
    return samples, startup


def measure_mcp(n: int, warmup: int) -> list[Row | Unavailable]:
    """Direct call, direct acall and MCP-over-stdio latency; the MCP row notes its ratios."""
    try:
        import mcp  # noqa: F401
    except ImportError:
        return [Unavailable("mcp_stdio", "MCP tools/call over stdio",
                            "the mcp extra is not installed: pip install -e '.[mcp]'")]
    with tempfile.TemporaryDirectory(prefix="failcore-bench-mcp-") as tmp:
        direct, direct_async = _direct(n, warmup, os.path.join(tmp, "direct.jsonl"))
        samples, startup = asyncio.run(_over_stdio(n, warmup, os.path.join(tmp, "mcp.jsonl")))
    over = latency_row("mcp_stdio", "MCP tools/call over stdio (SDK client -> failcore mcp serve)",
                       samples)
    note = (f"{over.value / direct.value:.1f}x the direct call, "
            f"{over.value / direct_async.value:.1f}x acall, same run")
    over = Row(over.key, over.label, over.value, over.unit, over.p90, over.n, note)
    start_row = Row("mcp_stdio_start", "MCP stdio server start, to the first tools/list answer",
                    startup * 1e6, "µs", n=1, note="once per MCP session: imports the SDK")
    return [direct, direct_async, over, start_row]


def summary(rows: dict[str, Row]) -> str:
    """The RESULTS.md paragraph on the MCP figures of this run."""
    over, direct, acall = rows.get("mcp_stdio"), rows.get("mcp_direct_call"), rows.get("mcp_direct_acall")
    if over is None or direct is None or acall is None:
        return "Not measured in this run (the mcp extra is not installed: `pip install -e '.[mcp]'`)."
    start = rows.get("mcp_stdio_start")
    started = f" Starting the server took {start.value / 1e6:.1f} s (once per MCP session)." if start else ""
    return (f"A `tools/call` over stdio to `failcore mcp serve` took {over.value:,.0f} µs (median, "
            f"p90 {over.p90 or 0:,.0f} µs): {over.value / direct.value:.1f}x a direct `session.call` "
            f"of the same warm, traced tool ({direct.value:,.0f} µs) and "
            f"{over.value / acall.value:.1f}x `await session.acall` ({acall.value:,.0f} µs), the path "
            "the server takes; the rest is JSON-RPC over two pipes and the SDK's server and client."
            + started)
