"""A session's tools as OpenAI Agents SDK ``FunctionTool``s (``pip install
'failcore[openai-agents]'``).

``tools(session)`` returns one ``FunctionTool`` per registered tool, its parameters the
session's own JSON Schema in the SDK's strict form (every property required,
``additionalProperties: false``), so the model is constrained to what the session will
accept. A tool whose schema has no strict form (an open ``dict[str, ...]`` argument) gets
the plain schema with ``strict="auto"`` (the default); ``strict=True`` refuses such a
session instead, ``strict=False`` never uses strict mode.

Each invocation runs ``session.acall`` (``Runner.run`` and ``Runner.run_sync`` alike),
labelled with the SDK's tool call id (``call.start`` ``context`` ``tool_call_id``). A
FailCore error (a refusal naming its rule, bad arguments, a timeout, the tool's own
exception) follows the SDK's ``failure_error_function`` idiom: by default the model gets
FailCore's text for it, secrets hidden; pass your own ``failure_error_function(ctx,
error)`` to word it, or ``None`` to let the error end the run.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

from failcore._errors import FailCoreError, InputValidationError, RegistrationError
from failcore._recording import call_context
from failcore._tool_views import ToolView, error_text, require, views

if TYPE_CHECKING:
    from agents import FunctionTool

    from failcore._session import Session

__all__ = ["tools"]

ErrorFunction = Callable[[Any, Exception], "str | Awaitable[str]"]


class _FailCoreText:
    """The default ``failure_error_function``: FailCore's own message, secrets hidden."""

    def __repr__(self) -> str:
        return "<failcore error text>"


FAILCORE_TEXT: Any = _FailCoreText()


def tools(session: Session, *, strict: bool | Literal["auto"] = "auto",
          failure_error_function: ErrorFunction | None = FAILCORE_TEXT) -> list[FunctionTool]:
    """OpenAI Agents SDK tools for every tool registered on ``session``."""
    require("agents", "openai-agents", "failcore.integrations.openai_agents")
    return [_tool(session, view, strict, failure_error_function) for view in views(session)]


def _strict_form(view: ToolView, strict: bool | Literal["auto"]) -> bool:
    if strict is False:
        return False
    from agents.exceptions import UserError
    from agents.strict_schema import ensure_strict_json_schema

    try:
        ensure_strict_json_schema(json.loads(json.dumps(view.input_schema)))
    except UserError as exc:
        if strict is True:
            raise RegistrationError(
                f"{view.name}: its argument schema has no strict form for the OpenAI Agents "
                f"SDK ({exc}); pass strict='auto' or strict=False to tools(), or give the "
                "tool arguments with closed types (a model instead of dict[str, ...])") from exc
        return False
    return True


def _tool(session: Session, view: ToolView, strict: bool | Literal["auto"],
          on_error: ErrorFunction | None) -> FunctionTool:
    from agents import FunctionTool

    name = view.name

    async def invoke(ctx: Any, raw: str) -> Any:
        kwargs: dict[str, Any] = {}
        try:
            parsed = json.loads(raw) if raw.strip() else {}
            if not isinstance(parsed, dict):
                raise InputValidationError(
                    f"{name}: the arguments must be a JSON object, got {type(parsed).__name__}")
            kwargs = parsed
            call_id = getattr(ctx, "tool_call_id", None)
            with call_context(**({"tool_call_id": call_id} if call_id else {})):
                value = await session.acall(name, **kwargs)
        except json.JSONDecodeError as exc:
            return await _report(session, name, {}, InputValidationError(
                f"{name}: the arguments are not JSON ({exc.msg} at {exc.pos})"), ctx, on_error)
        except FailCoreError as exc:
            return await _report(session, name, kwargs, exc, ctx, on_error)
        return view.text(value)

    return FunctionTool(name=name, description=view.description or name,
                        params_json_schema=view.input_schema, on_invoke_tool=invoke,
                        strict_json_schema=_strict_form(view, strict))


async def _report(session: Session, name: str, kwargs: dict[str, Any], exc: FailCoreError,
                  ctx: Any, on_error: ErrorFunction | None) -> str:
    if on_error is None:
        raise exc
    if on_error is FAILCORE_TEXT:
        return error_text(session, name, kwargs, exc)
    text = on_error(ctx, exc)
    return str(await text) if inspect.isawaitable(text) else str(text)
