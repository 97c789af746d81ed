"""Input and output validation for tools: pydantic models built once per tool, checked on every call.

The parent runs these checks on the hot path (before dispatch, after return), so everything
expensive -- signature inspection, model creation, validator compilation -- happens once in
:func:`build_models`; a call only runs the compiled pydantic-core validator.

Coercion rule (documented in the README and tested): agents invent arguments, so the models
derived from a signature refuse the silent type changes that hide a wrong guess. ``int``,
``float`` and ``bool`` are strict wherever they appear in a parameter or return annotation
(also inside ``Optional``, unions, ``list[...]``, ``dict[...]``, ``tuple[...]``, ``set[...]``):
``"5"`` is refused for an ``int``, ``5.0`` is refused for an ``int``, ``1`` and ``"true"`` are
refused for a ``bool``; an ``int`` is accepted for a ``float`` (no information is lost).
``str`` never accepts a number (pydantic v2's default). Everything else keeps pydantic's lax
mode, because JSON has no other way to spell it: ``"2024-01-01"`` for a ``date``, a list for a
``tuple``, a dict for a nested model, a value for an ``Enum``. Nested pydantic models and
explicit ``input_model``/``output_model`` classes validate under their own ``model_config``
(set ``strict=True`` there to get the same rule inside them).
"""

from __future__ import annotations

import inspect
import reprlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PydanticUserError,
    TypeAdapter,
    create_model,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import from_json, to_json

from failcore._errors import InputValidationError, OutputValidationError, RegistrationError
from failcore._schema import (
    FORMATS,
    Secret,
    has_secret,
    is_secret_marker,
    tighten,
    tool_schemas,
    type_name,
)
from failcore._trace_encoding import from_jsonable, to_jsonable

__all__ = ["FORMATS", "REDACTED", "Secret", "ToolModels", "build_models", "tighten", "tool_schemas"]

REDACTED = "<secret>"
# Errors a strict model raises for a dict or a value where it wants an instance.
_INSTANCE_ONLY = frozenset({"dataclass_exact_type", "is_instance_of", "model_type",
                            "enum", "named_tuple_type"})
_DERIVED_CONFIG = ConfigDict(extra="forbid", protected_namespaces=(), defer_build=False)
# Results are recorded as JSON and rebuilt on replay: bytes must survive that (base64).
_RESULT_CONFIG = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")
_short = reprlib.Repr()
_short.maxstring = 60
_short.maxother = 60
_short.maxlevel = 2
_short.maxlist = _short.maxdict = _short.maxtuple = _short.maxset = 4


def _first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n", 1)[0].split())


class ToolModels:
    """The compiled validators of one tool, built once by :func:`build_models`.

    ``validate_input`` / ``validate_output`` are the per-call checks; ``redact``,
    ``output_to_json`` and ``output_from_json`` turn values into what the trace may hold
    and back. Nothing is modified after construction, so one instance serves every call and
    every thread.
    """

    __slots__ = (
        "name", "description", "input_model", "output_model", "secret_fields",
        "_accepts", "_rename", "_extra_allowed", "_in_types", "_out_adapter", "_out_expected",
    )

    def __init__(self, *, name: str, description: str, input_model: type[BaseModel],
                 output_model: type[BaseModel] | None, secret_fields: frozenset[str],
                 rename: Mapping[str, str] | None, in_types: Mapping[str, Any],
                 out_adapter: TypeAdapter[Any] | None, out_expected: str) -> None:
        self.name = name
        self.description = description
        self.input_model = input_model
        self.output_model = output_model
        self.secret_fields = secret_fields
        self._rename = dict(rename) if rename else None  # model field name -> kwarg name
        self._extra_allowed = input_model.model_config.get("extra") == "allow"
        self._accepts = ", ".join(
            f.alias or n for n, f in input_model.model_fields.items()
        ) or "no arguments"
        self._in_types = dict(in_types)
        self._out_adapter = out_adapter
        self._out_expected = out_expected

    def __repr__(self) -> str:
        return f"ToolModels({self.name!r}, accepts: {self._accepts})"

    # -- per call ---------------------------------------------------------------------------

    def validate_input(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Validate the call's arguments; return the kwargs to send to the tool.

        Defaults are filled in, so the trace and the worker see the full call. Raises
        :class:`InputValidationError` naming every bad argument (never a secret's value).
        """
        try:
            instance = self.input_model.model_validate(kwargs)
        except PydanticValidationError as exc:
            error = self.input_error(exc)
        else:
            return self._to_kwargs(instance)
        # Raised outside the except block: pydantic's error (which shows the input values,
        # secrets included) must not ride along as __context__.
        raise error

    def _to_kwargs(self, instance: BaseModel) -> dict[str, Any]:
        if self._rename is None:
            out = dict(instance.__dict__)
        else:
            out = {self._rename[k]: v for k, v in instance.__dict__.items()}
        if self._extra_allowed and instance.__pydantic_extra__:
            out.update(instance.__pydantic_extra__)
        return out

    def validate_output(self, value: Any) -> Any:
        """Validate a tool's return value; return it as its annotation says.

        ``value`` is what crossed the process boundary: data (``failcore._values``), in
        which a dataclass or model is a dict, a named tuple a tuple and an enum its value.
        This is where the *declared* type is rebuilt: a tool annotated ``-> Model`` (or
        registered with ``output_model=Model``) gets a ``Model`` instance back. Without an
        output model the data passes through unchanged. Raises :class:`OutputValidationError` naming the
        tool, the expected and the actual type (never the value: outputs may be sensitive).
        """
        if self._out_adapter is None:
            return value
        try:
            return self._out_adapter.validate_python(value)
        except PydanticValidationError as exc:
            error = self._output_error(exc, value)
        raise error  # outside the except block: no __context__ carrying the value

    def _output_error(self, exc: PydanticValidationError, value: Any) -> OutputValidationError:
        parts = []
        errors: list[dict[str, object]] = []
        for err in exc.errors(include_url=False, include_input=False):
            loc = _dotted(err["loc"])
            errors.append({"loc": loc, "msg": err["msg"], "type": err["type"]})
            parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
        message = (
            f"{self.name} returned {type(value).__qualname__}, expected "
            f"{self._out_expected}: {'; '.join(parts)}. Fix the tool or its return annotation"
        )
        if any(e["type"] in _INSTANCE_ONLY for e in errors):
            message += (". Results cross the process boundary as data, so a model with "
                        "strict=True receives its dataclass and enum fields as dicts and "
                        "values: make those fields lax (Field(strict=False)) or the model")
        return OutputValidationError(message, errors=errors)

    def redact(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Arguments as the trace may hold them: secrets replaced by ``"<secret>"``, all JSON-able.

        Never raises: see ``failcore._trace_encoding.to_jsonable`` (the trace's one encoding).
        """
        shown = {k: (REDACTED if k in self.secret_fields else v) for k, v in kwargs.items()}
        return typing.cast(dict[str, Any], to_jsonable(shown))

    def output_to_json(self, value: Any) -> Any:
        """A validated result in JSON form, for the trace (the inverse of ``output_from_json``)."""
        if self._out_adapter is None:
            return to_jsonable(value)
        try:
            return from_json(self._out_adapter.dump_json(value, fallback=repr))
        except Exception:  # a value that escaped validation: the trace must still be writable
            return to_jsonable(value)

    def output_from_json(self, data: Any) -> Any:
        """Rebuild a result from its recorded JSON (replay). Without an output model, the
        plain data the trace holds, with its ``$bytes``/``$int`` tags turned back."""
        if self._out_adapter is None:
            return from_jsonable(data)
        # JSON-mode validation: dates from strings, bytes from base64, tuples from lists.
        return self._out_adapter.validate_json(to_json(data))

    # -- errors -----------------------------------------------------------------------------

    def input_error(self, exc: PydanticValidationError) -> InputValidationError:
        """The error :meth:`validate_input` raises for ``exc`` (a failed validation of
        ``input_model``): every bad argument named, a secret argument's value never shown.
        Integrations whose framework validates with the same model word its errors so."""
        parts: list[str] = []
        errors: list[dict[str, object]] = []
        unexpected: list[str] = []
        for err in exc.errors(include_url=False):
            loc, kind, msg = err["loc"], err["type"], err["msg"]
            top = str(loc[0]) if loc else ""
            secret = top in self.secret_fields
            if secret and "input" in err and _leaks(msg, err["input"]):
                msg = f"invalid value ({kind})"
            dotted = _dotted(loc)
            errors.append({"loc": dotted, "msg": msg, "type": kind})
            if kind == "extra_forbidden" and len(loc) == 1:
                unexpected.append(top)
            elif kind == "missing" and len(loc) == 1:
                expected = self._in_types.get(top)
                hint = f" (expected {type_name(expected)})" if expected is not None else ""
                parts.append(f"missing required argument '{top}'{hint}")
            else:
                where = f"argument '{dotted}'" if dotted else "arguments"
                got = ""
                if "input" in err:
                    value = err["input"]
                    shown = "" if secret else f" {_short.repr(value)}"
                    got = f" (got {type(value).__qualname__}{shown})"
                parts.append(f"{where}: {msg}{got}")
        if unexpected:
            names = ", ".join(f"'{u}'" for u in unexpected)
            noun = "argument" if len(unexpected) == 1 else "arguments"
            parts.insert(0, f"unexpected {noun} {names}; {self.name} accepts: {self._accepts}")
        return InputValidationError(f"{self.name}: {'; '.join(parts)}", errors=errors)


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _leaks(msg: str, value: object) -> bool:
    text = value if isinstance(value, str) else repr(value)
    return bool(text) and text in msg


# -- registration ----------------------------------------------------------------------------


def build_models(name: str, fn: Callable[..., Any], *, input_model: type[BaseModel] | None = None,
                 output_model: type[BaseModel] | None = None, secret: Iterable[str] = (),
                 description: str | None = None) -> ToolModels:
    """Build a tool's validators once, at registration.

    Input: derived from ``fn``'s signature (annotations and defaults; unannotated means
    ``Any``; unknown arguments refused) unless ``input_model`` is given. Output: a model with
    one field ``result`` typed by the return annotation, ``output_model`` as given, or none
    when neither exists. Raises :class:`RegistrationError` for signatures a keyword-only call
    cannot satisfy (``*args``, positional-only parameters, ``**kwargs`` without an input
    model), unknown ``secret`` names, and annotations pydantic cannot validate.
    """
    if not callable(fn):
        raise RegistrationError(f"{name}: the tool must be callable, got {type(fn).__qualname__}")
    try:
        sig = inspect.signature(fn, eval_str=True)
    except (NameError, TypeError, ValueError, SyntaxError) as exc:
        raise RegistrationError(
            f"{name}: cannot read the signature of {fn!r}: {exc}. Make every annotation "
            f"resolvable at module level, or pass input_model= and output_model="
        ) from exc
    params = list(sig.parameters.values())
    for p in params:
        if p.kind is p.VAR_POSITIONAL or p.kind is p.POSITIONAL_ONLY:
            kind = "*args" if p.kind is p.VAR_POSITIONAL else "positional-only"
            raise RegistrationError(
                f"{name}: parameter '{p.name}' is {kind}, but tools are called with keyword "
                f"arguments only; make it a regular or keyword-only parameter"
            )
    secret_names = set(secret)
    if input_model is None:
        if any(p.kind is p.VAR_KEYWORD for p in params):
            raise RegistrationError(
                f"{name}: **kwargs cannot be validated; list the parameters explicitly or "
                f"pass input_model= describing what the tool accepts"
            )
        model, rename, in_types, marked = _derive_input(name, params)
    else:
        model, in_types, marked = _explicit_input(name, input_model, params)
        rename = None
    unknown = secret_names - set(in_types)
    if unknown:
        raise RegistrationError(
            f"{name}: secret={sorted(unknown)} names no argument; arguments are: "
            f"{', '.join(in_types) or 'none'}"
        )
    secret_fields = frozenset(marked | secret_names)
    if input_model is not None:  # secrets may arrive under a field's alias too
        secret_fields |= {f.alias for n, f in model.model_fields.items()
                          if n in secret_fields and f.alias}
    out_model, adapter, expected = _output(name, sig.return_annotation, output_model)
    return ToolModels(
        name=name,
        description=description if description is not None else _first_paragraph(fn.__doc__),
        input_model=model, output_model=out_model, secret_fields=secret_fields, rename=rename,
        in_types=in_types, out_adapter=adapter, out_expected=expected,
    )


def _derive_input(name: str, params: list[inspect.Parameter]
                  ) -> tuple[type[BaseModel], dict[str, str] | None, dict[str, Any], set[str]]:
    fields: dict[str, Any] = {}
    rename: dict[str, str] = {}
    in_types: dict[str, Any] = {}
    marked: set[str] = set()
    taken = {p.name for p in params}
    for i, p in enumerate(params):
        ann = Any if p.annotation is inspect.Parameter.empty else p.annotation
        in_types[p.name] = ann
        if has_secret(ann):
            marked.add(p.name)
        default = ... if p.default is inspect.Parameter.empty else p.default
        field_name = p.name
        if p.name.startswith("_") or hasattr(BaseModel, p.name):
            # pydantic reserves these names; keep the argument name as the alias.
            field_name = f"arg{i}"
            while field_name in taken:
                field_name += "_"
            taken.add(field_name)
            ann = Annotated[tighten(ann), Field(alias=p.name)]
            rename[field_name] = p.name
        else:
            ann = tighten(ann)
        fields[field_name] = (ann, default)
    try:
        model = create_model(f"{name}_input", __config__=_DERIVED_CONFIG, **fields)
    except Exception as exc:
        raise RegistrationError(
            f"{name}: cannot build an input model from the signature: {exc}. Use JSON-able "
            f"annotations (str, int, list[...], pydantic models, ...) or pass input_model="
        ) from exc
    if rename:
        rename.update({f: f for f in model.model_fields if f not in rename})
    return model, (rename or None), in_types, marked


def _explicit_input(name: str, model: type[BaseModel], params: list[inspect.Parameter]
                    ) -> tuple[type[BaseModel], dict[str, Any], set[str]]:
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise RegistrationError(
            f"{name}: input_model must be a pydantic BaseModel subclass, got {model!r}"
        )
    fields = model.model_fields
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        accepted = {p.name for p in params}
        required = {p.name for p in params if p.default is inspect.Parameter.empty}
        extra = set(fields) - accepted
        absent = required - set(fields)
        if extra or absent:
            raise RegistrationError(
                f"{name}: input_model {model.__name__} does not match the function: "
                f"fields the function does not accept: {sorted(extra)}; required parameters "
                f"the model lacks: {sorted(absent)}"
            )
    if model.model_config.get("extra") != "allow":
        # Unknown arguments are refused even if the user's model would ignore them.
        config = ConfigDict(**{**model.model_config, "extra": "forbid"})
        model = types.new_class(model.__name__, (model,), {},
                                lambda ns: ns.update({"model_config": config,
                                                      "__module__": model.__module__}))
    marked = {n for n, f in fields.items() if any(is_secret_marker(m) for m in f.metadata)}
    return model, {n: f.annotation for n, f in fields.items()}, marked


def _output(name: str, annotation: Any, explicit: type[BaseModel] | None
            ) -> tuple[type[BaseModel] | None, TypeAdapter[Any] | None, str]:
    if explicit is not None:
        if not (isinstance(explicit, type) and issubclass(explicit, BaseModel)):
            raise RegistrationError(
                f"{name}: output_model must be a pydantic BaseModel subclass, got {explicit!r}"
            )
        return explicit, TypeAdapter(explicit), explicit.__name__
    if annotation is inspect.Signature.empty:
        return None, None, ""
    tight = tighten(annotation)
    try:
        model = create_model(f"{name}_output", __config__=_DERIVED_CONFIG, result=(tight, ...))
        adapter = _adapter(tight)
    except Exception as exc:
        raise RegistrationError(
            f"{name}: cannot validate the return annotation {type_name(annotation)}: {exc}. "
            f"Annotate with a JSON-able type or pass output_model="
        ) from exc
    return model, adapter, type_name(annotation)


def _adapter(tp: Any) -> TypeAdapter[Any]:
    try:
        return TypeAdapter(tp, config=_RESULT_CONFIG)
    except PydanticUserError:  # models and dataclasses bring their own config
        return TypeAdapter(tp)
