"""Canonical JSON for trace records, and the deterministic conversion of arbitrary values.

The trace writer is on the hot path of every call, so the common case (a body that is
already JSON-native, with str keys) is detected with one bounded walk and encoded
directly; anything else goes through ``to_jsonable``, which never raises, so a tool
returning an odd object can never make the trace writer crash its caller.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import json
import math
import pathlib
import re
import uuid
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

VOLATILE_FIELDS = frozenset({"t", "prev"})
VOLATILE_BODY_KEYS = frozenset({"duration_ms", "pid", "exitcode"})
_MAX_DEPTH = 64

ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)
_ENCODER = ENCODER
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def canonical_line(rec: Mapping[str, Any]) -> bytes:
    """The canonical encoding of a JSON-native record, without the newline."""
    return _ENCODER.encode(rec).encode("utf-8")


_SCALARS = frozenset({str, int, bool, type(None)})
_PLAIN_NODE_LIMIT = 10_000


def _is_plain(obj: Any) -> bool:
    """True when ``obj`` is already JSON-native with str keys (the common, fast case).

    Iterative and bounded, so a cyclic or huge structure is handed to ``to_jsonable``.
    """
    stack = [obj]
    pop, extend = stack.pop, stack.extend
    nodes = 0
    while stack:
        o = pop()
        t = type(o)
        if t in _SCALARS:
            continue
        nodes += 1
        if nodes > _PLAIN_NODE_LIMIT:
            return False
        if t is dict:
            for k in o:
                if type(k) is not str:
                    return False
            extend(o.values())
        elif t is list:
            extend(o)
        elif t is not float or not math.isfinite(o):
            return False
    return True


def clean_str(s: str) -> str:
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:  # lone surrogates: replace them, keep valid pairs
        return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _key(k: Any) -> str:
    if isinstance(k, enum.Enum):
        k = k.value
    if isinstance(k, str):
        return clean_str(str(k))
    if k is None or isinstance(k, bool | int | float):
        return _ENCODER.encode(to_jsonable(k)).strip('"')
    value = to_jsonable(k)
    return value if isinstance(value, str) else _ENCODER.encode(value)


def _safe_repr(obj: Any) -> str:
    try:
        text = repr(obj)
    except Exception:  # a broken __repr__ must not break the caller
        text = f"<unrepresentable {type(obj).__qualname__}>"
    # Default reprs carry a memory address, which differs between runs.
    return clean_str(_ADDRESS.sub("", text))


def from_jsonable(value: Any) -> Any:
    """Undo the tags ``to_jsonable`` writes for what JSON cannot say (``{"$bytes": b64}``,
    ``{"$int": hex}``); everything else is returned as the trace holds it."""
    if isinstance(value, dict):
        if len(value) == 1:
            (key, inner), = value.items()
            if key == "$bytes" and isinstance(inner, str):
                try:
                    return base64.b64decode(inner, validate=True)
                except ValueError:
                    return value
            if key == "$int" and isinstance(inner, str):
                try:
                    return int(inner, 16)
                except ValueError:
                    return value
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    return value


def to_jsonable(value: Any, _depth: int = 0) -> Any:
    """Convert ``value`` to JSON-native data, deterministically and without ever raising.

    bytes -> ``{"$bytes": base64}``; NaN/inf -> ``"NaN"``/``"Infinity"``/``"-Infinity"``;
    tuples -> lists; sets -> lists sorted by canonical encoding; dataclasses and pydantic
    models -> objects; enums -> their value; datetimes -> ISO 8601; paths, UUIDs,
    decimals -> strings; non-str keys -> strings; anything else -> its repr with memory
    addresses removed. Nesting deeper than 64 levels (or a cycle) becomes ``"<too deep>"``.
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, enum.Enum):
        return to_jsonable(value.value, _depth + 1)
    if isinstance(value, str):
        return clean_str(str(value))
    if isinstance(value, int):
        return int(value) if value.bit_length() < 13000 else {"$int": hex(value)}
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return float(value)
    if _depth > _MAX_DEPTH:
        return "<too deep>"
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        return {_key(k): to_jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v, _depth + 1) for v in value]
    if isinstance(value, set | frozenset):
        items = [to_jsonable(v, _depth + 1) for v in value]
        return sorted(items, key=_ENCODER.encode)
    if isinstance(value, BaseModel):
        try:
            return to_jsonable(value.model_dump(mode="json"), _depth + 1)
        except Exception:
            return _safe_repr(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}
        return to_jsonable(fields, _depth + 1)
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal | uuid.UUID | pathlib.PurePath):
        return clean_str(str(value))
    return _safe_repr(value)


def encode_body(body: Any, plain: bool = False) -> tuple[bytes, dict[str, Any]]:
    """The canonical bytes of ``body``; ``plain=True`` is the caller's promise that the
    body is already JSON-native with str keys (skips the ~4 us structure check)."""
    if plain and type(body) is dict:
        try:
            return _ENCODER.encode(body).encode("utf-8"), body
        except (ValueError, TypeError, UnicodeEncodeError, RecursionError, OverflowError):
            pass
    if type(body) is not dict or not _is_plain(body):
        body = to_jsonable(body)
        if not isinstance(body, dict):
            body = {"value": body}
    try:
        return _ENCODER.encode(body).encode("utf-8"), body
    except (ValueError, TypeError, UnicodeEncodeError, RecursionError):
        body = to_jsonable(body)  # e.g. lone surrogates or a huge int: clean and retry
        return _ENCODER.encode(body).encode("utf-8"), body


def strip_volatile(record: Mapping[str, Any]) -> dict[str, Any]:
    """``record`` without the fields that differ between two runs of the same calls.

    Drops ``t`` and ``prev`` and, anywhere inside ``body``, keys named ``duration_ms``,
    ``pid`` and ``exitcode``.
    """

    def strip(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: strip(v) for k, v in value.items() if k not in VOLATILE_BODY_KEYS}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    out = {k: v for k, v in record.items() if k not in VOLATILE_FIELDS}
    if "body" in out:
        out["body"] = strip(out["body"])
    return out
