"""Replies are data: the worker's encoder and the parent's decoder, without processes.

Round trips of every natural return type (hypothesis), the tag escaping, and the
parent's refusals of hostile frames: not JSON, bad tags, blob tails that do not add up,
hash floods, nesting, and decoded sizes past the budget (refused before parsing).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import ipaddress
import json
import math
import pathlib
import pickle
import time
import tracemalloc
import typing
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from failcore import _values
from failcore_worker import _data_cost, protocol
from failcore_worker import _values as wvalues

LIMIT = 1 << 20


def frame_of(value: Any, limit: int = LIMIT) -> bytearray:
    """The payload a worker sends for ``value`` (what ``recv_frame`` hands the parent)."""
    encoded = wvalues.to_data(value, limit)
    frame = protocol.encode_data("result", {"value": encoded.data, "events": [], "call_id": "c1"},
                                 encoded.blobs)
    return bytearray(frame[protocol.HEADER.size:])


def roundtrip(value: Any, limit: int = LIMIT) -> Any:
    kind, body = _values.decode_reply(frame_of(value, limit), protocol.reply_limit(limit))
    assert kind == "result" and body["call_id"] == "c1"
    return body["value"]


def decode(text: bytes | str, tail: bytes | None = None, limit: int = LIMIT) -> Any:
    raw = text.encode() if isinstance(text, str) else text
    if tail is not None:
        raw += b"\0" + tail
    return _values.decode_reply(bytearray(raw), protocol.reply_limit(limit))


def result(value_json: str, tail: bytes | None = None, limit: int = LIMIT) -> Any:
    return decode('["result",{"value":' + value_json + ',"events":[]}]', tail, limit)[1]["value"]


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to itself and containers compared by exact type."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, complex):
        return same(a.real, b.real) and same(a.imag, b.imag)
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)
    if isinstance(a, set | frozenset):
        return a == b and all(any(same(x, y) for y in b) for x in a)
    return bool(a == b)


# --- round trips --------------------------------------------------------------------------

class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass(frozen=True, slots=True)
class Point:
    x: int
    y: float = 0.5
    label: str = dataclasses.field(default="p", repr=False)


class Pair(typing.NamedTuple):
    left: int
    right: bytes


OldPair = collections.namedtuple("OldPair", "a b")


class Settings(typing.TypedDict):
    name: str
    tags: list[str]


class FakeModel:
    """Duck-typed like a pydantic model (the worker never imports pydantic)."""

    model_fields: typing.ClassVar[dict[str, Any]] = {"a": None}

    def model_dump(self, by_alias: bool = False) -> dict[str, Any]:
        return {"A" if by_alias else "a": (1, Color.RED)}


NATURAL: list[tuple[str, Any, Any]] = [
    ("none", None, None), ("bool", True, True), ("int", -7, -7), ("big int", 10**300, 10**300),
    ("float", 1.5, 1.5), ("nan", math.nan, math.nan), ("inf", -math.inf, -math.inf),
    ("str", "héllo 😀", "héllo 😀"), ("lone surrogate", "bad \udc80 name", "bad \udc80 name"),
    ("bytes", b"\x00\xff" * 3, b"\x00\xff" * 3), ("empty bytes", b"", b""),
    ("bytearray", bytearray(b"ab"), bytearray(b"ab")),
    ("tuple", (1, "a", (2,)), (1, "a", (2,))), ("set", {1, 2}, {1, 2}),
    ("frozenset", frozenset({"a"}), frozenset({"a"})),
    ("int keys", {1: "a", 2: "b"}, {1: "a", 2: "b"}),
    ("mixed keys", {"a": 1, (1, 2): b"x", None: 2, 1.5: 3, b"k": 4, frozenset({1}): 5},
     {"a": 1, (1, 2): b"x", None: 2, 1.5: 3, b"k": 4, frozenset({1}): 5}),
    ("tag-like key", {"$bytes": 3}, {"$bytes": 3}), ("$ keys", {"$a": 1, "$b": 2}, {"$a": 1, "$b": 2}),
    ("nested tag-like", [{"$tuple": [1]}], [{"$tuple": [1]}]),
    ("named tuple", Pair(1, b"r"), (1, b"r")), ("collections namedtuple", OldPair(1, 2), (1, 2)),
    ("TypedDict", Settings(name="n", tags=["t"]), {"name": "n", "tags": ["t"]}),
    ("dataclass", Point(1), {"x": 1, "y": 0.5, "label": "p"}),
    ("enum", Color.RED, "red"), ("int enum", Level.HIGH, 3), ("enum key", {Color.RED: 1}, {"red": 1}),
    ("model", FakeModel(), {"A": (1, "red")}),
    ("datetime tz", datetime.datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=datetime.timezone(
        datetime.timedelta(hours=-3, minutes=-30))),
     datetime.datetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=datetime.timezone(
         datetime.timedelta(hours=-3, minutes=-30)))),
    ("naive datetime", datetime.datetime(2024, 1, 1), datetime.datetime(2024, 1, 1)),
    ("date", datetime.date(2020, 2, 29), datetime.date(2020, 2, 29)),
    ("time tz", datetime.time(1, 2, 3, 4, tzinfo=datetime.UTC),
     datetime.time(1, 2, 3, 4, tzinfo=datetime.UTC)),
    ("timedelta", datetime.timedelta(days=-3, microseconds=7), datetime.timedelta(days=-3, microseconds=7)),
    ("decimal", decimal.Decimal("-1.2300E+5"), decimal.Decimal("-1.2300E+5")),
    ("decimal nan", decimal.Decimal("sNaN"), decimal.Decimal("sNaN")),
    ("uuid", uuid.UUID(int=42), uuid.UUID(int=42)),
    ("path", pathlib.Path("/srv/a b"), pathlib.Path("/srv/a b")),
    ("pure path", pathlib.PurePosixPath("x/y"), pathlib.PurePosixPath("x/y")),
    ("windows path", pathlib.PureWindowsPath(r"C:\x"), pathlib.PureWindowsPath(r"C:\x")),
    ("ipv4", ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("10.1.2.3")),
    ("ipv6", ipaddress.ip_address("fe80::1%eth0"), ipaddress.ip_address("fe80::1%eth0")),
    ("network", ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8")),
    ("interface", ipaddress.ip_interface("::1/64"), ipaddress.ip_interface("::1/64")),
    ("complex", complex(1, math.inf), complex(1, math.inf)),
    ("deque", collections.deque([1, 2]), [1, 2]),
    ("ordered dict", collections.OrderedDict(b=1, a=2), {"b": 1, "a": 2}),
    ("counter", collections.Counter("aab"), {"a": 2, "b": 1}),
    ("str subclass", type("S", (str,), {})("s"), "s"),
]


@pytest.mark.parametrize(("value", "expected"), [(v, e) for _, v, e in NATURAL],
                         ids=[n for n, _, _ in NATURAL])
def test_natural_types_round_trip(value: Any, expected: Any) -> None:
    back = roundtrip(value)
    assert same(back, expected), (back, expected)
    if isinstance(expected, datetime.datetime | datetime.time):
        assert back.utcoffset() == expected.utcoffset()


hashable = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
    | st.binary(max_size=8) | st.decimals(allow_nan=False) | st.uuids() | st.dates(),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3), max_leaves=6)

natural = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text()
    | st.text(st.characters(categories=["Cs"]), max_size=2) | st.binary()
    | st.binary().map(bytearray) | st.datetimes(timezones=st.none() | st.timezones())
    | st.dates() | st.times() | st.timedeltas() | st.decimals() | st.uuids()
    | st.ip_addresses() | st.complex_numbers(),
    lambda inner: (st.lists(inner, max_size=4) | st.lists(inner, max_size=4).map(tuple)
                   | st.sets(hashable, max_size=4) | st.frozensets(hashable, max_size=4)
                   | st.dictionaries(st.text(max_size=6), inner, max_size=4)
                   | st.dictionaries(hashable, inner, max_size=4)),
    max_leaves=20)


def _plain(value: Any) -> Any:
    """What the parent gets back for ``value`` (zoneinfo zones come back as fixed offsets)."""
    if isinstance(value, datetime.datetime | datetime.time) and value.tzinfo is not None:
        if isinstance(value, datetime.datetime):
            return value.replace(tzinfo=datetime.timezone(value.utcoffset()))  # type: ignore[arg-type]
        offset = value.utcoffset()
        return value.replace(tzinfo=None if offset is None else datetime.timezone(offset))
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@given(natural)
def test_any_natural_value_round_trips(value: Any) -> None:
    back = roundtrip(value)
    assert same(back, _plain(value)), (back, value)


@given(st.dictionaries(st.text(alphabet="$ab", max_size=3), st.integers(), max_size=3))
def test_dicts_that_look_like_tags_come_back_as_dicts(value: dict[str, int]) -> None:
    assert roundtrip(value) == value


@pytest.mark.parametrize("value", [
    [1, [2, object()]], {"a": {"b": (lambda: 1)}}, (i for i in range(2)),
    {frozenset({1}): {"k": {1: [1, {2: Point}]}}},
])
def test_what_is_not_data_is_named_with_where_it_is(value: Any) -> None:
    with pytest.raises(wvalues.NotData) as info:
        wvalues.to_data(value, LIMIT)
    assert str(info.value).startswith("an object of type ")
    assert info.value.where.startswith("result")


def test_not_data_messages() -> None:
    with pytest.raises(wvalues.NotData, match=r"object of type object at result\[1\]\[1\]"):
        wvalues.to_data([1, [2, object()]], LIMIT)
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(wvalues.NotData, match="nested more than 100 levels deep, or it contains itself"):
        wvalues.to_data(loop, LIMIT)
    with pytest.raises(wvalues.NotData, match="not hashable, so not usable as a dict key"):
        wvalues.to_data({Point(1): 1}, LIMIT)
    with pytest.raises(wvalues.NotData, match="4300 digits"):
        wvalues.to_data(10**5000, LIMIT)


def test_the_walk_stops_at_the_limit_before_building_anything_large() -> None:
    """A list of a million references to one 1 KB string is 8 MB in memory, 1 GB as JSON:
    the encoder counts it (at C speed for a list of strs) or gives up after ~1000 items
    (a mixed list), without building the JSON."""
    started = time.process_time()
    with pytest.raises(wvalues.TooLarge) as info:
        wvalues.to_data(["x" * 1024] * 1_000_000, LIMIT)
    assert info.value.at_least > 1024 * 1_000_000
    with pytest.raises(wvalues.TooLarge) as info:
        wvalues.to_data([1, "x" * 1024] * 500_000, LIMIT)
    assert LIMIT < info.value.at_least < LIMIT + 2048
    with pytest.raises(wvalues.TooLarge):
        wvalues.to_data(b"x" * (LIMIT + 1), LIMIT)
    with pytest.raises(wvalues.TooLarge):
        wvalues.to_data(list(range(LIMIT)), LIMIT)
    assert time.process_time() - started < 5  # ~1 ms; 1 GB of JSON would take seconds


# --- hostile frames -----------------------------------------------------------------------

def test_a_pickle_is_not_a_reply() -> None:
    """The issue's attacks: tiny pickles that become a 2 GiB bytearray, or a long loop,
    when unpickled. (Never unpickled here, of course.)"""
    huge = b"cbuiltins\nbytearray\n\x8a\x05\x00\x00\x00\x80\x00\x85R."
    ascii_only = b"(lp0\nI1\naI2\na."
    for evil in (huge, ascii_only, pickle.dumps(("result", {"value": None}))):
        with pytest.raises(_values.BadReply, match="not UTF-8|not JSON"):
            _values.decode_reply(bytearray(evil), protocol.reply_limit(LIMIT))


@pytest.mark.parametrize(("text", "match"), [
    ('{"kind": 1}', "expected \\[kind, body\\]"),
    ('["result"]', "expected"),
    ('["ok", {}]', "unknown reply kind"),
    ('["result", {"events": {"a": 1}}]', "not a list"),
    ('["result", {"events": [1]}]', "not a flat record"),
    ('["result", {"events": [{"op": {"$tuple": []}}]}]', "not a flat record"),
    ('["result", {"value": NaN}]', "the constant NaN"),
    ('["result", {"value": 1} ] x', "not JSON"),
    ('["result", {"value": "\\ud800"}', "not JSON"),
    ("[" * 100_000 + "]" * 100_000, "not JSON"),
])
def test_malformed_replies_are_bad_replies(text: str, match: str) -> None:
    with pytest.raises(_values.BadReply, match=match):
        decode(text)


@pytest.mark.parametrize(("value_json", "match"), [
    ('{"$nope": 1}', "unknown tag"), ('{"$float": "zero"}', "bad \\$float"),
    ('{"$tuple": 1}', "bad \\$tuple"), ('{"$dict": [[1]]}', "pairs"),
    ('{"$dict": [[[1], 2]]}', "unhashable"), ('{"$set": [[1], 2, 3]}', "unhashable"),
    ('{"$datetime": "not a date"}', "ValueError"), ('{"$datetime": "' + "9" * 100 + '"}', "bad \\$datetime"),
    ('{"$ip": "10.0.0.300"}', "ValueError"), ('{"$timedelta": [1, 2]}', "bad \\$timedelta"),
    ('{"$timedelta": [10000000000, 0, 0]}', "OverflowError"), ('{"$decimal": "x"}', "InvalidOperation"),
    ('{"$complex": ["1", 2]}', "bad \\$complex"), ('{"$bytes": -1}', "bad \\$bytes length"),
    ('{"$bytes": 3}', "past the blob tail"), ("9" * 5000, "ValueError"),
])
def test_bad_tags_are_bad_values(value_json: str, match: str) -> None:
    with pytest.raises(_values.BadValue, match=match):
        result(value_json)


def test_blobs_must_add_up_to_the_tail() -> None:
    assert result('[{"$bytes": 2}, {"$bytearray": 1}]', b"abc") == [b"ab", bytearray(b"c")]
    with pytest.raises(_values.BadValue, match="past the blob tail"):
        result('[{"$bytes": 2}, {"$bytes": 2}]', b"abc")
    with pytest.raises(_values.BadReply, match="1 bytes after the last blob"):
        result('{"$bytes": 2}', b"abc")
    with pytest.raises(_values.BadReply, match="3 bytes after the last blob"):
        result("1", b"abc")


@pytest.mark.parametrize("tag", ["$set", "$frozenset", "$dict"])
def test_hash_floods_are_refused_fast(tag: str) -> None:
    """Distinct ints with one hash (k * (2**61 - 1)) would make building the set O(n^2)."""
    keys = [k * (2**61 - 1) for k in range(1, 20_001)]
    payload = [[k, 0] for k in keys] if tag == "$dict" else keys
    started = time.process_time()
    with pytest.raises(_values.BadValue, match="hash flooding"):
        result(json.dumps({tag: payload}), limit=4 * LIMIT)
    assert time.process_time() - started < 5  # ~50 ms; building it would take minutes
    ok = list(range(20_000))
    assert result(json.dumps({tag: [[k, 0] for k in ok] if tag == "$dict" else ok}),
                  limit=4 * LIMIT) is not None


# --- the decoded size is bounded before parsing -------------------------------------------

def _array(item: str, size: int) -> bytes:
    count = max(1, size // (len(item) + 1))
    return ("[" + ",".join([item] * count) + "]").encode()


SHAPES = ["{}", "[]", "0", "257", "1e1", '"ab"', '"é"', '"😀x"', '"\\ud83d"', '{"a":0}',
          '{"":[]}', "[[]]", "[0,0]", '{"":{"":{"":{"":{}}}}}', '"' + "x" * 300 + '"', "9" * 4000]


def _peak_decoding(frame: bytearray, frame_limit: int) -> int:
    tracemalloc.start()
    try:
        _values.decode_reply(frame, frame_limit)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("item", SHAPES)
def test_decode_cost_bounds_what_decoding_really_holds(item: str) -> None:
    """tracemalloc's peak while decoding a 400 KB text of each shape is below the estimate."""
    text = b'["result",{"value":' + _array(item, 400_000) + b',"events":[]}]'
    peak = _peak_decoding(bytearray(text), 64 * LIMIT)
    assert peak <= _data_cost.decode_cost(text), (peak / len(text), item)


TAGGED = {
    "sets": [set(range(1000 * i, 1000 * i + 300)) for i in range(40)],
    "one big set": set(range(10**6, 10**6 + 30_000)),
    "small sets": [{i} for i in range(20_000)],
    "frozensets": [frozenset({i, -i}) for i in range(10_000)],
    "int-keyed dicts": [{i: i, i + 1: None} for i in range(10_000)],
    "one big dict": {i: i for i in range(30_000)},
    "tuples": [(i,) for i in range(30_000)],
    "blobs": [bytes([i % 256]) * (i % 7) for i in range(20_000)],
    "bytearrays": [bytearray(3) for _ in range(20_000)],
    "decimals": [decimal.Decimal(i) / 7 for i in range(10_000)],
    "paths": [pathlib.PurePosixPath("a/" * 20 + str(i)) for i in range(5_000)],
    "datetimes": [datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)] * 10_000,
    "uuids and ips": [uuid.UUID(int=i) for i in range(5000)] + [ipaddress.ip_address(i) for i in range(5000)],
    "nan": [math.nan] * 20_000,
}


@pytest.mark.parametrize("name", list(TAGGED))
def test_cost_and_expansions_bound_what_rebuilding_tags_holds(name: str) -> None:
    """With tags, the estimate plus what the worker counted for their expansion bounds the
    parent's peak: the parent charges the same amounts, so it never refuses an honest reply
    the worker let through."""
    encoded = wvalues.to_data(TAGGED[name], 64 * LIMIT)
    text = protocol.data_text("result", {"value": encoded.data, "events": []})
    frame = bytearray(protocol.frame_data(text, encoded.blobs)[protocol.HEADER.size:])
    bound = _data_cost.decode_cost(text, len(text) if encoded.blobs else None) + encoded.expansion
    peak = _peak_decoding(frame, 64 * LIMIT)
    assert peak <= bound, (name, peak / len(frame), bound / len(frame))
    frame = bytearray(protocol.frame_data(text, encoded.blobs)[protocol.HEADER.size:])
    tight = (bound + _data_cost.DECODE_MULTIPLE - 1) // _data_cost.DECODE_MULTIPLE
    assert _values.decode_reply(frame, tight)[0] == "result"  # exactly within budget: accepted


def test_tags_expanding_past_the_budget_stop_the_decoding() -> None:
    """A reply whose text is cheap but whose sets are not: refused while decoding, as too
    large (the worker would have refused it itself)."""
    encoded = wvalues.to_data(set(range(10**6, 10**6 + 30_000)), 64 * LIMIT)
    text = protocol.data_text("result", {"value": encoded.data, "events": []})
    cost = _data_cost.decode_cost(text)
    frame_limit = (cost + encoded.expansion // 2) // _data_cost.DECODE_MULTIPLE
    with pytest.raises(_values.ReplyTooLarge):
        _values.decode_reply(bytearray(text), frame_limit)


json_tokens = st.recursive(
    st.sampled_from(["0", "257", "1.5", '""', '"ab"', '"é"', "null", "true", "{}", "[]"]),
    lambda inner: (st.lists(inner, max_size=6).map(lambda xs: "[" + ",".join(xs) + "]")
                   | st.lists(st.tuples(st.text(max_size=3), inner), max_size=4).map(
                       lambda kv: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in kv) + "}")),
    max_leaves=12)


@settings(max_examples=40)
@given(st.lists(json_tokens, min_size=1, max_size=8))
def test_decode_cost_bounds_any_json(parts: list[str]) -> None:
    """Random JSON repeated to ~60 KB: the estimate is never below tracemalloc's peak."""
    item = "[" + ",".join(parts) + "]"
    text = _array(item, 60_000)
    tracemalloc.start()
    try:
        json.loads(text.decode())
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= _data_cost.decode_cost(text)


@pytest.mark.parametrize("item", ["{}", "[[]]", '{"":{}}', '"ab"'])
def test_replies_past_the_budget_are_refused_unparsed(item: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    limit = 64 * 1024
    frame_limit = protocol.reply_limit(limit)
    text = b'["result",{"value":' + _array(item, frame_limit - 40) + b'}]'
    assert len(text) <= frame_limit

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("parsed a reply past its budget")

    monkeypatch.setattr(protocol, "decode_data", never)
    with pytest.raises(_values.ReplyTooLarge) as info:
        _values.decode_reply(bytearray(text), frame_limit)
    assert info.value.cost > info.value.budget == _data_cost.DECODE_MULTIPLE * frame_limit


def test_the_worker_refuses_what_the_parent_would() -> None:
    """One function judges both sides: an honest tool gets ERR_TOO_LARGE, not a dead worker."""
    from failcore_worker import main

    limit = 64 * 1024
    frame = main.encode_reply("result", {"value": [{}] * 30_000, "events": []}, limit)
    kind, body = _values.decode_reply(bytearray(frame[protocol.HEADER.size:]),
                                      protocol.reply_limit(limit))
    assert (kind, body["kind"]) == ("error", protocol.ERR_TOO_LARGE)
    assert "too many small objects" in body["message"]
    assert "output_bytes=65536" in body["message"]


def _timed_decode(item: str, size: int) -> float:
    text = bytearray(b'["result",{"value":' + _array(item, size) + b"}]")
    best = math.inf
    for _ in range(3):
        started = time.process_time()
        try:
            _values.decode_reply(text, 64 * size)
        except (_values.BadReply, _values.ReplyTooLarge):
            pass
        best = min(best, time.process_time() - started)
    return best


@pytest.mark.parametrize("item", ["9" * 4000, '"\\\\\\"' + '\\"' * 100 + '"', '{"$set":[1,2,3,4,5,6]}',
                                  '{"$decimal":"' + "9" * 2000 + '"}', '"' + "\\u00e9" * 50 + '"'])
def test_decoding_time_is_linear_in_the_frame(item: str) -> None:
    """Eight times the bytes take about eight times the CPU (quadratic would be 64x)."""
    small, large = _timed_decode(item, 250_000), _timed_decode(item, 2_000_000)
    assert large < 24 * max(small, 1e-3), (small, large)


def test_a_reply_that_cannot_be_encoded_still_goes_out_as_data(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever goes wrong while encoding, the worker answers (an error, as data) and lives."""
    import socket

    from failcore_worker import main

    def broken(*args: object) -> bytes:
        raise RuntimeError("encoder bug")

    monkeypatch.setattr(main, "encode_reply", broken)
    state = main._State()
    state.limits = {"output_bytes": 1024}
    state.call_id = "c7"
    ours, theirs = socket.socketpair()
    with ours, theirs:
        main._send_reply(ours, state, "result", {"value": 1, "events": []})
        kind, body = _values.decode_reply(protocol.recv_frame(theirs), protocol.reply_limit(1024))
    assert (kind, body["kind"], body["call_id"]) == ("error", protocol.ERR_OUTPUT, "c7")
    assert "RuntimeError" in body["message"]
