"""The third-party server the guard benchmark calls: one ``echo`` tool on the MCP SDK's
``MCPServer`` over stdio, so both rows pay the same server and SDK costs."""

from mcp.server import MCPServer

server = MCPServer("bench-echo", version="1.0")


@server.tool(name="echo")
def echo(text: str) -> str:
    return text


if __name__ == "__main__":
    server.run("stdio")
