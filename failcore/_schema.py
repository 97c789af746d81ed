"""What a tool's types mean: the ``Secret`` marker, the coercion rule, and the agent-facing schemas.

The annotation rewriting here (:func:`tighten`) feeds the validators in
:mod:`failcore._validation`, and :func:`tool_schemas` renders the very models those
validators run, so the schema an agent is shown cannot drift from what its arguments are
checked against. Output is deterministic (same tools, same pydantic version ->
byte-identical JSON), which the golden tests pin. Import the public interface from
:mod:`failcore._validation`, which re-exports this module's names.
"""

from __future__ import annotations

import functools
import sys
import types
import typing
from collections import abc
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Strict

if TYPE_CHECKING:
    from failcore._validation import ToolModels


class Secret:
    """Marks an argument whose value must never be echoed or recorded.

    Use it as ``password: Annotated[str, Secret]`` (or ``Secret()``), or name the argument in
    ``build_models(..., secret=["password"])``. A secret argument is redacted in the trace,
    never appears in a validation error message, and is ``"writeOnly"`` in the tool's schema.
    """

    def __repr__(self) -> str:
        return "Secret()"


# Origins whose type arguments are element types we may tighten and rebuild.
_CONTAINER_ORIGINS: frozenset[Any] = frozenset({
    list, set, frozenset, tuple, dict, abc.Sequence, abc.MutableSequence, abc.Set,
    abc.MutableSet, abc.Mapping, abc.MutableMapping,
})
_STRICT_SCALARS: dict[Any, Any] = {
    int: Annotated[int, Strict()],
    float: Annotated[float, Strict()],
    bool: Annotated[bool, Strict()],
}
_UNION_ORIGINS = (typing.Union, types.UnionType)


def is_secret_marker(obj: object) -> bool:
    return obj is Secret or isinstance(obj, Secret)


def has_secret(tp: Any) -> bool:
    """True if ``tp`` is ``Annotated[..., Secret]``, possibly inside an Optional/union."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        inner, *meta = typing.get_args(tp)
        return any(is_secret_marker(m) for m in meta) or has_secret(inner)
    if origin in _UNION_ORIGINS:
        return any(has_secret(arg) for arg in typing.get_args(tp))
    return False


def tighten(tp: Any) -> Any:
    """Rewrite an annotation so ``int``/``float``/``bool`` are strict and ``Secret`` is dropped.

    The coercion rule (see :mod:`failcore._validation`): agents invent arguments, and
    ``"5"`` silently becoming ``5`` hides a wrong guess. Applied through ``Optional``,
    unions, ``Annotated`` and the standard containers; classes (nested models, enums) are
    left alone. Pure: returns a new annotation.
    """
    if type(tp) is type and tp in _STRICT_SCALARS:
        return _STRICT_SCALARS[tp]
    origin = typing.get_origin(tp)
    if origin is None:
        return _portable_typeddict(tp) if _stdlib_typeddict(tp) else tp
    args = typing.get_args(tp)
    if origin is Annotated:
        inner, *meta = args
        kept = [m for m in meta if not is_secret_marker(m)]
        new_inner = tighten(inner)
        return Annotated[(new_inner, *kept)] if kept else new_inner
    if origin in _UNION_ORIGINS:
        return typing.Union[tuple(tighten(a) for a in args)]  # noqa: UP007
    if origin in _CONTAINER_ORIGINS and args:
        new_args = tuple(a if a is Ellipsis else tighten(a) for a in args)
        if isinstance(tp, types.GenericAlias):
            return types.GenericAlias(origin, new_args)
        copy_with = getattr(tp, "copy_with", None)
        return copy_with(new_args) if copy_with is not None else tp
    return tp


def _stdlib_typeddict(tp: Any) -> bool:
    """A ``typing.TypedDict`` class, which pydantic refuses before Python 3.12."""
    return sys.version_info < (3, 12) and typing.is_typeddict(tp) \
        and type(tp).__module__ == "typing"


@functools.cache
def _portable_typeddict(td: Any) -> Any:
    """``td`` as a ``typing_extensions.TypedDict`` (same name, keys, required keys and value
    types, tightened): what pydantic accepts on every Python this package supports, so a
    tool may annotate with the standard library's TypedDict."""
    import typing_extensions as te

    fields: dict[str, Any] = {}
    for key, hint in typing.get_type_hints(td, include_extras=True).items():
        if typing.get_origin(hint) in (typing.Required, typing.NotRequired):
            hint = typing.get_args(hint)[0]
        wrap = te.Required if key in td.__required_keys__ else te.NotRequired
        fields[key] = wrap[tighten(hint)]
    portable = te.TypedDict(td.__name__, fields)  # type: ignore[misc]
    portable.__module__, portable.__qualname__ = td.__module__, td.__qualname__
    portable.__doc__ = td.__doc__
    return portable


def type_name(tp: Any) -> str:
    """A short readable name for an annotation, for error messages."""
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__qualname__
    return repr(tp).replace("typing.", "").replace("collections.abc.", "")


FORMATS: tuple[str, ...] = ("json", "openai", "anthropic", "mcp")
SECRET_NOTE = "Secret: never recorded in traces or error messages."

# Keys whose value maps names to schemas (the names are data, not schema keywords).
_NAMED_SCHEMAS = frozenset({"properties", "$defs", "definitions", "patternProperties"})
# Keys whose value is instance data, never a schema.
_DATA_KEYS = frozenset({"default", "examples", "const", "enum"})


def _strip_titles(node: Any) -> Any:
    """Drop pydantic's auto-generated ``title`` keywords: noise in a prompt, not constraints."""
    if isinstance(node, list):
        return [_strip_titles(item) for item in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title":
            continue
        if key in _DATA_KEYS:
            out[key] = value
        elif key in _NAMED_SCHEMAS and isinstance(value, dict):
            out[key] = {name: _strip_titles(sub) for name, sub in value.items()}
        else:
            out[key] = _strip_titles(value)
    return out


def input_schema(tool: ToolModels) -> dict[str, Any]:
    """The JSON Schema of a tool's arguments; secret arguments are ``writeOnly``."""
    schema: dict[str, Any] = _strip_titles(tool.input_model.model_json_schema(mode="validation"))
    props = schema.get("properties", {})
    for key in props:
        if key in tool.secret_fields:
            prop = dict(props[key])
            note = prop.get("description")
            prop["description"] = f"{note} ({SECRET_NOTE})" if note else SECRET_NOTE
            prop["writeOnly"] = True
            props[key] = dict(sorted(prop.items()))  # pydantic's own key order is sorted
    return schema


def output_schema(tool: ToolModels) -> dict[str, Any] | None:
    """The JSON Schema of a tool's result (an object), or ``None`` when it has no output model."""
    if tool.output_model is None:
        return None
    return _strip_titles(tool.output_model.model_json_schema(mode="serialization"))  # type: ignore[no-any-return]


def tool_schemas(tools: Sequence[ToolModels], format: str) -> list[dict[str, Any]]:
    """Describe ``tools`` for an agent framework, in the order given.

    ``format``: ``"json"`` (``{name, description, input_schema, output_schema}``; the output
    schema is ``null`` when absent), ``"openai"`` (function-calling ``tools`` entries),
    ``"anthropic"`` (``{name, description, input_schema}``) or ``"mcp"`` (``tools/list``
    entries, ``outputSchema`` only when the tool has an output model). Always a list.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown schema format {format!r}; valid formats: {', '.join(FORMATS)}")
    seen: set[str] = set()
    for tool in tools:
        if tool.name in seen:
            raise ValueError(f"duplicate tool name {tool.name!r}: tool names must be unique")
        seen.add(tool.name)
    return [_one(tool, format) for tool in tools]


def _one(tool: ToolModels, format: str) -> dict[str, Any]:
    params = input_schema(tool)
    if format == "json":
        return {"name": tool.name, "description": tool.description, "input_schema": params,
                "output_schema": output_schema(tool)}
    if format == "openai":
        params.setdefault("additionalProperties", False)
        return {"type": "function",
                "function": {"name": tool.name, "description": tool.description,
                             "parameters": params}}
    if format == "anthropic":
        return {"name": tool.name, "description": tool.description, "input_schema": params}
    entry: dict[str, Any] = {"name": tool.name, "description": tool.description,
                             "inputSchema": params}
    out = output_schema(tool)
    if out is not None:
        entry["outputSchema"] = out
    return entry
