"""How a session's tools look from outside: the one place the integrations read them.

MCP, LangChain, the OpenAI Agents SDK and Pydantic AI each want a tool's name, its
description, its argument schema and a way to call it; each shows a result and an error
to a model as text. They all take those from here, so the schema an agent is shown is the
model the runtime validates against (``ToolModels``), and an error reads the same
everywhere: what was refused, the rule, with every secret the trace hides hidden here too
(a granted API key a tool put in its exception must not reach a model either).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import weakref
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from failcore._errors import FailCoreError, MissingExtra, SecurityError
from failcore._recording import scrub
from failcore._schema import input_schema, output_schema
from failcore._tool import Tool, secret_values
from failcore._trace_encoding import to_jsonable
from failcore._validation import ToolModels

if TYPE_CHECKING:
    from failcore._session import Session


@dataclasses.dataclass(frozen=True)
class ToolView:
    """One registered tool as an integration sees it (read-only)."""

    name: str
    description: str
    input_model: type[BaseModel]
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None
    isolation: str
    models: ToolModels
    # The output model was derived from the return annotation: the result sits in its
    # one field ``result`` (an explicit output_model is the result itself).
    wraps_result: bool

    def structured(self, value: Any) -> Any:
        """A result as the object ``output_schema`` describes; ``None`` without one."""
        if self.output_schema is None:
            return None
        data = self.models.output_to_json(value)
        return {"result": data} if self.wraps_result else data

    def text(self, value: Any) -> str:
        """A result as the text a model reads: a string as itself, anything else as JSON."""
        if isinstance(value, str):
            return value
        data = self.models.output_to_json(value)
        return json.dumps(to_jsonable(data), ensure_ascii=False, sort_keys=True)

    def argument_names(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments from the input model's field names (aliases where set)."""
        model_fields = self.input_model.model_fields
        return {(model_fields[k].alias or k) if k in model_fields else k: v
                for k, v in fields.items()}


# A registered tool never changes, and rendering its schema costs ~100 µs: once per tool.
_VIEWS: weakref.WeakKeyDictionary[Tool, ToolView] = weakref.WeakKeyDictionary()


def _view(tool: Tool) -> ToolView:
    cached = _VIEWS.get(tool)
    if cached is None:
        cached = _VIEWS[tool] = _build(tool)
    return cached


def _build(tool: Tool) -> ToolView:
    models = tool.models
    return ToolView(
        name=tool.name, description=models.description, input_model=models.input_model,
        input_schema=input_schema(models), output_schema=output_schema(models),
        isolation=tool.isolation, models=models,
        wraps_result=models.output_model is not None and tool.metadata.output_model is None)


def views(session: Session) -> list[ToolView]:
    """The session's registered tools, in registration order."""
    return [_view(t) for t in tuple(session._tools.values())]


def view(session: Session, name: str) -> ToolView | None:
    tool = session._tools.get(name)
    return _view(tool) if tool is not None else None


def error_text(session: Session, name: str, kwargs: dict[str, Any], exc: FailCoreError) -> str:
    """What a model is told about a failed call: the error's type and message (which name
    the rule for a refusal), with the values the trace hides replaced by ``<secret>``."""
    message = str(exc)
    if isinstance(exc, SecurityError) and exc.rule and exc.rule not in message:
        message = f"{message} [rule: {exc.rule}]"
    tool = session._tools.get(name)
    if tool is not None:
        message = str(scrub(message, secret_values(tool, kwargs)))
    return f"{type(exc).__name__}: {message}"


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(
            f"{feature} needs the '{module.split('.')[0]}' package, which is not installed "
            f"({exc}); install it with: pip install 'failcore[{extra}]'") from exc
