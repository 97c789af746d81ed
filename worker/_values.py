"""A tool's return value as data: what the worker sends back instead of a pickle.

Why: a worker runs code we do not trust, so its reply is untrusted bytes. A pickle is a
program for pickle's VM (a 40-byte one allocated 2 GiB in the parent; another kept it
busy for seconds), so replies are data: JSON whose decoding is linear in its size and
whose cost the parent bounds before it decodes (``failcore_worker._data_cost``), plus
the raw bytes of ``bytes``/``bytearray`` values appended after the JSON text.

The vocabulary, the one definition both sides use (the parent decodes in
``failcore._values``):

- plain JSON: ``None``, ``bool``, ``int``, finite ``float``, ``str``, ``list``, and
  ``dict`` with ``str`` keys;
- a tag: a JSON object with exactly one key, which starts with ``$`` (``TAGS``). A dict
  that would look like one (a single key starting with ``$``) or that has non-``str``
  keys is sent as ``{"$dict": [[key, value], ...]}``, so plain data is never mistaken
  for a tag;
- ``{"$bytes": n}`` / ``{"$bytearray": n}``: the next ``n`` bytes of the blob tail, in
  the order the tags appear in the JSON text.

What is sent for each natural return type: tuples, named tuples (``collections`` and
``typing``) -> ``$tuple``; sets -> ``$set`` / ``$frozenset``; dataclasses (frozen,
slots) -> a dict of their fields; pydantic models (duck-typed: the worker never imports
pydantic) -> ``model_dump(by_alias=True)``; TypedDicts are dicts; enums -> their value;
NaN and infinities, ``datetime``/``date``/``time``/``timedelta`` (the UTC offset is
kept, a zone's name is not), ``Decimal``, ``UUID``, paths, IP addresses, networks and
interfaces, ``complex`` -> their own tags. Subclasses of ``str``/``int``/``float``/
``list``/``dict`` and ``collections.deque`` become the plain type. The parent rebuilds
only its *own* declared return type from this (pydantic); no class the worker names is
ever looked up. Anything else is :class:`NotData`, which names the type and where it is.

Standard library only, and the standard types are recognised through ``sys.modules``:
a value can only be a ``UUID`` if the tool imported ``uuid``, so the worker imports
none of them.
"""

from __future__ import annotations

import math
import sys
from typing import Any

TAG_FLOAT = "$float"
TAG_BYTES = "$bytes"
TAG_BYTEARRAY = "$bytearray"
TAG_TUPLE = "$tuple"
TAG_SET = "$set"
TAG_FROZENSET = "$frozenset"
TAG_DICT = "$dict"
TAG_DATETIME = "$datetime"
TAG_DATE = "$date"
TAG_TIME = "$time"
TAG_TIMEDELTA = "$timedelta"
TAG_DECIMAL = "$decimal"
TAG_UUID = "$uuid"
TAG_PATH = "$path"
TAG_PUREPOSIXPATH = "$pureposixpath"
TAG_PUREWINDOWSPATH = "$purewindowspath"
TAG_IP = "$ip"
TAG_IPNETWORK = "$ipnetwork"
TAG_IPINTERFACE = "$ipinterface"
TAG_COMPLEX = "$complex"
TAGS = frozenset({
    TAG_FLOAT, TAG_BYTES, TAG_BYTEARRAY, TAG_TUPLE, TAG_SET, TAG_FROZENSET, TAG_DICT,
    TAG_DATETIME, TAG_DATE, TAG_TIME, TAG_TIMEDELTA, TAG_DECIMAL, TAG_UUID, TAG_PATH,
    TAG_PUREPOSIXPATH, TAG_PUREWINDOWSPATH, TAG_IP, TAG_IPNETWORK, TAG_IPINTERFACE,
    TAG_COMPLEX,
})

# What the parent allocates to rebuild one tag's value, as (fixed, per unit) bytes; units
# are items for containers, bytes for blobs, characters for text payloads, none for the
# other tags. The worker adds these up while encoding and the parent charges the same
# amounts while decoding (see ``failcore_worker._data_cost``), so an honest reply never
# exceeds the parent's budget unannounced. A set's or a dict's items include the parent's
# hash-flood check (a count of their hashes). Checked against tracemalloc in the tests.
_EXPANSION: dict[str, tuple[int, int]] = {
    TAG_BYTES: (64, 1), TAG_BYTEARRAY: (96, 1), TAG_TUPLE: (64, 8), TAG_SET: (256, 256),
    TAG_FROZENSET: (256, 256), TAG_DICT: (256, 224), TAG_DECIMAL: (128, 1),
    TAG_PATH: (256, 48), TAG_PUREPOSIXPATH: (256, 48), TAG_PUREWINDOWSPATH: (256, 48),
}
_SCALAR_EXPANSION = 128


def expansion(tag: str, units: int) -> int:
    """Bytes the parent may allocate rebuilding one ``tag`` whose payload has ``units``."""
    fixed, per_unit = _EXPANSION.get(tag, (_SCALAR_EXPANSION, 0))
    return fixed + per_unit * units


# Deeper than this is refused: the parent's JSON parser recurses once per level.
MAX_DEPTH = 100
# json (both sides) refuses ints of more digits than sys.int_max_str_digits (4300).
_INT_BITS = 14_000

SUPPORTED = (
    "None, bool, int, float, str, bytes, bytearray, list, tuple, set, frozenset, dict, "
    "named tuples, TypedDicts, dataclasses, enums, pydantic models, datetime, date, time, "
    "timedelta, Decimal, UUID, pathlib paths, ipaddress addresses/networks/interfaces, complex"
)


class NotData(Exception):
    """The value holds something that cannot cross the process boundary as data."""

    def __init__(self, type_name: str, where: str, why: str = "") -> None:
        self.type_name = type_name
        self.where = where
        self.why = why
        super().__init__(type_name)

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        why = f" ({self.why})" if self.why else ""
        at = "" if self.where == "result" else f" at {self.where}"
        return f"an object of type {self.type_name}{at}{why}"


class TooLarge(Exception):
    """The encoded value would exceed the output limit (found while encoding, before it is built)."""

    def __init__(self, at_least: int, limit: int) -> None:
        self.at_least = at_least
        self.limit = limit
        super().__init__(f"result of at least {at_least} bytes exceeds output_bytes={limit}")


def _type_name(value: object) -> str:
    t = type(value)
    module = getattr(t, "__module__", "")
    name = getattr(t, "__qualname__", t.__name__)
    return name if module in ("builtins", "") else f"{module}.{name}"


class Encoded:
    """A value as data: ``data`` (JSON-able), ``blobs`` (the raw bytes its ``$bytes`` tags
    name, in order) and ``expansion`` (what the parent will spend rebuilding its tags)."""

    __slots__ = ("data", "blobs", "expansion")

    def __init__(self, data: Any, blobs: list[bytes | bytearray], expansion: int) -> None:
        self.data = data
        self.blobs = blobs
        self.expansion = expansion


class _Encoder:
    """One value's walk. ``left`` is what remains of the output limit, counted as a lower
    bound of the encoded size (a string of n characters is at least n bytes), so the walk
    stops as soon as the limit is certainly exceeded, before anything large is built."""

    __slots__ = ("left", "limit", "blobs", "expansion")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit
        self.blobs: list[bytes | bytearray] = []
        self.expansion = 0

    def tag(self, name: str, payload: Any, units: int = 0) -> dict[str, Any]:
        self.expansion += expansion(name, units)
        return {name: payload}

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise TooLarge(self.limit - self.left, self.limit)

    def value(self, v: Any, depth: int, key: bool = False) -> Any:
        """``v`` as data; ``key``: it is a dict key, so it must come back hashable."""
        t = type(v)
        if t is str:
            self.spend(len(v) + 3)
            return v
        if t is int:
            if -(1 << 62) < v < (1 << 62):
                self.left -= 2 + (v.bit_length() * 77 >> 8)  # at least its digits and a comma
                return v
            return self.big_int(v)
        if v is None or t is bool:
            self.left -= 5
            return v
        if t is float:
            self.left -= 4
            if v - v == 0.0:  # finite
                return v
            return self.tag(TAG_FLOAT, "nan" if v != v else ("inf" if v > 0 else "-inf"))
        if depth >= MAX_DEPTH:
            raise NotData(_type_name(v), "", f"nested more than {MAX_DEPTH} levels deep, "
                                             "or it contains itself")
        if t is list:
            return self.sequence(v, depth, key, v)
        if t is dict:
            return self.mapping(v, depth, key, v)
        if t is tuple:
            return self.tag(TAG_TUPLE, self.sequence(v, depth, key), len(v))
        return self.other(v, depth, key)

    def big_int(self, v: int) -> int:
        if v.bit_length() > _INT_BITS:
            raise NotData("int", "", "more than 4300 digits; return it as a str")
        self.spend(v.bit_length() // 4 + 2)
        return v

    def sequence(self, items: Any, depth: int, key: bool, mutable: Any = None) -> Any:
        if key and mutable is not None:
            raise NotData(_type_name(mutable), "", "not hashable, so not usable as a dict key")
        self.spend(2)
        if len(items) > 16 and type(items) in (list, tuple):
            plain = self.plain_scalars(items)
            if plain is not None:
                return plain
        out = []
        i = 0
        try:
            for i, item in enumerate(items):  # noqa: B007 - i names the element on error
                t = type(item)
                if t is str:
                    self.left -= len(item) + 3
                    out.append(item)
                else:
                    out.append(self.value(item, depth + 1, key))
                if self.left < 0:
                    self.spend(0)
        except NotData as exc:
            exc.where = f"[{i}]{exc.where}"
            raise
        return out

    def plain_scalars(self, items: list[Any] | tuple[Any, ...]) -> Any:
        """``items`` itself when it holds only strs, only small ints, or only finite floats
        (the common big results): counted at C speed, sent without a copy. Else None."""
        kinds = set(map(type, items))
        if len(kinds) != 1:
            return None
        kind = kinds.pop()
        if kind is str:
            self.spend(sum(map(len, items)) + 3 * len(items))
        elif kind is int:
            if not -(1 << 62) < min(items) <= max(items) < (1 << 62):
                return None
            self.spend(2 * len(items))
        elif kind is float:
            if not all(map(math.isfinite, items)):
                return None
            self.spend(4 * len(items))
        else:
            return None
        return items

    def mapping(self, v: Any, depth: int, key: bool, original: Any) -> Any:
        if key:
            raise NotData(_type_name(original), "", "not hashable, so not usable as a dict key")
        self.spend(2)
        out: dict[str, Any] = {}
        items = iter(v.items())
        k: Any = None
        try:
            for k, item in items:
                if type(k) is not str:
                    pairs: list[list[Any]] = [[kk, vv] for kk, vv in out.items()]
                    pairs.append([self.value(k, depth + 1, True), self.value(item, depth + 1)])
                    for k, item in items:
                        pairs.append([self.value(k, depth + 1, True), self.value(item, depth + 1)])
                    return self.tag(TAG_DICT, pairs, len(pairs))
                if type(item) is str:
                    self.spend(len(k) + len(item) + 7)
                    out[k] = item
                else:
                    self.spend(len(k) + 4)
                    out[k] = self.value(item, depth + 1)
        except NotData as exc:
            exc.where = f"[{_short_repr(k)}]{exc.where}"
            raise
        if len(out) == 1 and k[:1] == "$":  # would read as a tag: send it unambiguously
            return self.tag(TAG_DICT, [[k, out[k]]], 1)
        return out

    def other(self, v: Any, depth: int, key: bool) -> Any:
        t = type(v)
        if t is bytes or t is bytearray:
            if key and t is bytearray:
                raise NotData("bytearray", "", "not hashable, so not usable as a dict key")
            self.spend(len(v) + 12)
            self.blobs.append(v)
            return self.tag(TAG_BYTES if t is bytes else TAG_BYTEARRAY, len(v), len(v))
        enum = sys.modules.get("enum")
        if enum is not None and isinstance(v, enum.Enum):
            return self.value(v.value, depth + 1, key)
        if isinstance(v, str):
            return self.value(str.__str__(v), depth, key)
        if isinstance(v, int) and not isinstance(v, bool):
            return self.value(int.__int__(v), depth, key)
        if isinstance(v, float):
            return self.value(float.__float__(v), depth, key)
        if isinstance(v, bytes):
            return self.value(bytes(v), depth, key)
        if isinstance(v, bytearray):
            return self.value(bytearray(v), depth, key)
        if isinstance(v, tuple):  # named tuples (collections and typing) and other subclasses
            return self.tag(TAG_TUPLE, self.sequence(v, depth, key), len(v))
        if isinstance(v, frozenset):
            return self.tag(TAG_FROZENSET, self.sequence(v, depth, key), len(v))
        if isinstance(v, set):
            return self.tag(TAG_SET, self.sequence(v, depth, key, v), len(v))
        if isinstance(v, dict):  # OrderedDict, defaultdict, Counter, ...
            return self.mapping(v, depth, key, v)
        if isinstance(v, list):
            return self.sequence(v, depth, key, v)
        if t is complex:
            return self.tag(TAG_COMPLEX, [self.value(v.real, depth + 1),
                                          self.value(v.imag, depth + 1)])
        dataclasses = sys.modules.get("dataclasses")
        if (dataclasses is not None and dataclasses.is_dataclass(v)
                and not isinstance(v, type)):
            record = {f.name: getattr(v, f.name) for f in dataclasses.fields(v)}
            return self.mapping(record, depth, key, v)
        if callable(getattr(t, "model_dump", None)) and hasattr(t, "model_fields"):
            if key:
                raise NotData(_type_name(v), "", "not hashable, so not usable as a dict key")
            try:
                dumped = v.model_dump(by_alias=True)
            except Exception as exc:  # noqa: BLE001 - the model's own code failed
                raise NotData(_type_name(v), "", f"its model_dump() raised "
                                                 f"{type(exc).__name__}: {exc}") from None
            return self.mapping(dumped, depth, False, v)
        tagged = _standard(v)
        if tagged is not None:
            name, payload = tagged
            units = len(payload) if isinstance(payload, str) else 0
            self.spend(16 + units)
            return self.tag(name, payload, units)
        deque = getattr(sys.modules.get("collections"), "deque", None)
        if deque is not None and isinstance(v, deque):
            return self.sequence(v, depth, key, v)
        raise NotData(_type_name(v), "")


def _short_repr(key: object) -> str:
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."


def _standard(v: Any) -> tuple[str, Any] | None:
    """The tag of a standard-library value type, or None (only modules already imported)."""
    mods = sys.modules
    dt = mods.get("datetime")
    if dt is not None:
        if isinstance(v, dt.datetime):
            return TAG_DATETIME, v.isoformat()
        if isinstance(v, dt.date):
            return TAG_DATE, v.isoformat()
        if isinstance(v, dt.time):
            return TAG_TIME, v.isoformat()
        if isinstance(v, dt.timedelta):
            return TAG_TIMEDELTA, [v.days, v.seconds, v.microseconds]
    dec = mods.get("decimal")
    if dec is not None and isinstance(v, dec.Decimal):
        return TAG_DECIMAL, str(v)
    uuid = mods.get("uuid")
    if uuid is not None and isinstance(v, uuid.UUID):
        return TAG_UUID, str(v)
    pathlib = mods.get("pathlib")
    if pathlib is not None and isinstance(v, pathlib.PurePath):
        if isinstance(v, pathlib.PureWindowsPath):
            return TAG_PUREWINDOWSPATH, str(v)
        if isinstance(v, pathlib.Path):
            return TAG_PATH, str(v)
        return TAG_PUREPOSIXPATH, str(v)
    ipaddress = mods.get("ipaddress")
    if ipaddress is not None:
        if isinstance(v, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
            return TAG_IPINTERFACE, str(v)
        if isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return TAG_IP, str(v)
        if isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network):
            return TAG_IPNETWORK, str(v)
    return None


def to_data(value: Any, limit: int) -> Encoded:
    """``value`` as tagged JSON-able data, the blobs its ``$bytes`` tags refer to, and what
    rebuilding its tags will cost the parent.

    Raises :class:`NotData` (a type that cannot cross, nesting deeper than ``MAX_DEPTH``,
    a cycle) or :class:`TooLarge` when the encoding certainly exceeds ``limit`` bytes
    (counted as a lower bound: each string its length, each number its digits, each blob
    its bytes), as soon as an item takes it over, before building anything large.
    """
    t = type(value)
    if value is None or t is bool or (t is int and -(1 << 62) < value < (1 << 62)) or (
            t is str and len(value) + 3 <= limit):
        return Encoded(value, [], 0)  # the common small result, without a walk
    enc = _Encoder(limit)
    try:
        data = enc.value(value, 0)
    except NotData as exc:
        exc.where = "result" + exc.where
        raise
    except RecursionError:
        raise NotData(_type_name(value), "result", "nested too deeply") from None
    enc.spend(0)  # numbers are counted without a check each
    return Encoded(data, enc.blobs, enc.expansion)
