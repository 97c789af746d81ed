"""A session's tools as Pydantic AI ``Tool``s (``pip install 'failcore[pydantic-ai]'``).

``tools(session)`` returns one ``pydantic_ai.Tool`` per registered tool, built with
``Tool.from_schema`` from the session's own JSON Schema: Pydantic AI shows the model that
schema and hands the arguments over unchanged, and the session is the one place they are
validated. Each invocation runs ``session.acall`` (``agent.run`` and ``agent.run_sync``
alike), labelled with Pydantic AI's tool call id (``call.start`` ``context``
``tool_call_id``).

Errors follow Pydantic AI's idiom: arguments the session refuses raise ``ModelRetry``
(the model is asked to correct them, within the tool's retry budget); every other
FailCore error (a refusal naming its rule, a timeout, a crash, the tool's own exception)
raises ``pydantic_ai.exceptions.ToolFailed``, a failed result the model sees and adapts
to without retrying the same call. Both carry FailCore's text with secrets hidden.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from failcore._errors import FailCoreError, InputValidationError
from failcore._recording import call_context
from failcore._tool_views import ToolView, error_text, require, views

if TYPE_CHECKING:
    from pydantic_ai import RunContext, Tool

    from failcore._session import Session

__all__ = ["tools"]


def tools(session: Session) -> list[Tool[Any]]:
    """Pydantic AI tools for every tool registered on ``session``."""
    require("pydantic_ai", "pydantic-ai", "failcore.integrations.pydantic_ai")
    return [_tool(session, view) for view in views(session)]


def _tool(session: Session, view: ToolView) -> Tool[Any]:
    from pydantic_ai import Tool
    from pydantic_ai.exceptions import ModelRetry, ToolFailed

    name = view.name

    async def run(ctx: RunContext[Any], **kwargs: Any) -> Any:
        labels = {"tool_call_id": ctx.tool_call_id} if ctx.tool_call_id else {}
        with call_context(**labels):
            try:
                return await session.acall(name, **kwargs)
            except InputValidationError as exc:
                raise ModelRetry(error_text(session, name, kwargs, exc)) from exc
            except FailCoreError as exc:
                raise ToolFailed(error_text(session, name, kwargs, exc)) from exc

    run.__name__ = name
    return Tool.from_schema(run, name=name, description=view.description or name,
                            json_schema=view.input_schema, takes_ctx=True)
