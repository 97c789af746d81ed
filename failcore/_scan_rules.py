"""How the secret and PII scanner reads a text: as it stands, split across lines, in base64.

Pure functions of text. ``find(text, kinds, entropy)`` returns ``Match(kind, start, end,
encoding)`` spans; ``failcore._scan`` decides what to do with them (warn, redact, block)
and walks structured values (it joins a value's strings with ``\\x00``, which no
detector matches across, and scans them in one pass).

How a text is read, each step only where a cheap test says it can find something:

1. **Direct.** Every kind as the text stands (``failcore._scan_kinds``: key formats by
   their literal prefixes, cards and phones in runs of digits, e-mail around ``@``).
2. **Split across lines.** A secret a formatter wrapped, or code concatenated
   (``"AKIA..." +\\n "..."``), is found in a view of the text with line breaks (and the
   indentation, backslashes, quotes and ``+`` around them) removed. Only matches that
   span a removed break count, and only for kinds whose shape a join cannot invent
   (key formats, card numbers).
3. **Base64.** Runs of base64 (also wrapped over lines) that decode to text are decoded
   and read again, two levels deep; a finding inside is reported with the kind it holds
   and ``encoding="base64"``, its span the whole run.
4. **High entropy.** Tokens of base64/URL-safe characters between ``min_length`` and
   ``max_length``, mixed case, not made of camel-case words, whose Shannon entropy
   reaches ``EntropyRule.required_bits``. Hex strings (hashes) and UUIDs are never
   flagged: their alphabet caps them at 4 bits per character and they have one case.

What this does not find: secrets with no recognisable shape and low entropy (a password
like ``hunter2``), secrets broken by anything but line breaks, other encodings (hex,
URL-encoding, compression, encryption), keys whose literal prefix is itself broken
across a line, and phone numbers in national forms other than NANP and trunk-``0``.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import functools
import math
import re
from collections import Counter
from dataclasses import dataclass

from failcore._scan_kinds import (
    ENTROPY_KIND,
    SECRET_KINDS,
    Match,
    direct,
    present_key_kinds,
)


@dataclass(frozen=True)
class EntropyRule:
    """When a token counts as a high-entropy secret.

    ``min_bits`` is the Shannon entropy per character a 24-character token needs; a
    longer one needs more (``min_bits + 0.75 * log2(length / 24)``, at most
    ``min_bits + 1``), because random text gains entropy with length while words do
    not. The default (3.9) finds ~95% of random 24-character base64 tokens and ~98% of
    40-character ones. Tokens made of camel-case words (mean word length >= 3.5:
    ``AbstractSingletonProxyFactoryBean2``) are identifiers, not secrets; tokens longer
    than ``max_length`` are data (images, blobs), not credentials.
    """

    min_length: int = 24
    max_length: int = 256
    min_bits: float = 3.9

    def __post_init__(self) -> None:
        for name in ("min_length", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= 100_000:
                raise ValueError(f"entropy {name} must be an int from 8 to 100000, got {value!r}")
        if self.min_length > self.max_length:
            raise ValueError(f"entropy min_length ({self.min_length}) exceeds max_length "
                             f"({self.max_length})")
        if isinstance(self.min_bits, bool) or not isinstance(self.min_bits, int | float) \
                or not 1.0 <= self.min_bits <= 6.0:
            raise ValueError(f"entropy min_bits must be a number from 1 to 6, got {self.min_bits!r}")

    def required_bits(self, length: int) -> float:
        return min(self.min_bits + 0.75 * math.log2(length / 24), self.min_bits + 1.0)


_SPLIT_KINDS = frozenset(SECRET_KINDS) - {"private_key"} | {"card_number"}
_SPLIT_DIGITS = re.compile(r"\d[ \t]*\\?\r?\n[ \t]*\+?[ \t]*[\"']?\d")
_BREAK = re.compile(r"\r?\n[ \t]*(?:\+[ \t]*)?")
_TOKEN = re.compile(r"[A-Za-z0-9+/_-]{8,}={0,2}")
_WORD = re.compile(r"[A-Z]?[a-z]+")
_HEX = re.compile(r"[0-9a-fA-F-]+")
_HASH_PREFIX = re.compile(r"(?:sha(?:1|224|256|384|512)|md5)[-:_]", re.IGNORECASE)  # SRI, digests
_B64_MIN = 16
_MAX_DEPTH = 2
_MAX_DECODE = 64 * 1024


def shannon_bits(text: str) -> float:
    """Shannon entropy of ``text`` in bits per character."""
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


def _wordlike(token: str) -> bool:
    words = _WORD.findall(token)
    return bool(words) and sum(map(len, words)) / len(words) >= 3.5


def _high_entropy(token: str, rule: EntropyRule) -> bool:
    if not rule.min_length <= len(token) <= rule.max_length or _HASH_PREFIX.match(token):
        return False
    if token.islower() or token.isupper() or _HEX.fullmatch(token):
        return False  # hashes, UUIDs, numbers, words in one case
    return shannon_bits(token) >= rule.required_bits(len(token)) and not _wordlike(token)


def _joined(text: str) -> tuple[str, list[int], list[int]]:
    """``text`` without its line breaks (and the indentation, ``\\``, quotes and ``+``
    around them), the joined positions where breaks were cut, and the characters removed
    up to each cut: joined position ``p`` after cut ``i`` is ``p + shifts[i]`` in ``text``."""
    parts: list[str] = []
    cuts: list[int] = []
    shifts: list[int] = []
    last = removed = 0
    for m in _BREAK.finditer(text):
        left, right = m.start(), m.end()
        while left > last and text[left - 1] in " \t\\":
            left -= 1
        # "abc" +\n "def" and "abc"\n"def": the quotes go too, when both are there.
        probe = left
        if probe > last and text[probe - 1] == "+":
            probe -= 1
            while probe > last and text[probe - 1] in " \t":
                probe -= 1
        if probe > last and text[probe - 1] in "\"'" and right < len(text) \
                and text[right] == text[probe - 1]:
            left, right = probe - 1, right + 1
        parts.append(text[last:left])
        cuts.append(left - removed)
        removed += right - left
        shifts.append(removed)
        last = right
    parts.append(text[last:])
    return "".join(parts), cuts, shifts


def _split(text: str, kinds: frozenset[str]) -> list[Match]:
    # Only kinds whose prefix occurs somewhere (a key broken inside its prefix is missed),
    # and cards only where digits meet across a break: most multi-line text has neither.
    wanted = present_key_kinds(text) & kinds & _SPLIT_KINDS
    if "card_number" in kinds and _SPLIT_DIGITS.search(text):
        wanted.add("card_number")
    if not wanted:
        return []
    joined, cuts, shifts = _joined(text)
    if not cuts:
        return []
    out: list[Match] = []
    for m in direct(joined, frozenset(wanted), _tokens(joined)):
        i = bisect.bisect_right(cuts, m.start)
        j = bisect.bisect_left(cuts, m.end)
        if i == j:  # no break inside: the direct scan reports it
            continue
        start = m.start + (shifts[i - 1] if i else 0)
        out.append(Match(m.kind, start, m.end + shifts[j - 1], "split"))
    return out


def _decode_b64(run: str) -> str | None:
    data = "".join(run.split())
    body = data.rstrip("=")
    if len(data) > _MAX_DECODE or len(body) % 4 == 1:
        return None
    try:
        if "-" in body or "_" in body:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        else:
            raw = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
        text = raw.decode("utf-8")
    except (ValueError, binascii.Error):
        return None
    printable = sum(c.isprintable() or c in "\n\r\t" for c in text)
    return text if printable >= 0.95 * len(text) else None


def _tokens(text: str) -> list[tuple[int, int]]:
    """Spans of base64-alphabet tokens (at least 8 characters)."""
    return [m.span() for m in _TOKEN.finditer(text)]


def _wrapped(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Runs of base64 wrapped over lines: a long token, then tokens that each start the
    next line (only whitespace and one line break between them)."""
    runs: list[tuple[int, int]] = []
    i, n = 0, len(spans)
    while i < n:
        j = i
        if spans[i][1] - spans[i][0] >= _B64_MIN:
            while j + 1 < n:
                gap = text[spans[j][1]:spans[j + 1][0]]
                if gap.count("\n") != 1 or gap.strip() or text[spans[j][1] - 1] == "=":
                    break
                j += 1
        if j > i:
            runs.append((spans[i][0], spans[j][1]))
        i = j + 1
    return runs


@functools.lru_cache(maxsize=8)
def _prefilter(token: int) -> re.Pattern[str]:
    # Something every finding holds: a run of base64 characters (keys, base64, entropy),
    # ten digits (cards, phones; eight after "+"), "@", a JWT's start, a PEM label.
    return re.compile(rf"[A-Za-z0-9+/_-]{{{token}}}|\d(?:[ ().-]{{0,2}}\d){{9}}"
                      rf"|\+\d(?:[ ().-]{{0,2}}\d){{6}}|@|eyJ|PRIVATE KEY")


def find(text: str, kinds: frozenset[str], entropy: EntropyRule, depth: int = 0) -> list[Match]:
    """Every finding of the given ``kinds`` in ``text``, in order, without overlaps."""
    if "\n" not in text and _prefilter(min(_B64_MIN, entropy.min_length)).search(text) is None:
        return []  # the common case, decided by one regex pass
    spans = _tokens(text)
    found = direct(text, kinds, spans)
    runs: list[tuple[int, int]] = []
    if "\n" in text:
        found += _split(text, kinds)
        runs = _wrapped(text, spans)
    decoded_runs: list[tuple[int, int]] = []
    long_spans = [sp for sp in spans if sp[1] - sp[0] >= _B64_MIN]
    if depth < _MAX_DEPTH and (runs or long_spans):
        # Base64: wrapped runs, and single tokens long enough to hold something.
        taken = _Spans(found)
        in_run = _Spans([Match("", s, e) for s, e in runs])
        for start, end in runs + long_spans:
            if taken.overlaps(start, end) or ((start, end) not in runs
                                               and in_run.overlaps(start, end)):
                continue
            token = text[start:end]
            if token.islower() or token.isupper():
                continue  # words and constants; base64 of text mixes cases
            decoded = _decode_b64(token)
            if decoded is None:
                continue
            decoded_runs.append((start, end))
            inner = find(decoded, kinds, entropy, depth + 1)
            if inner:
                found.append(Match(inner[0].kind, start, end, "base64"))
    candidates = [sp for sp in (long_spans if entropy.min_length >= _B64_MIN else spans)
                  if sp[1] - sp[0] >= entropy.min_length]
    if ENTROPY_KIND in kinds and candidates:
        taken = _Spans(found + [Match("", s, e) for s, e in decoded_runs])
        for start, end in candidates:
            if taken.overlaps(start, end) or text[max(0, start - 7):start] == "base64,":
                continue  # already found, or a data: URI (data, not a credential)
            token = text[start:end].rstrip("=")
            if _high_entropy(token, entropy):
                found.append(Match(ENTROPY_KIND, start, start + len(token)))
    if len(found) < 2:
        return found
    found.sort(key=lambda f: (f.start, -f.end))
    kept: list[Match] = []
    for f in found:
        if kept and f.start < kept[-1].end:
            continue
        kept.append(f)
    return kept


class _Spans:
    """Spans already taken, for "does this one overlap any of them" in O(log n)."""

    def __init__(self, matches: list[Match]) -> None:
        spans = sorted((m.start, m.end) for m in matches)
        self._starts = [s for s, _ in spans]
        self._max_end: list[int] = []
        for _, e in spans:
            self._max_end.append(max(e, self._max_end[-1]) if self._max_end else e)

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_left(self._starts, end)
        return i > 0 and self._max_end[i - 1] > start
