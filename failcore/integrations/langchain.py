"""A session's tools as LangChain ``StructuredTool``s (``pip install 'failcore[langchain]'``).

``tools(session)`` returns one ``StructuredTool`` per registered tool. Its ``args_schema``
is the very pydantic model the session validates against (strict ``int``/``float``/
``bool``, unknown arguments refused), so LangChain's own argument check and FailCore's
agree; ``invoke`` runs ``session.call`` and ``ainvoke`` runs ``session.acall`` (cancelling
the awaiting task kills the worker).

Errors take LangChain's tool-error path: a FailCore error (a refusal naming its rule, a
timeout, the tool's own exception) becomes a ``ToolException`` whose text, with secrets
hidden, is what ``handle_tool_error=True`` (the default here) returns to the model as a
``ToolMessage`` with ``status="error"``. Arguments LangChain refuses before the call
(``handle_validation_error``) are described the way FailCore describes them, never
echoing a secret; those never reach the session, so its trace does not show them.

The model reads a result as text (a string as itself, anything else as JSON); the value
itself is the ``ToolMessage``'s ``artifact``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from failcore._errors import FailCoreError
from failcore._tool_views import ToolView, error_text, require, views

if TYPE_CHECKING:
    from langchain_core.tools import StructuredTool

    from failcore._session import Session

__all__ = ["tools"]


def tools(session: Session, *, handle_tool_error: bool = True) -> list[StructuredTool]:
    """LangChain tools for every tool registered on ``session`` (in registration order).

    ``handle_tool_error=False`` lets the ``ToolException`` (its ``__cause__`` the FailCore
    error) propagate instead of returning its text to the model.
    """
    require("langchain_core", "langchain", "failcore.integrations.langchain")
    return [_tool(session, view, handle_tool_error) for view in views(session)]


def _tool(session: Session, view: ToolView, handle_tool_error: bool) -> StructuredTool:
    from langchain_core.tools import StructuredTool, ToolException

    name = view.name

    def run(**fields: Any) -> tuple[str, Any]:
        kwargs = view.argument_names(fields)
        try:
            value = session.call(name, **kwargs)
        except FailCoreError as exc:
            raise ToolException(error_text(session, name, kwargs, exc)) from exc
        return view.text(value), value

    async def arun(**fields: Any) -> tuple[str, Any]:
        kwargs = view.argument_names(fields)
        try:
            value = await session.acall(name, **kwargs)
        except FailCoreError as exc:
            raise ToolException(error_text(session, name, kwargs, exc)) from exc
        return view.text(value), value

    def refused(exc: Any) -> str:
        # The session's own wording (it never echoes a secret argument's value); LangChain
        # validates with the session's own (pydantic v2) model, so exc is a v2 error.
        return f"InputValidationError: {view.models.input_error(exc)}"

    return StructuredTool(
        name=name, description=view.description or name, args_schema=view.input_model,
        func=run, coroutine=arun, response_format="content_and_artifact",
        handle_tool_error=handle_tool_error, handle_validation_error=refused)
