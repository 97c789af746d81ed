"""Every common encoding of a secret, and scrubbing them from what FailCore records or raises.

Why: a secret (a granted environment variable's value, an argument marked secret) leaks in
other spellings than its own. A tool puts it in a URL query (percent-encoded, ``quote``
or ``quote_plus``, either hex case), in an ``Authorization: Basic`` header (base64 of
``user:secret``: the secret sits at any byte offset of the encoded text), in a log line
as hex, in JSON text (``\\uXXXX``, ``\\"``) or in a ``repr``. Matching the exact value
only let a percent-encoded secret into the trace.

:func:`encoded_forms` lists the spellings of one secret, and each of them escaped once
more by JSON or ``repr`` (as a message quoting a URL shows it). For base64 it lists, for
each of the three alignments of the secret inside a longer plaintext, the run of base64
characters that depend on the secret's bytes alone, in the standard and the URL-safe
alphabet (padding never belongs to that run, so padded and unpadded texts both match).
:class:`Scrubber` replaces every form in every string of a record (keys included) and in
a raised error's message and remote traceback. Forms are computed once per secret value
(cached), and strings a call's records repeat are remembered clean, so a call with
secrets pays only the substring checks of its new strings.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

from failcore._errors import ValidationError

PLACEHOLDER = "<secret>"
# Forms shorter than this are not scrubbed: they would match ordinary text everywhere.
MIN_FORM = 4
_SPARE_MARKS = ("<redacted>", "<hidden>", "###")  # used if a form occurs in PLACEHOLDER
_PERCENT = re.compile(r"%[0-9A-F]{2}")
_UNICODE_ESCAPE = re.compile(r"\\u[0-9a-f]{4}")
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _base64_cores(raw: bytes) -> list[str]:
    """For each alignment k (the secret starts at byte k mod 3 of a longer plaintext),
    the base64 characters determined by the secret's bytes alone: character j covers
    bits [6j, 6j+6), the secret covers bits [8k, 8(k+n))."""
    cores = []
    n = len(raw)
    for k in range(3):
        text = base64.b64encode(b"\0" * k + raw)
        first, end = -(-8 * k // 6), 8 * (k + n) // 6
        core = text[first:end]
        cores.append(core.decode("ascii"))
        cores.append(core.translate(_URLSAFE).decode("ascii"))
    return cores


@functools.lru_cache(maxsize=256)
def encoded_forms(secret: str) -> tuple[str, ...]:
    """The spellings of ``secret`` to scrub, longest first (see the module docstring)."""
    raw = secret.encode("utf-8", "surrogatepass")
    forms = {secret, raw.hex(), raw.hex().upper(), repr(secret)[1:-1]}
    for encoded in (quote(raw, safe=""), quote(raw), quote_plus(raw), quote_plus(raw, safe="/")):
        forms.add(encoded)
        forms.add(_PERCENT.sub(lambda m: m.group().lower(), encoded))
    for ascii_only in (True, False):
        escaped = json.dumps(secret, ensure_ascii=ascii_only)[1:-1]
        for variant in (escaped, _UNICODE_ESCAPE.sub(lambda m: m.group().upper(), escaped)):
            forms.add(variant)
            forms.add(variant.replace("/", "\\/"))
    forms.update(_base64_cores(raw))
    # Each spelling once more escaped: error messages repr() their arguments (a URL
    # holding the JSON spelling), and records hold JSON text inside JSON strings.
    for form in list(forms):
        forms.update((json.dumps(form)[1:-1], json.dumps(form, ensure_ascii=False)[1:-1],
                      repr(form)[1:-1]))
    return tuple(sorted((f for f in forms if len(f) >= MIN_FORM), key=len, reverse=True))


# Short strings found clean are remembered (per set of secrets): a call's records repeat
# the same keys and values (tool name, status, field names) call after call.
_CLEAN_MEMO = 4096
_CLEAN_LEN = 256


class Scrubber:
    """Replaces every encoded form of the given secrets with a placeholder."""

    __slots__ = ("forms", "mark", "shortest", "_clean")

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            forms.update(encoded_forms(secret))
        self.forms = tuple(sorted(forms, key=len, reverse=True))
        self.shortest = len(self.forms[-1]) if self.forms else 1 << 62
        # The placeholder must not itself contain a form (a secret such as "cret").
        self.mark = next(m for m in (PLACEHOLDER, *_SPARE_MARKS)
                         if not any(f in m for f in self.forms))
        self._clean: set[str] = set()

    def text(self, s: str) -> str:
        if len(s) < self.shortest or s in self._clean:
            return s
        changed = False
        for form in self.forms:
            if form in s:
                s = s.replace(form, self.mark)
                changed = True
        if not changed:
            if len(s) <= _CLEAN_LEN and len(self._clean) < _CLEAN_MEMO:
                self._clean.add(s)
            return s
        if any(form in s for form in self.forms):
            return self.mark  # a replacement joined its neighbours into a new occurrence
        return s

    def value(self, value: Any) -> Any:
        """``value`` (JSON-like data) with every string scrubbed, dict keys included."""
        t = type(value)
        if t is str:
            return self.text(value)
        if t is dict:
            out = {}
            shortest, clean = self.shortest, self._clean
            for k, v in value.items():
                if type(k) is not str or (len(k) >= shortest and k not in clean):
                    k = self.value(k)
                tv = type(v)
                if tv is str:
                    if len(v) >= shortest and v not in clean:
                        v = self.text(v)
                elif tv is dict or tv is list or tv is tuple:
                    v = self.value(v)
                out[k] = v
            return out
        if t is list or t is tuple:
            return [self.value(v) for v in value]
        if isinstance(value, str):
            return self.text(str(value))
        if isinstance(value, dict):
            return self.value(dict(value))
        if isinstance(value, list | tuple):
            return self.value(list(value))
        return value

    def error(self, err: BaseException) -> None:
        """Scrub a FailCore error in place: its message and its text attributes."""
        err.args = tuple(self.text(a) if isinstance(a, str) else a for a in err.args)
        for attr in ("target", "remote_message", "remote_traceback", "rule"):
            value = getattr(err, attr, None)
            if isinstance(value, str):
                setattr(err, attr, self.text(value))
        if isinstance(err, ValidationError):
            err.errors = self.value(err.errors)


@functools.lru_cache(maxsize=64)
def scrubber_for(secrets: tuple[str, ...]) -> Scrubber:
    """The scrubber of a set of secrets, shared by the calls that have the same ones (the
    same granted env values, the same secret argument): its forms and its memo of clean
    strings are built once."""
    return Scrubber(secrets)
