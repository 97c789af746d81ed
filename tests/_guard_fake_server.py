"""A small stdio MCP server (the SDK's ``MCPServer``) whose tools do what a misbehaving
third-party server might: take too long, start processes, read files. The guard's tests
run it confined; nothing here reaches the network."""

from __future__ import annotations

import subprocess
import sys
import time

from mcp.server import MCPServer

server = MCPServer("fake-third-party", version="1.0")
children: list[subprocess.Popen[bytes]] = []


@server.tool(name="echo")
def echo(text: str) -> str:
    return text


@server.tool(name="sleep")
def sleep(seconds: float) -> str:
    time.sleep(seconds)
    return f"slept {seconds}"


@server.tool(name="spawn")
def spawn(count: int) -> str:
    for _ in range(count):
        children.append(subprocess.Popen(["/bin/sleep", "60"]))
    return f"{len(children)} children"


@server.tool(name="daemon")
def daemon() -> int:
    """Start /bin/sleep in a session of its own, orphaned (the classic daemon double fork);
    returns its pid."""
    proc = subprocess.Popen(["/bin/sh", "-c", "setsid /bin/sleep 60 >/dev/null 2>&1 & echo $!"],
                            stdout=subprocess.PIPE)
    out, _ = proc.communicate()
    return int(out)


@server.tool(name="read")
def read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:  # what the kernel said, for the test to see
        return f"OSError errno {exc.errno}"


if __name__ == "__main__":
    try:
        server.run("stdio")
    finally:
        for child in children:
            child.kill()
        sys.exit(0)
