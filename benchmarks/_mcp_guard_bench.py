"""The guard's cost: a ``tools/call`` through ``failcore mcp guard`` next to the same call
made to the server directly, in one run.

Both rows drive the same third-party server (``benchmarks/_mcp_echo_server.py``, the SDK's
``MCPServer`` with one ``echo`` tool) with the SDK's client over stdio. The guarded row
adds what the guard does per call: a second JSON-RPC hop (agent -> guard -> server), the
input-schema validation, the pre-check and four trace records (JSONL, hash-chained);
the server runs confined (empty network namespace, Landlock, rlimits), which costs
nothing per call. Start-up (to the first ``tools/list`` answer) is reported for both: the
guard adds its own interpreter, the plan and the confined launcher, once per session.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._timing import Row, Unavailable, latency_row

SERVER = Path(__file__).resolve().parent / "_mcp_echo_server.py"


async def _calls(command: list[str], n: int, warmup: int) -> tuple[list[int], float]:
    from mcp import ClientSession, StdioServerParameters, stdio_client

    params = StdioServerParameters(command=command[0], args=command[1:],
                                   env={"PATH": os.environ.get("PATH", os.defpath)})
    start = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        async with stdio_client(params, errlog=devnull) as (read, write), \
                ClientSession(read, write) as client:
            await client.initialize()
            await client.list_tools()
            startup = time.perf_counter() - start
            samples = []
            for i in range(warmup + n):
                t0 = time.perf_counter_ns()
                result = await client.call_tool("echo", {"text": "hello"})
                if i >= warmup:
                    samples.append(time.perf_counter_ns() - t0)
                if result.is_error:
                    raise RuntimeError(f"tools/call failed: {result.content}")
    return samples, startup


def measure_guard(n: int, warmup: int) -> list[Row | Unavailable]:
    """Direct and guarded ``tools/call`` latency and start-up; the guarded row notes the ratio."""
    try:
        import mcp  # noqa: F401
    except ImportError:
        return [Unavailable("mcp_guard", "MCP guard tools/call",
                            "the mcp extra is not installed: pip install -e '.[mcp]'")]
    server = [sys.executable, str(SERVER)]
    with tempfile.TemporaryDirectory(prefix="failcore-bench-guard-") as tmp:
        guard = [sys.executable, "-m", "failcore._cli", "mcp", "guard", "--trace",
                 os.path.join(tmp, "guard.jsonl"), "--", *server]
        direct_ns, direct_start = asyncio.run(_calls(server, n, warmup))
        guarded_ns, guarded_start = asyncio.run(_calls(guard, n, warmup))
    direct = latency_row("mcp_server_direct", "MCP tools/call to a stdio server, direct (SDK client)",
                         direct_ns)
    guarded = latency_row("mcp_guard", "MCP tools/call through failcore mcp guard (confined, traced)",
                          guarded_ns)
    guarded = Row(guarded.key, guarded.label, guarded.value, guarded.unit, guarded.p90, guarded.n,
                  f"{guarded.value / direct.value:.2f}x direct, +{guarded.value - direct.value:,.0f} "
                  "µs per call, same run")
    starts = [Row("mcp_server_direct_start", "stdio MCP server start, direct, to the first tools/list",
                  direct_start * 1e6, "µs", n=1),
              Row("mcp_guard_start", "stdio MCP server start through the guard, to the first tools/list",
                  guarded_start * 1e6, "µs", n=1,
                  note=f"+{(guarded_start - direct_start) * 1000:,.0f} ms once per session")]
    return [direct, guarded, *starts]


def summary(rows: dict[str, Row]) -> str:
    """The RESULTS.md paragraph on the guard's figures of this run."""
    guarded, direct = rows.get("mcp_guard"), rows.get("mcp_server_direct")
    if guarded is None or direct is None:
        return "Not measured in this run (the mcp extra is not installed: `pip install -e '.[mcp]'`)."
    return (f"A `tools/call` through `failcore mcp guard` took {guarded.value:,.0f} µs (median, p90 "
            f"{guarded.p90 or 0:,.0f} µs) against {direct.value:,.0f} µs for the same call to the "
            f"same server directly: {guarded.value / direct.value:.2f}x, "
            f"+{guarded.value - direct.value:,.0f} µs per call for the second JSON-RPC hop, the "
            "schema validation, the pre-check and four trace records. Confinement itself costs "
            "nothing per call (it is set up once, before the server starts).")
