"""Parent-side decoding of worker messages with a restricted unpickler.

A worker runs untrusted code, so its replies are untrusted bytes. Plain
``pickle.loads`` on them would let a tool run code in the parent (any callable can be
named in a pickle). The parent therefore only resolves *classes* from an allow-list:
builtin data types, a few standard value types, and classes that declare themselves
data (dataclasses, enums, pydantic models, exceptions). Functions are never resolved,
so ``os.system``, ``eval`` and friends cannot be reached through a reply.
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import importlib
import io
import pickle
import sys
from typing import Any

from failcore_worker import protocol

_BUILTIN_TYPES = frozenset({
    "dict", "list", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float",
    "complex", "bool", "slice", "range", "object", "NoneType", "Ellipsis", "NotImplemented",
})
_SAFE = frozenset({
    ("collections", "OrderedDict"), ("collections", "deque"), ("collections", "Counter"),
    ("datetime", "datetime"), ("datetime", "date"), ("datetime", "time"),
    ("datetime", "timedelta"), ("datetime", "timezone"), ("decimal", "Decimal"),
    ("fractions", "Fraction"), ("uuid", "UUID"), ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"), ("pathlib", "Path"), ("ipaddress", "IPv4Address"),
    ("ipaddress", "IPv6Address"), ("ipaddress", "IPv4Network"), ("ipaddress", "IPv6Network"),
    ("copyreg", "_reconstructor"),
})


def _is_data_class(obj: Any) -> bool:
    if not isinstance(obj, type):
        return False
    if dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum | BaseException):
        return True
    pydantic = sys.modules.get("pydantic")
    return pydantic is not None and issubclass(obj, pydantic.BaseModel)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _BUILTIN_TYPES:
            return getattr(builtins, name)
        if (module, name) in _SAFE:
            return getattr(importlib.import_module(module), name)
        mod = sys.modules.get(module)
        obj = getattr(mod, name, None) if mod is not None and "." not in name else None
        if obj is not None and _is_data_class(obj) and module not in ("os", "subprocess", "builtins"):
            return obj
        raise pickle.UnpicklingError(
            f"refused to load {module}.{name} from a worker reply: only data types cross the "
            "boundary (builtins, dataclasses, enums, pydantic models, exceptions of modules "
            "the parent has imported)"
        )


def decode(payload: bytes | bytearray) -> tuple[str, dict[str, Any]]:
    kind, body = _RestrictedUnpickler(io.BytesIO(payload)).load()
    if not isinstance(kind, str) or not isinstance(body, dict):
        raise pickle.UnpicklingError("malformed worker reply")
    return kind, body


__all__ = ["decode", "protocol"]
