"""Read a worker's reply as data: bounded, linear, and never a program.

A worker runs code we do not trust, so every byte it sends is hostile until checked. A
reply frame is UTF-8 JSON text ``[kind, body]``, optionally followed by a NUL and the raw
bytes of the ``bytes``/``bytearray`` values it holds (``failcore_worker._values`` defines
the vocabulary and writes it). Decoding, step by step, each bounded:

1. The frame is at most ``output_bytes`` + the envelope (the reader checked the header
   before reading it).
2. Before parsing, :func:`failcore_worker._data_cost.decode_cost` bounds what the parse
   can hold; above ``DECODE_MULTIPLE`` x the frame limit the reply is refused unparsed
   (:class:`ReplyTooLarge`). The C ``json`` scanner is linear in the text. (The warm
   path's small reply, at most 4 KiB with no blob and no ``$``, skips this: it cannot
   cost more than the smallest budget, and it holds no tags.)
3. Tags become values through a fixed table of standard types (bytes, tuple, set, dict
   with any keys, datetime, Decimal, UUID, paths, IP addresses, ...). No class named by
   the worker is ever looked up, so no constructor of the worker's choosing runs here;
   the session then builds the tool's *declared* return type with pydantic. Every
   expansion (a set from a list, a blob copied out of the frame) is charged against what
   is left of the budget, and sets and non-``str``-keyed dicts are refused when many of
   their keys share one hash (a deterministic hash flood would make building them
   quadratic).

Anything malformed raises :class:`BadReply` (the frame is not a reply: the worker broke
the protocol) or :class:`BadValue` (a well-formed reply whose value is not valid data).
"""

from __future__ import annotations

import collections
import datetime
import decimal
import ipaddress
import math
import pathlib
import uuid
from collections.abc import Callable
from typing import Any

from failcore_worker import _values as tags
from failcore_worker import protocol
from failcore_worker._data_cost import DECODE_MULTIPLE, SMALL, decode_budget, decode_cost

__all__ = ["BadReply", "BadValue", "ReplyTooLarge", "decode_reply"]

# Keys sharing one hash beyond this many make a set or dict refuse to be built.
_MAX_SAME_HASH = 32
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class BadReply(Exception):
    """The frame is not a reply a worker may send (not JSON, wrong shape, bad blob tail)."""


class BadValue(BadReply):
    """The reply is well formed, but its value is not valid data (an unknown or malformed tag)."""


class ReplyTooLarge(Exception):
    """Decoding the reply could cost more memory than its output limit allows; not decoded
    (or, when its tags expand past what is left of the budget, decoding was abandoned)."""

    def __init__(self, cost: int, budget: int) -> None:
        super().__init__(f"decoding it could take {cost} bytes or more, more than {budget} "
                         f"({DECODE_MULTIPLE} x the frame limit)")
        self.cost = cost
        self.budget = budget


class _Untag:
    """The ``object_hook``: called by the parser for every JSON object, innermost first."""

    __slots__ = ("budget", "left", "tail", "cursor", "handlers")

    def __init__(self, budget: int, left: int, tail: memoryview | None) -> None:
        self.budget = budget
        self.left = left
        self.tail = tail
        self.cursor = 0
        self.handlers: dict[str, Callable[[Any], Any]] = {
            tags.TAG_FLOAT: self.float_, tags.TAG_BYTES: self.bytes_,
            tags.TAG_BYTEARRAY: self.bytearray_, tags.TAG_TUPLE: self.tuple_,
            tags.TAG_SET: self.set_, tags.TAG_FROZENSET: self.frozenset_,
            tags.TAG_DICT: self.dict_,
            tags.TAG_DATETIME: self.iso(tags.TAG_DATETIME, datetime.datetime),
            tags.TAG_DATE: self.iso(tags.TAG_DATE, datetime.date),
            tags.TAG_TIME: self.iso(tags.TAG_TIME, datetime.time),
            tags.TAG_TIMEDELTA: self.timedelta_,
            tags.TAG_DECIMAL: self.text(tags.TAG_DECIMAL, decimal.Decimal, None),
            tags.TAG_UUID: self.text(tags.TAG_UUID, uuid.UUID),
            tags.TAG_PATH: self.text(tags.TAG_PATH, pathlib.Path, None),
            tags.TAG_PUREPOSIXPATH: self.text(tags.TAG_PUREPOSIXPATH, pathlib.PurePosixPath, None),
            tags.TAG_PUREWINDOWSPATH: self.text(tags.TAG_PUREWINDOWSPATH, pathlib.PureWindowsPath,
                                                None),
            tags.TAG_IP: self.text(tags.TAG_IP, ipaddress.ip_address),
            tags.TAG_IPNETWORK: self.text(tags.TAG_IPNETWORK, ipaddress.ip_network),
            tags.TAG_IPINTERFACE: self.text(tags.TAG_IPINTERFACE, ipaddress.ip_interface),
            tags.TAG_COMPLEX: self.complex_,
        }

    def __call__(self, obj: dict[str, Any]) -> Any:
        if len(obj) != 1:
            return obj
        (key, payload), = obj.items()
        if key[:1] != "$":
            return obj
        handler = self.handlers.get(key)
        if handler is None:
            raise BadValue(f"unknown tag {key[:40]!r}")
        return handler(payload)

    def spend(self, tag: str, units: int = 0) -> None:
        """Charge what rebuilding ``tag`` costs: the worker counted the same amounts."""
        self.left -= tags.expansion(tag, units)
        if self.left < 0:
            raise ReplyTooLarge(self.budget - self.left, self.budget)

    # -- the tags ----------------------------------------------------------------------------

    def float_(self, name: Any) -> float:
        if not isinstance(name, str) or name not in _FLOATS:
            raise BadValue(f"bad {tags.TAG_FLOAT} value")
        self.spend(tags.TAG_FLOAT)
        return _FLOATS[name]

    def blob(self, tag: str, n: Any) -> memoryview:
        if type(n) is not int or n < 0:
            raise BadValue(f"bad {tag} length")
        if self.tail is None or self.cursor + n > len(self.tail):
            raise BadValue(f"a {tag} tag points past the blob tail")
        self.spend(tag, n)
        start = self.cursor
        self.cursor += n
        return self.tail[start:self.cursor]

    def bytes_(self, n: Any) -> bytes:
        return bytes(self.blob(tags.TAG_BYTES, n))

    def bytearray_(self, n: Any) -> bytearray:
        return bytearray(self.blob(tags.TAG_BYTEARRAY, n))

    def items(self, payload: Any, tag: str) -> list[Any]:
        if type(payload) is not list:
            raise BadValue(f"bad {tag} payload")
        self.spend(tag, len(payload))
        return payload

    def tuple_(self, payload: Any) -> tuple[Any, ...]:
        return tuple(self.items(payload, tags.TAG_TUPLE))

    def set_(self, payload: Any) -> set[Any]:
        return set(_unflooded(self.items(payload, tags.TAG_SET)))

    def frozenset_(self, payload: Any) -> frozenset[Any]:
        return frozenset(_unflooded(self.items(payload, tags.TAG_FROZENSET)))

    def dict_(self, payload: Any) -> dict[Any, Any]:
        pairs = self.items(payload, tags.TAG_DICT)
        if not all(type(p) is list and len(p) == 2 for p in pairs):
            raise BadValue(f"bad {tags.TAG_DICT} payload: expected [key, value] pairs")
        return dict(_unflooded(pairs, key=lambda p: p[0]))

    def iso(self, tag: str, kind: type[datetime.date] | type[datetime.time]
            ) -> Callable[[Any], Any]:
        def build(text: Any) -> Any:
            if not isinstance(text, str) or len(text) > 64:
                raise BadValue(f"bad {tag} payload")
            self.spend(tag, len(text))
            return kind.fromisoformat(text)
        return build

    def timedelta_(self, payload: Any) -> datetime.timedelta:
        if not (type(payload) is list and len(payload) == 3
                and all(type(x) is int for x in payload)):
            raise BadValue(f"bad {tags.TAG_TIMEDELTA} payload")
        self.spend(tags.TAG_TIMEDELTA)
        return datetime.timedelta(days=payload[0], seconds=payload[1], microseconds=payload[2])

    def text(self, tag: str, build: Callable[[str], Any], longest: int | None = 128
             ) -> Callable[[Any], Any]:
        def parse(text: Any) -> Any:
            if not isinstance(text, str) or (longest is not None and len(text) > longest):
                raise BadValue(f"bad {tag} payload")
            self.spend(tag, len(text))
            return build(text)
        return parse

    def complex_(self, payload: Any) -> complex:
        if not (type(payload) is list and len(payload) == 2
                and all(type(x) in (int, float) for x in payload)):
            raise BadValue(f"bad {tags.TAG_COMPLEX} payload")
        self.spend(tags.TAG_COMPLEX)
        return complex(payload[0], payload[1])


def _unflooded(items: list[Any], key: Callable[[Any], Any] | None = None) -> list[Any]:
    """``items``, after checking that no more than ``_MAX_SAME_HASH`` of them share a hash.

    ``str`` hashes are randomised per process, but int, float, tuple, Decimal... hashes are
    not: a worker can send thousands of distinct keys with one hash, and inserting them
    costs O(n^2). The hashes themselves are ints below 2**61, which hash to themselves, so
    counting them cannot be flooded. Unhashable keys raise :class:`BadValue`.
    """
    if len(items) <= _MAX_SAME_HASH:
        return items
    try:
        counts = collections.Counter(hash(k) for k in (map(key, items) if key else items))
    except TypeError as exc:
        raise BadValue(f"a set element or dict key is not hashable: {exc}") from None
    if max(counts.values()) > _MAX_SAME_HASH:
        raise BadValue("a set or dict whose keys share one hash (hash flooding)")
    return items


def decode_reply(frame: bytes | bytearray, frame_limit: int) -> tuple[str, dict[str, Any]]:
    """``(kind, body)`` of a reply frame (the payload after the header), values rebuilt.

    ``frame_limit`` is what the reader allowed (``output_bytes`` + the envelope); the
    decoded reply may cost at most ``DECODE_MULTIPLE`` times that. Raises
    :class:`ReplyTooLarge`, :class:`BadReply` or :class:`BadValue`.
    """
    cut = frame.find(0)
    # The common small reply: no blobs (no NUL), no tags (no "$" at all: a tag is an object
    # whose only key starts with "$"), within every budget (SMALL bytes cost at most 1 MiB).
    if cut < 0 and len(frame) <= SMALL and 36 not in frame:
        try:
            kind, body = protocol.decode_data(frame)
        except protocol.BadFrame as exc:
            raise BadReply(str(exc)) from None
        except ValueError as exc:  # an int of more than 4300 digits
            raise BadValue(f"{type(exc).__name__}: {exc}") from None
    else:
        kind, body = _decode_with_tags(frame, frame_limit, cut)
    if kind != "result" and kind != "error":
        raise BadReply(f"unknown reply kind {kind[:40]!r}")
    events = body.get("events")
    if events:
        _check_events(events)
    return kind, body


def _decode_with_tags(frame: bytes | bytearray, frame_limit: int, cut: int
                      ) -> tuple[str, dict[str, Any]]:
    budget = decode_budget(frame_limit)
    cost = decode_cost(frame, None if cut < 0 else cut)
    if cost > budget:
        raise ReplyTooLarge(cost, budget)
    if cut < 0:
        text: bytes | bytearray | str = frame
        tail = None
    else:
        view = memoryview(frame)
        try:
            text = str(view[:cut], "utf-8", "surrogatepass")
        except UnicodeDecodeError as exc:
            raise BadReply(f"not UTF-8: {exc}") from None
        tail = view[cut + 1:]
    hook = _Untag(budget, budget - cost, tail)
    try:
        kind, body = protocol.decode_data(text, hook)
    except protocol.BadFrame as exc:
        raise BadReply(str(exc)) from None
    except (ValueError, TypeError, OverflowError, ArithmeticError) as exc:
        # A tag's payload that its type refused (a bad date, an address, a huge number).
        raise BadValue(f"{type(exc).__name__}: {exc}") from None
    if tail is not None and hook.cursor != len(tail):
        raise BadReply(f"{len(tail) - hook.cursor} bytes after the last blob")
    return kind, body


def _check_events(events: Any) -> None:
    """Guard events are a list of flat records (the session reads and re-judges them).
    The other fields need no check: ``retire`` counts only when it is ``True``, an error's
    fields are read through ``str()``."""
    if type(events) is not list:
        raise BadReply("field 'events' of a reply is not a list")
    for event in events:
        if type(event) is not dict or not all(
                type(v) in _EVENT_TYPES or (type(v) is list and all(type(x) is str for x in v))
                for v in event.values()):
            raise BadReply("a guard event that is not a flat record")


_EVENT_TYPES = frozenset({str, int, float, bool, type(None)})
