"""Secrets never reach the trace or the caller's errors in any common encoding (issue 12 item 3).

A real tool echoes its secret argument percent-encoded (``quote``/``quote_plus``, both hex
cases), in base64 (std and urlsafe, padded or not, and inside a longer base64 text at
each of the three byte alignments, as in a ``Basic`` auth header), in hex and
JSON-escaped: in its result, in an exception message, in paths and a URL it tries to
open. Hypothesis picks secrets with characters that each encoding changes. The encodings
are computed here with the standard library, independently of ``failcore._scrub``.
"""

from __future__ import annotations

import base64
import json
import secrets as random_secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failcore import FailCoreError, SecurityError, Session, ToolFailed, ToolMetadata
from failcore._scrub import Scrubber, encoded_forms

# Characters that change under percent-encoding, base64, hex or JSON escaping.
CHANGING = ' +/%"\'\\&=?#:é€😀\t'
ALPHABET = CHANGING + "abcXYZ019-_.~"


def spellings(secret: str) -> dict[str, str]:
    """Every encoding a tool might put a secret in. Runs in the worker too (the tool)."""
    import base64 as b64
    import json as js
    import re
    from urllib.parse import quote as q
    from urllib.parse import quote_plus as qp

    raw = secret.encode()
    out = {"exact": secret, "hex": raw.hex(), "HEX": raw.hex().upper(),
           "json": js.dumps(secret)[1:-1], "json_utf8": js.dumps(secret, ensure_ascii=False)[1:-1]}
    for name, encoded in (("quote", q(secret, safe="")), ("quote_slash", q(secret)),
                          ("quote_plus", qp(secret))):
        out[name] = encoded
        out[name + "_lower"] = re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), encoded)
    for prefix in ("", "u", "us", "user:"):
        for suffix in ("", "!", "!!"):
            plain = (prefix + secret + suffix).encode()
            out[f"b64[{prefix}|{suffix}]"] = b64.b64encode(plain).decode()
            out[f"b64url[{prefix}|{suffix}]"] = b64.urlsafe_b64encode(plain).decode().rstrip("=")
    out["basic_header"] = "Basic " + b64.b64encode(b"user:" + raw).decode()
    return out


def secret_only_base64(secret: str) -> list[str]:
    """For each alignment, the base64 characters that only the secret's bytes determine:
    found empirically (positions equal whether the neighbouring bytes are 0x00 or 0xff)."""
    raw = secret.encode()
    runs = []
    for k in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            low = encode(b"\x00" * k + raw + b"\x00\x00").decode()
            high = encode(b"\xff" * k + raw + b"\xff\xff").decode()
            same = "".join(a if a == b else "\0" for a, b in zip(low, high, strict=True))
            runs.extend(run for run in same.split("\0") if len(run) >= 4)
    return runs


def echo(key: str, how: str) -> Any:
    """The tool: echoes its secret in every spelling, the way ``how`` says."""
    forms = spellings(key)
    if how == "result":
        return forms
    if how == "raise":
        raise ValueError("could not log in with " + " | ".join(forms.values()))
    if how == "open":
        for name, form in forms.items():
            try:
                open("/nonexistent-failcore/" + name + "/" + form)  # noqa: SIM115 - refused
            except OSError:
                pass
        return None
    if how == "url":
        import urllib.request

        query = "&".join(f"{name}={form}" for name, form in forms.items())
        urllib.request.urlopen(f"http://127.0.0.1:9/login?{query}", timeout=1)  # loopback only
    return None


def leaks(secret: str, data: bytes) -> list[str]:
    """The spellings of ``secret`` (and their JSON-escaped forms) found in ``data``."""
    found = []
    named = dict(spellings(secret))
    named.update({f"b64-core{i}": run for i, run in enumerate(secret_only_base64(secret))})
    for name, form in named.items():
        for shown in {form, json.dumps(form, ensure_ascii=False)[1:-1], json.dumps(form)[1:-1]}:
            if shown.encode() in data:
                found.append(f"{name}: {shown!r}")
    return found


@pytest.fixture
def traced(tmp_path: Path) -> Iterator[tuple[Session, Path]]:
    path = tmp_path / "trace.jsonl"
    with Session(trace=path) as session:
        session.register("echo", echo, ToolMetadata(
            isolation="tool", secret=["key"]))
        yield session, path


# ".." is left out: the pre-check judges a secret like "a/../b" as a path (and refuses it).
secret_text = st.text(alphabet=ALPHABET, min_size=4, max_size=20).filter(
    lambda s: any(c in CHANGING for c in s) and s.strip() == s and ".." not in s)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(secret=secret_text)
def test_no_encoding_of_a_secret_reaches_the_trace_or_the_caller(
        traced: tuple[Session, Path], secret: str) -> None:
    session, path = traced
    start = path.stat().st_size if path.exists() else 0
    raised: list[FailCoreError] = []
    result = session.call("echo", key=secret, how="result")
    assert result["quote"] == quote(secret, safe="")  # the caller still gets the real value
    for how, error in (("raise", ToolFailed), ("open", SecurityError), ("url", FailCoreError)):
        with pytest.raises(error) as info:
            session.call("echo", key=secret, how=how)
        raised.append(info.value)
    data = path.read_bytes()[start:]
    assert not leaks(secret, data), leaks(secret, data)
    for err in raised:
        shown = " ".join(str(x) for x in (err, getattr(err, "remote_message", ""),
                                          getattr(err, "remote_traceback", ""),
                                          getattr(err, "target", "")))
        assert not leaks(secret, shown.encode()), (type(err).__name__, leaks(secret, shown.encode()))


def test_the_trace_says_where_a_secret_was() -> None:
    scrub = Scrubber(["p@ss word/+"])
    header = "Authorization: Basic " + base64.b64encode(b"admin:p@ss word/+").decode()
    assert scrub.text(header).startswith("Authorization: Basic YWRtaW46")
    assert "<secret>" in scrub.text(header)
    assert scrub.text("url?pw=" + quote_plus("p@ss word/+")) == "url?pw=<secret>"
    assert scrub.text("nothing here") == "nothing here"


def test_a_secret_inside_the_placeholder_is_still_hidden() -> None:
    scrub = Scrubber(["cret"])
    assert "cret" not in scrub.text("a cret b") and scrub.text("a cret b") != "a cret b"
    joined = Scrubber(["ab>c"])  # a replacement could rebuild it with its neighbours
    for text in ("ab>cab>c", "xab>c>c", "ab>ab>cc"):
        assert "ab>c" not in joined.text(text)


def test_forms_are_computed_once_per_secret_value() -> None:
    value = "fcsecret-" + random_secrets.token_hex(8)
    first = encoded_forms(value)
    assert encoded_forms(value) is first
    assert value in first and value.encode().hex() in first
