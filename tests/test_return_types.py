"""A tool's natural return types cross the boundary (issue 10 item 3, issue 12 item 1).

The worker sends data; the parent rebuilds the tool's *declared* return type with
pydantic. Unannotated tools get plain data back: a dataclass or a model as a dict, a
named tuple as a tuple, an enum as its value (README, "Return values").
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import ipaddress
import pathlib
import typing
import uuid
from collections.abc import Iterator
from typing import NamedTuple

import pytest
from conftest import idle_worker_pids
from pydantic import BaseModel, ConfigDict, Field
from typing_extensions import TypedDict

from failcore import (
    InputValidationError,
    Limits,
    OutputValidationError,
    ResourceLimitExceeded,
    Session,
    ToolMetadata,
)

UTC_PLUS_2 = datetime.timezone(datetime.timedelta(hours=2))
WHEN = datetime.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC_PLUS_2)


class Status(enum.Enum):
    OK = "ok"
    GONE = "gone"


@dataclasses.dataclass(frozen=True, slots=True)
class Page:
    url: str
    status: int
    fetched: datetime.datetime
    body: bytes = b""
    tags: frozenset[str] = frozenset()


class Response(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


Pair = collections.namedtuple("Pair", "left right")


class Usage(TypedDict):
    tokens: int
    cost: decimal.Decimal


class Report(BaseModel):
    page: Page
    status: Status
    ids: set[int]
    owner: uuid.UUID
    where: pathlib.Path
    address: ipaddress.IPv4Address
    took: datetime.timedelta
    day: datetime.date
    at: datetime.time
    scores: tuple[float, ...]
    alias_field: int = Field(alias="aliasField")


class StrictReport(BaseModel):
    model_config = ConfigDict(strict=True)
    when: datetime.datetime
    raw: bytes
    nested: Report


def page() -> Page:
    return Page("http://x/", 200, WHEN, b"\x00\xff", frozenset({"a"}))


def response() -> Response:
    return Response(200, {"content-type": "text/plain"}, b"hello")


def pair() -> Pair:
    return Pair(1, (2, 3))


def usage() -> Usage:
    return {"tokens": 7, "cost": decimal.Decimal("0.0012")}


def status() -> Status:
    return Status.GONE


def report() -> Report:
    return Report(page=page(), status=Status.OK, ids={3, 1}, owner=uuid.UUID(int=9),
                  where=pathlib.Path("/srv/x"), address=ipaddress.IPv4Address("10.0.0.1"),
                  took=datetime.timedelta(seconds=1.5), day=datetime.date(2024, 2, 29),
                  at=datetime.time(23, 59, tzinfo=datetime.UTC), scores=(0.5, float("inf")),
                  aliasField=3)


def strict_report() -> StrictReport:
    return StrictReport(when=WHEN, raw=b"\x01", nested=report())


def as_dict_for_model() -> Report:
    return report().model_dump(by_alias=True)  # type: ignore[return-value]


def many() -> list[Page]:
    return [page(), page()]


def keyed() -> dict[int, Status]:
    return {1: Status.OK, 2: Status.GONE}


def wrong() -> int:
    return "not an int"  # type: ignore[return-value]


TYPED = [
    (page, page()), (response, response()), (pair, Pair(1, (2, 3))),
    (usage, {"tokens": 7, "cost": decimal.Decimal("0.0012")}), (status, Status.GONE),
    (report, report()), (strict_report, strict_report()), (as_dict_for_model, report()),
    (many, [page(), page()]), (keyed, {1: Status.OK, 2: Status.GONE}),
]


@pytest.fixture
def session() -> Iterator[Session]:
    with Session() as s:
        yield s


def test_declared_return_types_are_rebuilt(session: Session) -> None:
    for tool, expected in TYPED:
        session.register(tool.__name__, tool)
        value = session.call(tool.__name__)
        assert value == expected, tool.__name__
        assert type(value) is type(expected), tool.__name__


def test_the_readme_wrapper_returns_an_object_with_status(session: Session) -> None:
    session.register("http_get_like", response)
    result = session.call("http_get_like")
    assert result.status == 200 and result.body == b"hello"
    assert result.headers == {"content-type": "text/plain"}


def untyped_page():  # type: ignore[no-untyped-def]
    return page()


def untyped_mix():  # type: ignore[no-untyped-def]
    return {"response": response(), "status": Status.OK, "report": report(), "pair": pair(),
            "deque": collections.deque([1]), "when": WHEN}


def test_unannotated_tools_return_plain_data(session: Session) -> None:
    session.register("untyped_page", untyped_page)
    session.register("untyped_mix", untyped_mix)
    assert session.call("untyped_page") == {
        "url": "http://x/", "status": 200, "fetched": WHEN, "body": b"\x00\xff",
        "tags": frozenset({"a"})}
    mix = session.call("untyped_mix")
    assert mix["response"] == (200, {"content-type": "text/plain"}, b"hello")
    assert type(mix["response"]) is tuple
    assert mix["status"] == "ok"
    assert mix["report"]["page"]["fetched"] == WHEN and mix["report"]["aliasField"] == 3
    assert mix["report"]["ids"] == {1, 3}
    assert mix["pair"] == (1, (2, 3)) and mix["deque"] == [1]
    assert mix["when"] == WHEN and mix["when"].utcoffset() == datetime.timedelta(hours=2)


def test_a_wrong_return_type_is_an_output_validation_error(session: Session) -> None:
    session.register("wrong", wrong)
    with pytest.raises(OutputValidationError, match="wrong returned str, expected int"):
        session.call("wrong")


def strict_dataclass_field() -> StrictOuter:
    return StrictOuter(page=page())


class StrictOuter(BaseModel):
    model_config = ConfigDict(strict=True)
    page: Page


def test_strict_models_get_a_hint_about_instances(session: Session) -> None:
    """A strict model wants instances of its dataclass fields, which do not cross as such."""
    session.register("strict_dc", strict_dataclass_field)
    with pytest.raises(OutputValidationError, match="strict"):
        session.call("strict_dc")


def sized(n: int) -> list[int]:
    return list(range(1000, 1000 + n))


def test_an_output_over_the_limit_keeps_the_worker(session: Session) -> None:
    session.register("sized", sized, ToolMetadata(isolation="tool",
                                                  limits=Limits(output_bytes=10_000)))
    assert session.call("sized", n=10) == list(range(1000, 1010))
    (pid,) = idle_worker_pids(session, "sized")
    with pytest.raises(ResourceLimitExceeded, match="exceeds output_bytes=10000"):
        session.call("sized", n=10_000)
    assert session.call("sized", n=1) == [1000]
    assert idle_worker_pids(session, "sized") == [pid]


class StdUsage(typing.TypedDict):
    """The standard library's TypedDict, which pydantic refuses before Python 3.12."""

    tokens: int
    model: str


class StdOptional(typing.TypedDict, total=False):
    note: str


def std_usage(n: int) -> StdUsage:
    return {"tokens": n, "model": "m"}


def std_usages(n: int) -> list[StdUsage]:
    return [{"tokens": i, "model": "m"} for i in range(n)]


def std_takes(u: StdUsage) -> int:
    return u["tokens"] * 2


def std_optional() -> StdOptional:
    return {}


def test_the_standard_librarys_typeddict_works_in_and_out(session: Session) -> None:
    for fn in (std_usage, std_usages, std_takes, std_optional):
        session.register(fn.__name__, fn)
    assert session.call("std_usage", n=3) == {"tokens": 3, "model": "m"}
    assert session.call("std_usages", n=2) == [{"tokens": 0, "model": "m"},
                                                {"tokens": 1, "model": "m"}]
    assert session.call("std_takes", u={"tokens": 4, "model": "x"}) == 8
    assert session.call("std_optional") == {}
    with pytest.raises(InputValidationError, match="tokens"):  # still strict: "4" is no int
        session.call("std_takes", u={"tokens": "4", "model": "x"})
