"""The parent side of the socket broker, request by request (no worker process needed).

Names other than ``localhost`` are answered by a fake resolver; every connect goes to a
loopback listener of the test's own.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from _broker_harness import FakeResolver
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from failcore import _broker_lookup
from failcore._broker import Broker, BrokerAnswer, BrokerLimits, send_answer
from failcore._broker_lookup import LookupTimeout
from failcore._trace_schema import GuardBody
from failcore_worker import _broker as worker_broker
from failcore_worker import _broker_channel, _broker_names, _guard_judge, protocol
from failcore_worker._guard_names import NameBook
from failcore_worker.rules import Grants, NetRule, check_resolve


@pytest.fixture
def listener() -> Iterator[int]:
    """A loopback port that accepts (the kernel completes handshakes; nobody reads)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def _connect(host: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"id": 7, "family": socket.AF_INET, "proto": 0, "host": host, "port": port,
            "flowinfo": 0, "scope_id": 0, **extra}


def _lookup(op: str, host: str, port: Any = None, flags: int = 0) -> dict[str, Any]:
    return {"id": 8, "op": op, "host": host, "port": port, "family": 0, "type": 0, "proto": 0,
            "flags": flags}


def _broker(grants: Grants, **kwargs: Any) -> Broker:
    kwargs.setdefault("deadline", time.monotonic() + 30)
    return Broker(grants, **kwargs)


def _allowed(answer: BrokerAnswer) -> bool:
    try:
        return answer.fd is not None and answer.reply.get("fd") is True
    finally:
        answer.close()


def _name_rule(name: str, port: int) -> NetRule:
    return NetRule(name, port, port, f"net:connect:{name}:{port}")


# --- the decision: the same one the worker's guards make ------------------------------------------


GRANTS = [
    Grants(),
    Grants(default="warn"),
    Grants(default="allow"),
    Grants(net=(_name_rule("api.example.test", 443),)),
    Grants(net=(_name_rule("api.example.test", 443),), block_ranges=True),
    Grants(net=(_name_rule("*.example.test", 443),), block_ranges=True),
    Grants(net=(NetRule("10.0.0.0/8", 0, 65535, "net:connect:10.0.0.0/8"),)),
    Grants(net=(NetRule("localhost", 80, 80, "net:connect:localhost:80"),), block_ranges=True),
    Grants(net=(NetRule("*", 0, 65535, "net:connect:*"),), block_ranges=True),
    Grants(net=(NetRule("public", 0, 65535, "net:connect:public"),)),
    Grants(net=(NetRule("public", 443, 443, "net:connect:public:443"),), block_ranges=True),
]
NAMES = ["api.example.test", "evil.example.test", "other.test", "localhost", "metadata",
         "x.internal", "1.2.3.4", "127.0.0.1", "169.254.169.254", "0x7f.1", "a.nip.io",
         "4.3.2.1.in-addr.arpa", "ＡＰＩ.example.test"]


def _worker_decision(grants: Grants, name: str, port: int) -> tuple[str, str]:
    saved = _guard_judge.state.grants
    _guard_judge.state.grants = grants
    try:
        _guard_judge.judge_resolve(name, port)
    except _guard_judge.GuardDenied as denied:
        return "block", denied.verdict.rule
    finally:
        _guard_judge.state.grants = saved
        _guard_judge.state.events.clear()
    return "allow", ""


@pytest.mark.parametrize("grants", GRANTS)
def test_check_resolve_is_the_guards_decision(grants: Grants) -> None:
    """The broker judges lookups with rules.check_resolve, as the worker's guard does."""
    for name in NAMES:
        for port in (0, 80, 443):
            verdict = check_resolve(grants, name, port)
            rule = verdict.rule if verdict.action == "block" else ""
            assert (verdict.action if verdict.action == "block" else "allow", rule) == \
                _worker_decision(grants, name, port), (name, port)


# --- names come from the parent's own lookups, never from the worker ------------------------------------


def test_names_are_only_what_the_parent_resolved(listener: int) -> None:
    fake = FakeResolver({"api.example.test": ["127.0.0.1"]}, {"127.0.0.1": "api.example.test"})
    grants = Grants(net=(_name_rule("api.example.test", listener),
                         NetRule("10.0.0.0/8", 1, 1, "net:connect:10.0.0.0/8:1")))
    book = NameBook()
    broker = _broker(grants, resolver=fake, book=book)
    # a worker claiming the name gets nothing for it
    claimed = broker.handle("broker.connect", _connect("127.0.0.1", listener, names=["api.example.test"]))
    assert not _allowed(claimed) and claimed.reply["denied"]
    assert claimed.events[-1]["names"] == [] and claimed.events[-1]["rule"] == "default_policy=BLOCK"
    # a reverse lookup's answer is the address owner's word: it never names a connect
    ptr = broker.handle("broker.resolve", _lookup("gethostbyaddr", "127.0.0.1"))
    assert ptr.reply["hostent"][0] == "api.example.test"
    assert not _allowed(broker.handle("broker.connect", _connect("127.0.0.1", listener)))
    # the parent's own forward lookup does
    found = broker.handle("broker.resolve", _lookup("getaddrinfo", "api.example.test", listener))
    assert [entry[4][0] for entry in found.reply["addrinfo"]] == ["127.0.0.1"]
    allowed = broker.handle("broker.connect", _connect("127.0.0.1", listener))
    assert allowed.events[-1]["names"] == ["api.example.test"]
    assert _allowed(allowed)
    # the book is the worker's: a fresh one knows nothing, a shared one remembers
    assert not _allowed(_broker(grants, resolver=fake).handle("broker.connect", _connect("127.0.0.1", listener)))
    assert _allowed(_broker(grants, resolver=fake, book=book).handle(
        "broker.connect", _connect("127.0.0.1", listener)))


def test_connect_by_name_is_resolved_and_judged_here(listener: int) -> None:
    fake = FakeResolver({"api.example.test": ["127.0.0.1"], "evil.example.test": ["127.0.0.1"]})
    grants = Grants(net=(_name_rule("api.example.test", listener),))
    broker = _broker(grants, resolver=fake)
    answer = broker.handle("broker.connect", _connect("api.example.test", listener))
    assert [e["op"] for e in answer.events] == ["net.resolve", "net.connect"]
    assert _allowed(answer)
    refused = broker.handle("broker.connect", _connect("evil.example.test", listener))
    assert refused.reply["denied"] and refused.events[0]["op"] == "net.resolve"
    assert fake.asked == ["api.example.test"]  # the refused name was never queried
    unknown = _broker(Grants(default="allow"), resolver=fake).handle(
        "broker.connect", _connect("nowhere.example.test", listener))
    assert unknown.reply["gai"] == socket.EAI_NONAME and unknown.fd is None


def test_net_safe_judges_the_resolved_address(listener: int) -> None:
    fake = FakeResolver({"api.example.test": ["127.0.0.1"]})
    grants = Grants(net=(_name_rule("api.example.test", listener),), block_ranges=True)
    answer = _broker(grants, resolver=fake).handle("broker.connect", _connect("api.example.test", listener))
    assert answer.reply["denied"] and answer.reply["rule"] == "net_safe: 127.0.0.0/8 (loopback)"
    assert "grant the address itself" in answer.reply["message"]


def test_the_stricter_of_token_and_policy_decides(listener: int) -> None:
    grants = Grants(net=(NetRule("*", 0, 65535, "net:connect:*"),))
    assert _allowed(_broker(grants).handle("broker.connect", _connect("127.0.0.1", listener)))
    enforced = dataclasses.replace(grants, block_ranges=True)
    answer = _broker(grants, enforced=enforced).handle("broker.connect", _connect("127.0.0.1", listener))
    assert answer.reply["rule"] == "net_safe: 127.0.0.0/8 (loopback)" and answer.fd is None


def test_warn_connects_and_says_so(listener: int) -> None:
    """DefaultPolicy.WARN: the connect happens and its record is a warning."""
    answer = _broker(Grants(default="warn")).handle("broker.connect", _connect("127.0.0.1", listener))
    assert [e["action"] for e in answer.events] == ["warn"]
    assert answer.events[0]["rule"] == "default_policy=WARN"
    assert _allowed(answer)


def test_localhost_is_looked_up_for_real() -> None:
    """The one name a test may resolve outside a namespace (/etc/hosts)."""
    grants = Grants(net=(NetRule("localhost", 80, 80, "net:connect:localhost:80"),))
    answer = _broker(grants).handle("broker.resolve", {**_lookup("getaddrinfo", "localhost", 80),
                                                       "type": socket.SOCK_STREAM})
    addresses = {entry[4][0] for entry in answer.reply["addrinfo"]}
    assert addresses and all(a in ("127.0.0.1", "::1") for a in addresses)
    assert answer.events[0]["op"] == "net.resolve" and answer.events[0]["action"] == "allow"


# --- bounds ------------------------------------------------------------------------------------------------


def test_budget_then_violation(listener: int) -> None:
    broker = _broker(Grants(default="allow"), limits=BrokerLimits(connects=2))
    assert _allowed(broker.handle("broker.connect", _connect("127.0.0.1", listener)))
    assert _allowed(broker.handle("broker.connect", _connect("127.0.0.1", listener)))
    over = [broker.handle("broker.connect", _connect("127.0.0.1", listener)) for _ in range(65)]
    assert all(a.reply["denied"] and a.reply["exhausted"] and a.fd is None for a in over)
    assert [len(a.events) for a in over[:2]] == [1, 0]  # one record for the overflow
    assert all(a.violation is None for a in over[:64])
    assert "kept asking" in str(over[64].violation)


def test_replies_fit_the_workers_bound() -> None:
    """Whatever a resolver (or a PTR record) returns, the reply frame fits the worker's
    bound; a larger one would break the channel's framing."""

    class Flood(FakeResolver):
        def getaddrinfo(self, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "c" * 5000, (f"10.0.{i // 250}.{i % 250}", 80))
                    for i in range(1000)]

        def gethostbyaddr(self, ip: str, timeout: float) -> tuple[str, list[str], list[str]]:
            return "p" * 5000, ["a" * 5000] * 1000, ["10.0.0.1"] * 1000

        def getnameinfo(self, sockaddr: tuple[Any, ...], flags: int, timeout: float) -> tuple[str, str]:
            return "n" * 100_000, "s" * 100_000

    broker = _broker(Grants(default="allow"), resolver=Flood({}))
    for body in (_lookup("getaddrinfo", "flood.example.test", 80), _lookup("gethostbyaddr", "10.0.0.1"),
                 _lookup("getnameinfo", "10.0.0.1", 80)):
        answer = broker.handle("broker.resolve", body)
        assert answer.violation is None and "denied" not in answer.reply
        assert len(protocol.encode(protocol.BROKER_REPLY, answer.reply)) <= protocol.MAX_BROKER_REPLY


def test_deadline_passed_connects_nothing(listener: int) -> None:
    broker = _broker(Grants(default="allow"), deadline=time.monotonic() - 1)
    answer = broker.handle("broker.connect", _connect("127.0.0.1", listener))
    assert answer.reply["errno"] == errno.ETIMEDOUT and answer.fd is None


def test_a_hung_lookup_is_abandoned_at_the_deadline() -> None:
    release = threading.Event()

    class Hung(FakeResolver):
        def getaddrinfo(self, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
            timeout = args[-1]
            return _broker_lookup._POOL.run(lambda: release.wait(5) and [], timeout)

    broker = _broker(Grants(default="allow"), deadline=time.monotonic() + 0.2, resolver=Hung({}))
    started = time.monotonic()
    answer = broker.handle("broker.resolve", _lookup("getaddrinfo", "slow.example.test", 80))
    release.set()
    assert answer.reply["gai"] == socket.EAI_AGAIN
    assert "time ran out" in answer.reply["message"]
    assert time.monotonic() - started < 4


def test_pool_refuses_past_its_pending_bound() -> None:
    release = threading.Event()
    pool = _broker_lookup._Pool()
    waiters = [threading.Thread(target=lambda: _swallow(lambda: pool.run(lambda: release.wait(5), 2)))
               for _ in range(_broker_lookup.MAX_PENDING)]
    for t in waiters:
        t.start()
    deadline = time.monotonic() + 5
    while pool._pending < _broker_lookup.MAX_PENDING and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        with pytest.raises(LookupTimeout, match="already pending"):
            pool.run(lambda: None, 1)
    finally:
        release.set()
        for t in waiters:
            t.join(5)


def _swallow(fn: Any) -> None:
    try:
        fn()
    except LookupTimeout:
        pass


# --- everything from the worker is data -----------------------------------------------------------------


BAD_FRAMES = [
    b"[" + b" " * protocol.MAX_BROKER_REQUEST + b"]",
    b"\xff\xfe",
    b'{"kind": "broker.connect"}',
    b'["broker.connect", [1, 2]]',
]
BAD_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("broker.bind", _connect("127.0.0.1", 80)),
    ("broker.connect", _connect("127.0.0.1", 80, family=socket.AF_UNIX)),
    ("broker.connect", _connect("127.0.0.1", 80, proto=17)),
    ("broker.connect", _connect("127.0.0.1", 70000)),
    ("broker.connect", _connect("127.0.0.1", True)),
    ("broker.connect", _connect("127.0.0.1", "80")),
    ("broker.connect", _connect("a" * 300, 80)),
    ("broker.connect", _connect("a\0b", 80)),
    ("broker.connect", _connect("::1", 80, family=socket.AF_INET6, flowinfo=-1)),
    ("broker.connect", {"id": 7, "host": "127.0.0.1", "port": 80}),
    ("broker.resolve", _lookup("gethostbyname", "example.test")),
    ("broker.resolve", _lookup("getaddrinfo", "example.test", 80, flags=0x10000)),
    ("broker.resolve", {**_lookup("getaddrinfo", "example.test", 80), "family": 99}),
    ("broker.resolve", _lookup("getaddrinfo", "example.test", 3.5)),
    ("broker.resolve", _lookup("getaddrinfo", "example.test", "x" * 40)),
    ("broker.resolve", _lookup("getnameinfo", "not-an-address", 80)),
]


@pytest.mark.parametrize("payload", BAD_FRAMES)
def test_malformed_frames_are_violations(payload: bytes) -> None:
    answer = _broker(Grants(default="allow")).handle_frame(payload)
    assert answer.violation and answer.fd is None and "errno" in answer.reply


@pytest.mark.parametrize(("kind", "body"), BAD_REQUESTS)
def test_malformed_requests_are_violations(kind: str, body: dict[str, Any]) -> None:
    answer = _broker(Grants(default="allow"), resolver=FakeResolver({})).handle_frame(
        protocol.encode_data(kind, body)[protocol.HEADER.size:])
    assert answer.violation, (kind, body)
    assert answer.fd is None and answer.reply["id"] == body.get("id")
    assert "errno" in answer.reply or "gai" in answer.reply


_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False),
                    st.text(max_size=40), st.lists(st.integers(), max_size=3))
_KEYS = st.sampled_from(["id", "op", "host", "port", "family", "type", "proto", "flags",
                         "flowinfo", "scope_id", "names"])


@given(kind=st.sampled_from(["broker.connect", "broker.resolve", "x"]),
       body=st.dictionaries(_KEYS, _VALUES, max_size=11))
def test_any_request_gets_an_answer_never_an_exception(kind: str, body: dict[str, Any]) -> None:
    # Grants() refuse every lookup and connect, so nothing is resolved or connected here
    answer = _broker(Grants(), resolver=FakeResolver({})).handle(kind, body)
    assert answer.fd is None
    assert json.dumps(answer.reply, default=list)  # plain data, as the reply frame needs


# --- events and the reply frame ----------------------------------------------------------------------


def test_events_fit_the_trace_schema(listener: int) -> None:
    fake = FakeResolver({"api.example.test": ["127.0.0.1"]})
    broker = _broker(Grants(net=(_name_rule("api.example.test", listener),)), resolver=fake)
    answers = [broker.handle("broker.connect", _connect("api.example.test", listener)),
               broker.handle("broker.connect", _connect("127.0.0.2", listener))]
    events = [e for a in answers for e in a.events]
    for a in answers:
        a.close()
    assert len(events) == 3
    for event in events:
        assert event["observed"] == "parent"
        GuardBody.model_validate(event)
    with pytest.raises(ValidationError):
        GuardBody.model_validate({**events[0], "observed": "somebody"})


def test_reply_carries_one_close_on_exec_descriptor(listener: int) -> None:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        answer = _broker(Grants(default="allow")).handle("broker.connect", _connect("127.0.0.1", listener))
        fd = answer.fd
        assert fd is not None
        send_answer(ours, answer)
        assert answer.fd is None
        with pytest.raises(OSError):
            os.fstat(fd)  # the parent's copy is closed
        payload, fds = protocol.recv_frame_fds(theirs)
        kind, reply = protocol.decode(payload)
        assert kind == protocol.BROKER_REPLY and reply["fd"] and len(fds) == 1
        assert not os.get_inheritable(fds[0])
        with socket.socket(fileno=fds[0]) as received:
            assert received.type == socket.SOCK_STREAM


def test_more_descriptors_than_expected_are_dropped() -> None:
    ours, theirs = socket.socketpair()
    extra = [os.open("/dev/null", os.O_RDONLY) for _ in range(3)]
    with ours, theirs:
        before = len(os.listdir("/proc/self/fd"))
        protocol.send_with_fd(ours, protocol.encode("broker.reply", {"fd": True}), extra[0])
        socket.send_fds(ours, [protocol.encode("broker.reply", {})], extra[1:])
        for fd in extra:
            os.close(fd)
        _, first = protocol.recv_frame_fds(theirs)
        _, second = protocol.recv_frame_fds(theirs)
        assert len(first) == 1 and len(second) == 1  # the kernel closed the third
        for fd in first + second:
            os.close(fd)
        assert len(os.listdir("/proc/self/fd")) == before - 3


def test_large_reply_frames_are_sent_whole(listener: int) -> None:
    ours, theirs = socket.socketpair()
    frame = protocol.encode("broker.reply", {"blob": "x" * 4_000_000})
    with ours, theirs, socket.socket() as sock:
        sock.connect(("127.0.0.1", listener))
        got: list[Any] = []
        reader = threading.Thread(target=lambda: got.append(protocol.recv_frame_fds(theirs, len(frame))))
        reader.start()
        protocol.send_with_fd(ours, frame, sock.fileno())
        reader.join(10)
        payload, fds = got[0]
        assert len(payload) == len(frame) - protocol.HEADER.size and len(fds) == 1
        os.close(fds[0])


def test_send_answer_closes_the_descriptor_when_the_worker_is_gone(listener: int) -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    answer = _broker(Grants(default="allow")).handle("broker.connect", _connect("127.0.0.1", listener))
    fd = answer.fd
    assert fd is not None
    with ours, pytest.raises(OSError):
        send_answer(ours, answer)
    with pytest.raises(OSError):
        os.fstat(fd)


# --- an honest worker never looks like a hostile one -----------------------------------------------


def _through_the_wire(kind: str, body: dict[str, Any]) -> BrokerAnswer:
    """What the parent makes of a request the worker's factory built (JSON round trip)."""
    frame = protocol.encode_data(kind, {"id": 1, **body})
    return _broker(Grants(), resolver=FakeResolver({})).handle_frame(frame[protocol.HEADER.size:])


_SAMPLE_HOSTS = st.sampled_from(["127.0.0.1", "::1", "::1%lo", "", "<broadcast>", "api.example.test",
                                  "a\0b", "ｅｘ.test", "x" * 256, "x" * 255])
_HOSTS = st.one_of(_SAMPLE_HOSTS, _SAMPLE_HOSTS, st.text(max_size=300), st.binary(max_size=24))
_NUMBERS = st.one_of(st.integers(0, 65535), st.integers(0, 0xFFFFF), st.integers(-3, 70_000),
                     st.integers(-2**40, 2**40), st.booleans())


@settings(max_examples=400)
@given(family=st.sampled_from([socket.AF_INET, socket.AF_INET6]), proto=st.sampled_from([0, 6]),
       address=st.one_of(st.tuples(_HOSTS, _NUMBERS),
                         st.tuples(_HOSTS, _NUMBERS, _NUMBERS, _NUMBERS), st.text(max_size=5)))
def test_connect_requests_the_worker_builds_are_never_violations(
        family: int, proto: int, address: Any) -> None:
    try:
        body = worker_broker.connect_request(family, proto, address)
    except OverflowError:
        return  # raised in the tool, as CPython does
    if body is not None:
        assert _through_the_wire(protocol.BROKER_CONNECT, body).violation is None


@settings(max_examples=400)
@given(host=_HOSTS, port=st.one_of(_NUMBERS, st.none(), st.text(max_size=40), st.binary(max_size=8)),
       family=st.sampled_from([0, 2, 10, 1, 17]), kind=st.sampled_from([0, 1, 2, 3, 5]),
       proto=st.integers(-1, 300), flags=st.one_of(st.sampled_from([0, 2, 0x20, 0x400]),
                                                   st.integers(0, 0x20000)))
def test_lookup_requests_the_worker_builds_are_never_violations(
        host: Any, port: Any, family: int, kind: int, proto: int, flags: int) -> None:
    text = _broker_channel.text(host)
    if text is None or _broker_channel.numeric(text) or not _broker_channel.sendable(text):
        return  # answered in the worker without a query
    try:
        body = _broker_names.lookup_request(text, port, family, kind, proto, flags)
    except (socket.gaierror, TypeError):
        return  # refused in the worker, as libc would
    assert _through_the_wire(protocol.BROKER_RESOLVE, body).violation is None


@settings(max_examples=400)
@given(host=st.one_of(_HOSTS, st.ip_addresses().map(str)), port=st.integers(0, 65535),
       flags=st.integers(0, 0x3F))
def test_reverse_requests_the_worker_builds_are_never_violations(host: Any, port: int,
                                                                 flags: int) -> None:
    text = _broker_channel.text(host)
    if text is None or not _broker_channel.sendable(text):
        return
    assert _through_the_wire(protocol.BROKER_RESOLVE, _broker_names.reverse_request(
        "gethostbyaddr", text)).violation is None
    if _broker_channel.numeric(text) and text not in ("", "<broadcast>") \
            and not flags & ~protocol.BROKER_NI_FLAGS and not flags & socket.NI_NUMERICHOST:
        assert _through_the_wire(protocol.BROKER_RESOLVE, _broker_names.reverse_request(
            "getnameinfo", text, port, flags)).violation is None
