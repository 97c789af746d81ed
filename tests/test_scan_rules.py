"""The scanner's detectors: a corpus of true and false positives, split and base64 forms,
and properties (Luhn, hashes and UUIDs never flagged, random tokens flagged)."""

from __future__ import annotations

import base64
import importlib.util
import secrets
import string
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from failcore._scan_kinds import KINDS, card_ok, luhn_ok
from failcore._scan_rules import EntropyRule, find

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("failcore_scan_corpus",
                                               ROOT / "tests" / "fixtures" / "scan_corpus.py")
assert _spec is not None and _spec.loader is not None
corpus: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corpus)

ALL = frozenset(KINDS)
RULE = EntropyRule()


def kinds_in(text: str) -> list[tuple[str, str]]:
    return [(m.kind, m.encoding) for m in find(text, ALL, RULE)]


@pytest.mark.parametrize(("kind", "encoding", "text"), corpus.TRUE_POSITIVES,
                         ids=[f"{k}-{e or 'direct'}-{i}" for i, (k, e, _) in
                              enumerate(corpus.TRUE_POSITIVES)])
def test_true_positive(kind: str, encoding: str, text: str) -> None:
    assert (kind, encoding) in kinds_in(text)


@pytest.mark.parametrize("text", corpus.FALSE_POSITIVES)
def test_false_positive(text: str) -> None:
    assert kinds_in(text) == []


def test_every_kind_is_in_the_corpus() -> None:
    covered = {k for k, _, _ in corpus.TRUE_POSITIVES}
    assert covered == set(KINDS)
    assert {e for _, e, _ in corpus.TRUE_POSITIVES} == {"", "split", "base64"}


def test_the_span_covers_the_secret_and_nothing_around_it() -> None:
    text = f"before {corpus.AWS_ID} after"
    [m] = find(text, ALL, RULE)
    assert text[m.start:m.end] == corpus.AWS_ID
    text = f"aws_secret_access_key = {corpus.AWS_SECRET}\n"
    [m] = find(text, ALL, RULE)
    assert text[m.start:m.end] == corpus.AWS_SECRET  # the value, not the keyword


def test_a_split_span_covers_both_halves() -> None:
    text = f'x = "{corpus.AWS_ID[:8]}" +\n    "{corpus.AWS_ID[8:]}"  # done'
    [m] = find(text, ALL, RULE)
    assert m.encoding == "split"
    assert text[m.start:m.end] == f'{corpus.AWS_ID[:8]}" +\n    "{corpus.AWS_ID[8:]}'


def test_a_base64_span_is_the_whole_run() -> None:
    blob = base64.encodebytes(f"token={corpus.GITHUB} and more text".encode() * 3).decode()
    text = f"payload:\n{blob}end"
    [m] = find(text, ALL, RULE)
    assert (m.kind, m.encoding) == ("github_token", "base64")
    assert text[m.start:m.end].split() == blob.split()


def test_matches_do_not_cross_the_separator() -> None:
    # The structured scanner joins strings with NUL: nothing may match across it.
    assert kinds_in(f"{corpus.AWS_ID[:10]}\x00{corpus.AWS_ID[10:]}") == []
    assert kinds_in("4111 1111\x001111 1111") == []
    assert kinds_in("alice\x00@example.com") == []


def test_off_kinds_are_not_reported() -> None:
    text = f"{corpus.AWS_ID} bob@example.com"
    assert [m.kind for m in find(text, frozenset({"email"}), RULE)] == ["email"]


def test_entropy_thresholds_are_configurable() -> None:
    token = corpus.mixed(20)
    assert kinds_in(f"k {token}") == []  # below the default min_length
    low = EntropyRule(min_length=16)
    assert [m.kind for m in find(f"k {token}", ALL, low)] == ["high_entropy"]
    strict = EntropyRule(min_bits=6.0)
    assert find(f"k {corpus.GENERIC}", ALL, strict) == []
    with pytest.raises(ValueError, match="min_length"):
        EntropyRule(min_length=4)
    with pytest.raises(ValueError, match="exceeds"):
        EntropyRule(min_length=300, max_length=256)


# --- properties -----------------------------------------------------------------------


def test_luhn_matches_known_numbers() -> None:
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert card_ok("4111 1111 1111 1111") and not card_ok("4111 1111 1111 1112")
    assert not card_ok("4111-1111 1111-1111")  # two kinds of separator


@given(st.text(alphabet=string.digits, min_size=12, max_size=18))
def test_a_luhn_completed_visa_is_found(body: str) -> None:
    digits = "4" + body[:14]
    digits += next(d for d in string.digits if luhn_ok(digits + d))
    if len(digits) in (13, 16, 19) and len(set(digits)) > 1:
        assert ("card_number", "") in kinds_in(f"pay {digits} now")


@given(st.binary(min_size=16, max_size=64))
def test_hex_digests_are_never_flagged(data: bytes) -> None:
    assert kinds_in(f"digest {data.hex()} ok") == []


def test_uuids_are_never_flagged() -> None:
    text = " ".join(str(uuid.uuid4()) for _ in range(200))
    assert kinds_in(text) == []


def test_random_tokens_are_mostly_flagged() -> None:
    # The default rule is tuned to find >=90% of random 24-char and >=95% of 40-char tokens.
    def rate(n: int) -> float:
        found = sum(bool(kinds_in(f"key {secrets.token_urlsafe(64)[:n]} end")) for _ in range(400))
        return found / 400

    assert rate(24) >= 0.90
    assert rate(40) >= 0.95


@given(st.text(min_size=0, max_size=300))
def test_find_never_fails_and_spans_are_ordered(text: str) -> None:
    matches = find(text, ALL, RULE)
    last = 0
    for m in matches:
        assert last <= m.start < m.end <= len(text)
        last = m.end


def test_python_source_has_few_findings() -> None:
    # Ordinary text at scale: the interpreter's own sources (emails of authors are real PII).
    import argparse
    import json as json_module
    import textwrap

    for module in (argparse, json_module.decoder, textwrap):
        assert module.__file__ is not None
        text = Path(module.__file__).read_text(encoding="utf-8")
        assert {k for k, _ in kinds_in(text)} <= {"email"}
