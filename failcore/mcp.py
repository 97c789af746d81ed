"""Serve a session's tools over the Model Context Protocol (``pip install 'failcore[mcp]'``).

An MCP host (Claude Desktop, an IDE, an agent framework's MCP client) lists the tools and
calls them; every ``tools/call`` runs through ``session.acall``, so it gets the session's
validation, pre-check, token, locked-down worker, limits and trace, exactly like a direct
call. What the agent is told follows the MCP rule that a tool's failure is a *result*:

- a refusal (``SecurityError``), bad arguments, a timeout, a crash or the tool's own
  exception is a ``CallToolResult`` with ``isError: true`` whose text names the error and
  the rule (secrets hidden as in the trace), so the model can read it and adapt; the
  connection never sees a protocol error for it;
- an unknown tool name is a protocol error (``-32602``), as the MCP spec asks, and is still
  recorded in the trace;
- the MCP request id labels the call in the trace (``call.start`` ``context``
  ``mcp_request_id``), so an audit can match a trace line to the host's log;
- a client that cancels a call or goes away mid-call cancels the handler, which kills the
  worker's process tree (``CallCancelled``, recorded as ``cancelled``): nothing runs on
  unobserved.

Streamable HTTP binds to loopback unless ``allow_remote=True``: the server has no
authentication of its own, so anything that can reach the port can call the tools.
"""

from __future__ import annotations

import contextlib
import importlib
import ipaddress
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from failcore._errors import FailCoreError, InputValidationError
from failcore._recording import call_context
from failcore._tool_views import error_text, require, view
from failcore._trace_encoding import to_jsonable

if TYPE_CHECKING:
    from mcp.server import Server

    from failcore._session import Session

__all__ = ["build_server", "check_host", "load_session", "serve", "serve_http", "serve_stdio"]

_FEATURE = "failcore.mcp"


def build_server(session: Session, *, name: str = "failcore") -> Server[Any]:
    """An MCP server (the SDK's low-level ``mcp.server.Server``) for ``session``'s tools.

    Run it on any transport the SDK offers (``server.run(read, write, options)``,
    ``server.streamable_http_app()``), or use :func:`serve`.
    """
    require("mcp", "mcp", _FEATURE)
    import mcp_types as types
    from mcp.server import Server, ServerRequestContext
    from mcp.shared.exceptions import MCPError

    from failcore import __version__

    listed: dict[tuple[str, ...], list[types.Tool]] = {}

    def listing() -> list[types.Tool]:
        # The session's own MCP form (the models its validation runs, nothing re-derived),
        # rendered again only when a tool was registered since: it costs ~2 ms a tool.
        names = session.tools
        if names not in listed:
            listed.clear()
            listed[names] = [types.Tool.model_validate(entry)
                             for entry in session.schemas(format="mcp")]
        return listed[names]

    async def list_tools(ctx: ServerRequestContext[Any],
                         params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(tools=listing())

    async def call_tool(ctx: ServerRequestContext[Any],
                        params: types.CallToolRequestParams) -> types.CallToolResult:
        args = dict(params.arguments or {})
        labels = {} if ctx.request_id is None else {"mcp_request_id": ctx.request_id}
        tool = view(session, params.name)
        with call_context(**labels):
            try:
                value = await session.acall(params.name, **args)
            except FailCoreError as exc:
                if tool is None and isinstance(exc, InputValidationError):
                    # An unknown tool: recorded by the session; for MCP a protocol error.
                    raise MCPError(code=types.INVALID_PARAMS,
                                   message=error_text(session, params.name, args, exc)) from None
                return types.CallToolResult(
                    content=[types.TextContent(text=error_text(session, params.name, args, exc))],
                    is_error=True)
        if tool is None:  # a replaying session answers calls of tools it never registered
            return types.CallToolResult(content=[types.TextContent(
                text=json.dumps(to_jsonable(value), ensure_ascii=False, sort_keys=True))])
        return types.CallToolResult(content=[types.TextContent(text=tool.text(value))],
                                    structured_content=tool.structured(value))

    def input_schema(name: str) -> dict[str, Any] | None:
        tool = view(session, name)
        return tool.input_schema if tool is not None else None

    return Server(name, version=__version__,
                  instructions="Tools run by FailCore in locked-down workers; a refused call "
                               "returns an error result naming the rule.",
                  on_list_tools=list_tools, on_call_tool=call_tool,
                  get_tool_input_schema=input_schema)


async def serve_stdio(session: Session, *, name: str = "failcore") -> None:
    """Serve over this process's stdin/stdout until the client closes stdin."""
    server = build_server(session, name=name)
    from mcp.server.stdio import stdio_server

    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


def check_host(host: str, allow_remote: bool = False) -> None:
    """Refuse a non-loopback bind address unless ``allow_remote``. Names other than
    ``localhost`` are not resolved (a lookup is traffic, and its answer can change)."""
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise FailCoreError(
            f"refusing to serve MCP over HTTP on {host!r}: only loopback (127.0.0.1, ::1, "
            "localhost) by default, since the server has no authentication of its own and "
            "anything that reaches the port can call the tools; bind to 127.0.0.1, or pass "
            "allow_remote=True (--allow-remote) behind your own authentication")


def _listen(host: str, port: int) -> socket.socket:
    addr = host.strip("[]")
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    if host == "localhost":
        addr, family = "127.0.0.1", socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


async def serve_http(session: Session, *, host: str = "127.0.0.1", port: int = 8000,
                     allow_remote: bool = False, name: str = "failcore",
                     on_ready: Callable[[str], None] | None = None) -> None:
    """Serve over streamable HTTP at ``http://HOST:PORT/mcp`` until stopped (SIGINT/SIGTERM
    or cancellation). ``port=0`` picks a free port; ``on_ready(url)`` is told the URL once
    the socket listens."""
    check_host(host, allow_remote)
    server = build_server(session, name=name)
    uvicorn = require("uvicorn", "mcp", _FEATURE)
    app = server.streamable_http_app(host=host)
    sock = _listen(host, port)
    try:
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
        url = f"http://{shown}:{bound[1]}/mcp"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        runner = uvicorn.Server(config)
        if on_ready is not None:
            on_ready(url)
        await runner.serve(sockets=[sock])
    finally:
        sock.close()


def load_session(spec: str) -> Session:
    """The session named by ``MODULE:ATTRIBUTE`` (a ``Session``, or a function returning one).

    The current directory is searched first, as ``python -m`` would. Whatever the module
    prints while it loads goes to stderr: on the stdio transport stdout is the protocol.
    """
    from failcore._session import Session

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise FailCoreError(f"{spec!r} is not MODULE:SESSION (e.g. myapp.tools:session)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    with contextlib.redirect_stdout(sys.stderr):
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise FailCoreError(f"cannot import {module_name!r}: {exc}") from exc
        obj: Any = module
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise FailCoreError(f"{module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        if callable(obj) and not isinstance(obj, Session):
            obj = obj()
    if not isinstance(obj, Session):
        raise FailCoreError(f"{spec} is a {type(obj).__name__}, not a failcore Session "
                            "(or a function returning one)")
    return obj


def serve(session: Session, *, transport: str = "stdio", host: str = "127.0.0.1",
          port: int = 8000, allow_remote: bool = False, name: str = "failcore") -> None:
    """Serve ``session``'s tools over MCP until the client leaves (stdio) or the process is
    stopped (HTTP). Blocks; does not close the session."""
    require("mcp", "mcp", _FEATURE)
    if transport == "http":
        check_host(host, allow_remote)
    import anyio

    if transport == "stdio":
        anyio.run(lambda: serve_stdio(session, name=name))
    elif transport == "http":
        def announce(url: str) -> None:
            print(f"failcore mcp: serving {len(session.tools)} tools over streamable HTTP "
                  f"at {url}", file=sys.stderr, flush=True)

        with _stop_on_signals():
            anyio.run(lambda: serve_http(session, host=host, port=port,
                                         allow_remote=allow_remote, name=name,
                                         on_ready=announce))
    else:
        raise FailCoreError(f"unknown MCP transport {transport!r}; use 'stdio' or 'http'")


class _Stop(BaseException):
    """SIGINT/SIGTERM after uvicorn's graceful shutdown: unwind to :func:`serve`."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """Make SIGINT and SIGTERM a clean return from :func:`serve`.

    uvicorn shuts down gracefully on either, then re-raises the signal; left to the default
    handler, SIGTERM would end the process before the caller's ``finally`` closes the
    session (no ``session.end`` in the trace). Here it unwinds as ``_Stop`` instead.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except _Stop:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
