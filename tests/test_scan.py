"""Secret/PII scanning of arguments and results: actions, redaction keeping structure,
the trace holding kind, place and hash but never the value, and policy files."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import tracemalloc
from pathlib import Path
from typing import Annotated, Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from failcore import Scan, SecurityError, Session, load_policy
from failcore._policy import check_policy_file
from failcore._scan import scan_value
from failcore._trace import read_trace, verify_trace
from failcore._validation import Secret

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("failcore_scan_corpus",
                                               ROOT / "tests" / "fixtures" / "scan_corpus.py")
assert _spec is not None and _spec.loader is not None
corpus: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

SALT = b"0123456789abcdef"
AWS = corpus.AWS_ID
CARD = "4111 1111 1111 1111"


class Profile(BaseModel):
    name: str
    email: str
    tags: list[str]


@dataclasses.dataclass(frozen=True)
class Row:
    id: int
    note: str


# --- pure: configuration ---------------------------------------------------------------


def test_actions_resolve_kind_then_group_then_default() -> None:
    scan = Scan(actions={"secrets": "block", "aws_access_key": "warn", "pii": "redact"},
                default="off")
    assert scan.action("aws_access_key") == "warn"
    assert scan.action("github_token") == "block"
    assert scan.action("email") == "redact"
    assert scan.action("high_entropy") == "off"
    assert scan.action("unscanned") == "warn"  # "off" never hides what was not read
    assert "high_entropy" not in scan.kinds


@pytest.mark.parametrize("bad", [
    {"actions": {"emails": "warn"}}, {"actions": {"email": "mask"}}, {"default": "deny"},
    {"actions": {"unscanned": "redact"}}, {"max_bytes": 10},
])
def test_bad_configuration_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Scan(**bad)


def test_compose_keeps_the_stronger_action() -> None:
    a = Scan(actions={"email": "redact"}, results=False)
    b = Scan(actions={"email": "block", "phone": "off"}, arguments=False)
    both = a.compose(b)
    assert both.action("email") == "block"
    assert both.action("phone") == "warn"  # a's default beats b's off
    assert both.arguments and both.results


# --- pure: walking, redaction, hashing ------------------------------------------------


def test_redaction_keeps_the_structure() -> None:
    value = {
        "user": Profile(name="Ann", email="ann@example.com", tags=["x", f"key {AWS}"]),
        "rows": [Row(1, "call 415-555-2671"), Row(2, "nothing")],
        "pair": ("ok", b"mail bob@example.com"),
        "members": {"zed@example.com", "plain"},
        "card": 4111111111111111,
        "ann@example.com": "a key that is an address",
    }
    out = scan_value(Scan(default="redact"), value, "result", SALT)
    new = out.value
    assert isinstance(new["user"], Profile) and new["user"].email == "<redacted:email>"
    assert new["user"].tags == ["x", "key <redacted:aws_access_key>"]
    assert new["rows"][0] == Row(1, "call <redacted:phone>") and new["rows"][1] is value["rows"][1]
    assert new["pair"] == ("ok", b"mail <redacted:email>")
    assert new["members"] == {"<redacted:email>", "plain"}
    assert new["card"] == "<redacted:card_number>"
    assert "<redacted:email>" in new and "ann@example.com" not in new
    assert value["user"].email == "ann@example.com"  # the input is not modified
    wheres = {f.where for f in out.findings}
    assert {"result.user.email", "result.user.tags[1]", "result.rows[0].note", "result.pair[1]",
            "result.members[1]", "result.card"} <= wheres
    assert not any("ann@example.com" in w for w in wheres)  # a key that matched is masked


def test_warn_returns_the_value_unchanged() -> None:
    value = {"a": [f"id {AWS}"]}
    out = scan_value(Scan(), value, "result", SALT)
    assert out.value is value
    assert [(f.kind, f.action) for f in out.findings] == [("aws_access_key", "warn")]
    assert out.masks == {AWS: "<redacted:aws_access_key>"}


def test_a_keyword_in_the_dict_key_names_the_value() -> None:
    value = {"creds": {"aws_secret_access_key": corpus.AWS_SECRET, "region": "eu-west-1"}}
    out = scan_value(Scan(), value, "result", SALT)
    assert [(f.kind, f.where) for f in out.findings] == [
        ("aws_secret_key", "result.creds.aws_secret_access_key")]


def test_digest_is_a_salted_hash() -> None:
    one = scan_value(Scan(), f"{AWS}", "result", SALT).findings[0].digest
    again = scan_value(Scan(), f"x {AWS} y", "result", SALT).findings[0].digest
    other_salt = scan_value(Scan(), f"{AWS}", "result", b"another salt....").findings[0].digest
    assert one == again != other_salt
    assert one is not None and len(one) == 16 and AWS not in one


def test_secret_arguments_are_not_scanned() -> None:
    out = scan_value(Scan(), {"token": corpus.GITHUB, "q": "hi"}, "args", SALT,
                     frozenset({"token"}))
    assert out.findings == []


def test_bounds_report_what_was_not_scanned() -> None:
    big = ["a" * 2000, f"late {AWS}"]
    out = scan_value(Scan(max_bytes=1024), big, "result", SALT)
    assert [(f.kind, f.where) for f in out.findings] == [("unscanned", "result[0]")]
    deep: list[Any] = []
    node = deep
    for _ in range(100):
        node.append([])
        node = node[0]
    node.append(f"deep {AWS}")
    assert [f.kind for f in scan_value(Scan(), deep, "result", SALT).findings] == ["unscanned"]
    assert scan_value(Scan(actions={"unscanned": "block"}), deep, "result", SALT).blocked


def test_bytes_past_the_bound_are_reported_unscanned_without_being_decoded() -> None:
    # A 200 MB result once cost the parent a third copy here: the whole value decoded to
    # text before the bound was checked.
    big = b"x" * (32 << 20)
    tracemalloc.start()
    try:
        for value in (big, {"blob": big}, [f"note {AWS}", big]):
            out = scan_value(Scan(max_bytes=1 << 20), value, "result", SALT)
            assert "unscanned" in [f.kind for f in out.findings]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"scanning 32 MB of bytes allocated {peak >> 20} MB"
    # Within the bound bytes are still read as text.
    found = scan_value(Scan(), {"blob": f"key {AWS}".encode()}, "result", SALT).findings
    assert [(f.kind, f.where) for f in found] == [("aws_access_key", "result.blob")]
    # What fits before the big value is still scanned.
    assert "aws_access_key" in [f.kind for f in scan_value(
        Scan(max_bytes=1 << 20), [f"note {AWS}", big], "result", SALT).findings]


@given(st.lists(st.sampled_from([AWS, corpus.GITHUB, "bob@example.com", CARD, "plain text",
                                 corpus.STRIPE, "x"]), max_size=6).map(" ".join))
def test_redacted_text_never_holds_a_match(text: str) -> None:
    out = scan_value(Scan(default="redact"), {"t": text}, "result", SALT)
    for f in out.findings:
        assert f.text not in out.value["t"]


# --- in a session --------------------------------------------------------------------


def echo(text: str) -> dict[str, Any]:
    return {"text": text, "nested": [{"again": text}]}


def leak() -> dict[str, Any]:
    return {"key": AWS, "card": 4111111111111111, "note": "mail ann@example.com"}


def test_result_findings_warn_and_the_trace_never_holds_them(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    with Session(trace=trace) as s:
        s.register("leak", leak)
        assert s.call("leak") == leak()  # warn: the caller gets the value as is
    text = trace.read_text()
    assert AWS not in text and "4111111111111111" not in text and "ann@example.com" not in text
    assert verify_trace(trace).ok
    records = read_trace(trace)
    [scan] = [r["body"] for r in records if r["kind"] == "scan"]
    assert scan["direction"] == "result"
    assert {(f["kind"], f["where"], f["action"]) for f in scan["findings"]} == {
        ("aws_access_key", "result.key", "warn"), ("card_number", "result.card", "warn"),
        ("email", "result.note", "warn")}
    [end] = [r["body"] for r in records if r["kind"] == "call.end"]
    assert end["result"] == {"key": "<redacted:aws_access_key>", "card": "<redacted:card_number>",
                             "note": "mail <redacted:email>"}


def test_result_redact_and_block(tmp_path: Path) -> None:
    with Session(scan=Scan(actions={"pii": "redact"})) as s:
        s.register("leak", leak)
        assert s.call("leak") == {"key": AWS, "card": "<redacted:card_number>",
                                  "note": "mail <redacted:email>"}
    trace = tmp_path / "t.jsonl"
    with Session(trace=trace, scan=Scan(actions={"aws_access_key": "block"})) as s:
        s.register("leak", leak)
        s.register("echo", echo)
        with pytest.raises(SecurityError) as info:
            s.call("leak")
        assert info.value.layer == "scan" and info.value.rule == "scan: aws_access_key"
        assert AWS not in str(info.value)
        assert s.call("echo", text="fine")["text"] == "fine"  # the session goes on
    end = [r["body"] for r in read_trace(trace) if r["kind"] == "call.end"][0]
    assert end["status"] == "blocked" and end["result"] is None
    assert AWS not in trace.read_text()


def test_arguments_are_scanned_before_dispatch(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    scan = Scan(actions={"email": "redact", "github_token": "block"})
    with Session(trace=trace, scan=scan) as s:
        s.register("echo", echo)
        out = s.call("echo", text="write to ann@example.com")
        assert out["text"] == "write to <redacted:email>"  # the tool got the masked value
        with pytest.raises(SecurityError, match="GitHub token") as info:
            s.call("echo", text=f"token {corpus.GITHUB}")
        assert info.value.layer == "scan"
    records = read_trace(trace)
    blocked = [r for r in records if r["call_id"] == "c000002"]
    assert [r["kind"] for r in blocked] == ["call.start", "scan", "call.end"]  # no worker
    assert blocked[0]["body"]["args"] == {"text": "token <redacted:github_token>"}
    assert corpus.GITHUB not in trace.read_text() and "ann@example.com" not in trace.read_text()


def test_declared_secret_arguments_are_left_alone(tmp_path: Path) -> None:
    def auth(token: Annotated[str, Secret], user: str) -> str:
        return "ok"

    with Session(trace=tmp_path / "t.jsonl", scan=Scan(actions={"secrets": "block"})) as s:
        s.register("auth", auth)
        assert s.call("auth", token=corpus.GITHUB, user="ann") == "ok"
    assert not [r for r in read_trace(tmp_path / "t.jsonl") if r["kind"] == "scan"]


def test_scan_false_turns_it_off() -> None:
    with Session(scan=False, trace=None) as s:
        s.register("leak", leak)
        assert s.call("leak")["key"] == AWS


def test_error_messages_in_the_trace_are_masked(tmp_path: Path) -> None:
    def fail(text: str) -> None:
        raise RuntimeError(f"bad input {text}")

    trace = tmp_path / "t.jsonl"
    with Session(trace=trace) as s:
        s.register("fail", fail)
        with pytest.raises(Exception, match="bad input"):
            s.call("fail", text=f"key {AWS}")
    assert AWS not in trace.read_text()


# --- policy files --------------------------------------------------------------------

POLICY = """
[policy]
name = "dlp"

[scan]
default = "warn"
actions = { secrets = "block", email = "redact", phone = "off" }
entropy = { min_length = 20, min_bits = 3.8 }
"""


def test_policy_file_scan_table(tmp_path: Path) -> None:
    path = tmp_path / "dlp.toml"
    path.write_text(POLICY)
    assert check_policy_file(path) == []
    policy = load_policy(path)
    assert policy.scan is not None
    assert policy.scan.action("github_token") == "block" and policy.scan.action("phone") == "off"
    assert policy.scan.entropy.min_length == 20
    with Session(validator=policy) as s:
        s.register("echo", echo)
        assert s.call("echo", text="ann@example.com 415-555-2671")["text"] == \
            "<redacted:email> 415-555-2671"
        with pytest.raises(SecurityError):
            s.call("echo", text=AWS)


def test_policy_file_scan_problems_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[policy]\nname = "x"\n[scan]\ndefault = "deny"\nwhat = 1\n'
                    'actions = { emails = "warn", phone = "mask" }\n'
                    'entropy = { min_length = 2 }\n')
    problems = check_policy_file(path)
    text = "\n".join(problems)
    assert "scan.default" in text and "scan.what" in text and "scan.actions.emails" in text
    assert "scan.actions.phone" in text and "scan.entropy" in text


def test_session_scan_composes_with_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "dlp.toml"
    path.write_text(POLICY)
    with Session(validator=load_policy(path), scan=Scan(actions={"phone": "block"})) as s:
        s.register("echo", echo)
        with pytest.raises(SecurityError, match="phone"):
            s.call("echo", text="415-555-2671")
        with pytest.raises(SecurityError, match="AWS"):  # the policy's block still holds
            s.call("echo", text=AWS)


def test_trace_findings_are_json_without_values(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    with Session(trace=trace) as s:
        s.register("echo", echo)
        s.call("echo", text=f"{corpus.JWT} {corpus.STRIPE} {CARD}")
    for rec in read_trace(trace):
        if rec["kind"] == "scan":
            body = json.dumps(rec["body"])
            assert corpus.JWT not in body and corpus.STRIPE not in body and CARD not in body
