"""Capability tokens: the worker refuses what does not verify, and rights only shrink."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from typing import Any

import pytest

from failcore import Session, SideEffect, ToolMetadata, _values
from failcore._token import ToolGrants
from failcore_worker import protocol
from failcore_worker.rules import FsRule, NetRule


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


@pytest.fixture
def warm(tmp_path) -> Iterator[tuple[Session, Any, Any]]:  # type: ignore[no-untyped-def]
    (tmp_path / "a.txt").write_text("A")
    with Session() as s:
        s.register("read", read, ToolMetadata(
            isolation="tool", side_effect=SideEffect.FILESYSTEM,
            capabilities=[f"fs:read:{tmp_path}"]))
        assert s.call("read", path=str(tmp_path / "a.txt")) == "A"
        tool = s._tools["read"]
        lease = s._backend.lease(tool.spec)
        assert not lease.fresh
        try:
            yield s, tool, lease.handle
        finally:
            s._backend.release(lease, False)


def _ask(worker: Any, token: bytes, mac: str, args: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    worker.chan.sendall(protocol.encode("call", {"token": token, "mac": mac, "args": args}))
    return _values.decode_reply(protocol.recv_frame(worker.chan), protocol.reply_limit(1 << 20))


def test_bad_mac_is_refused(warm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s, tool, worker = warm
    token, mac = s._minter.mint("x1", "read", tool.parts, 5)
    kind, body = _ask(worker, token, "0" * 64, {"path": str(tmp_path / "a.txt")})
    assert (kind, body["kind"]) == ("error", "token") and "MAC" in body["message"]


def test_tampered_token_is_refused(warm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s, tool, worker = warm
    token, mac = s._minter.mint("x2", "read", tool.parts, 5)
    kind, body = _ask(worker, token.replace(b'"x2"', b'"x3"'), mac, {"path": str(tmp_path / "a.txt")})
    assert body["kind"] == "token"


def test_reused_call_id_expired_and_wrong_tool_are_refused(warm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s, tool, worker = warm
    args = {"path": str(tmp_path / "a.txt")}
    token, mac = s._minter.mint("x4", "read", tool.parts, 5)
    assert _ask(worker, token, mac, args)[0] == "result"
    kind, body = _ask(worker, token, mac, args)
    assert body["kind"] == "token" and "already used" in body["message"]
    token, mac = s._minter.mint("x5", "read", tool.parts, -10)
    assert "expired" in _ask(worker, token, mac, args)[1]["message"]
    token, mac = s._minter.mint("x6", "other", tool.parts, 5)
    assert "is for tool" in _ask(worker, token, mac, args)[1]["message"]


def test_wider_grants_are_refused_even_when_signed(warm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s, tool, worker = warm
    wider = dataclasses.replace(
        tool.parts.grants, fs=tool.parts.grants.fs + (FsRule("/etc", write=False),),
        net=(NetRule("10.0.0.0/8", 0, 65535, "net:connect:10.0.0.0/8"),))
    parts = ToolGrants.build(wider, tool.parts.limits)
    token, mac = s._minter.mint("x7", "read", parts, 5)
    kind, body = _ask(worker, token, mac, {"path": "/etc/hostname"})
    assert body["kind"] == "token" and "rights only shrink" in body["message"]


def test_narrower_grants_are_accepted_and_enforced(warm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s, tool, worker = warm
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("B")
    narrower = dataclasses.replace(tool.parts.grants, fs=(FsRule(str(tmp_path / "sub"), write=False),))
    parts = ToolGrants.build(narrower, tool.parts.limits)
    token, mac = s._minter.mint("x8", "read", parts, 5)
    kind, body = _ask(worker, token, mac, {"path": str(tmp_path / "sub" / "b.txt")})
    assert (kind, body["value"]) == ("result", "B")
    token, mac = s._minter.mint("x9", "read", parts, 5)
    kind, body = _ask(worker, token, mac, {"path": str(tmp_path / "a.txt")})
    assert body["kind"] == "denied", "the narrower token must be what the guards enforce"


def test_token_and_key_in_trace(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from failcore._trace import read_trace

    trace = tmp_path / "t.jsonl"
    with Session(trace=str(trace)) as s:
        s.register("read", read, ToolMetadata(side_effect=SideEffect.FILESYSTEM,
                                              capabilities=[f"fs:read:{tmp_path}"]))
        (tmp_path / "a.txt").write_text("A")
        s.call("read", path=str(tmp_path / "a.txt"))
        key = s._minter.key
    raw = trace.read_bytes()
    assert key.hex().encode() not in raw and key not in raw
    records = read_trace(str(trace))
    mints = [r for r in records if r["kind"] == "token.mint"]
    assert len(mints) == 1
    registered = [r for r in records if r["kind"] == "policy.grants"][0]["body"]
    assert mints[0]["body"]["grants_sha256"] == registered["grants_sha256"]
    assert registered["grants"]["fs"][0]["path"] == str(tmp_path)
    digest = hashlib.sha256(protocol.canonical_json(registered["grants"])).hexdigest()
    assert digest == registered["grants_sha256"], "the digest names exactly the recorded grants"


def test_token_header_is_canonical_json() -> None:
    import json

    from failcore._token import TokenMinter
    from failcore_worker.rules import Grants

    parts = ToolGrants.build(Grants(), {"timeout_s": 1})
    token, _mac = TokenMinter().mint('c"1\\', "to\u00e9l", parts, 5)
    header, _g, _l = protocol.split_token(token)
    assert token.split(b"\n")[0] == protocol.canonical_json(header)
    assert header["call_id"] == 'c"1\\' and header["tool"] == "to\u00e9l"
    assert json.loads(token.split(b"\n")[1]) == Grants().to_wire()


def test_limits_other_than_the_lock_down_are_refused_even_when_signed(warm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # Limits travel one route: applied at lock-down and signed into every token; a token
    # carrying other limits (say, a longer timeout) is refused, not silently ignored.
    s, tool, worker = warm
    looser = dict(tool.parts.limits, memory_mb=tool.parts.limits["memory_mb"] * 4)
    parts = ToolGrants.build(tool.parts.grants, looser)  # type: ignore[arg-type]
    token, mac = s._minter.mint("x10", "read", parts, 5)
    kind, body = _ask(worker, token, mac, {"path": str(tmp_path / "a.txt")})
    assert body["kind"] == "token" and "limits differ" in body["message"]


def test_every_reply_names_its_call_id(warm, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The parent matches replies to the calls it sent: results and refusals alike carry
    the call id their request's token names (read unverified for a refusal)."""
    s, tool, worker = warm
    args = {"path": str(tmp_path / "a.txt")}
    token, mac = s._minter.mint("id-ok", "read", tool.parts, 5)
    kind, body = _ask(worker, token, mac, args)
    assert (kind, body["call_id"], body["value"]) == ("result", "id-ok", "A")
    token, mac = s._minter.mint("id-bad-mac", "read", tool.parts, 5)
    kind, body = _ask(worker, token, "0" * 64, args)
    assert (kind, body["kind"], body["call_id"]) == ("error", "token", "id-bad-mac")
    token, mac = s._minter.mint("id-raises", "read", tool.parts, 5)
    kind, body = _ask(worker, token, mac, {"path": str(tmp_path / "missing.txt")})
    assert (kind, body["kind"], body["call_id"]) == ("error", "tool", "id-raises")
    assert "FileNotFoundError" in body["traceback"]  # tracebacks cross as text


def test_zygote_control_messages_are_data() -> None:
    """The zygote's control channel carries JSON, checked per kind: nothing the parent
    reads from it is ever unpickled."""
    import pickle

    assert protocol.decode_control(protocol.encode_control("forked", 3, 1234, 7)) == [
        "forked", 3, 1234, 7]
    for bad in (pickle.dumps(("forked", 3, 1234, 7)), b'["forked",3,"1234",7]',
                b'["exec","import os"]', b'["exited",1,true]', b"[]", b"{}"):
        with pytest.raises(protocol.BadFrame):
            protocol.decode_control(bad)
