"""The detectors of the secret and PII scanner: what counts as a finding in a text.

Pure functions of text. ``find(text, kinds, entropy)`` returns ``Match(kind, start, end,
encoding)`` spans; ``failcore._scan`` decides what to do with them (warn, redact, block)
and walks structured values (it joins a value's strings with ``\\x00``, which no
detector matches across, and scans them in one pass).

How a text is read, each step only where a cheap test says it can find something:

1. **Direct.** Key formats are looked for only when their literal prefix occurs
   (``AKIA``, ``ghp_``, ``-----BEGIN``...), then matched by their own regex and checked
   at their boundaries. Card numbers and phone numbers are looked for inside runs of
   digits and separators, e-mail around each ``@``; each candidate is confirmed where a
   regex alone would be noisy (Luhn and issuer prefix and length for cards, digit counts
   for phones, a JSON header for JWTs).
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
import json
import math
import re
from collections import Counter
from dataclasses import dataclass

SECRET_KINDS = (
    "aws_access_key", "aws_secret_key", "gcp_api_key", "gcp_service_account", "private_key",
    "github_token", "gitlab_token", "slack_token", "stripe_key", "openai_key",
    "anthropic_key", "jwt",
)
PII_KINDS = ("card_number", "email", "phone")
ENTROPY_KIND = "high_entropy"
KINDS = (*SECRET_KINDS, *PII_KINDS, ENTROPY_KIND)
GROUPS = {"secrets": SECRET_KINDS, "pii": PII_KINDS}
DESCRIPTIONS = {
    "aws_access_key": "an AWS access key id", "aws_secret_key": "an AWS secret access key",
    "gcp_api_key": "a Google API key", "gcp_service_account": "a GCP service-account key",
    "private_key": "a PEM private key", "github_token": "a GitHub token",
    "gitlab_token": "a GitLab token", "slack_token": "a Slack token or webhook",
    "stripe_key": "a Stripe secret key", "openai_key": "an OpenAI API key",
    "anthropic_key": "an Anthropic API key", "jwt": "a JSON Web Token",
    "card_number": "a payment card number", "email": "an e-mail address",
    "phone": "a phone number", "high_entropy": "a high-entropy string (a likely secret)",
    "unscanned": "data past the scan bounds (not inspected)",
}


@dataclass(frozen=True, slots=True)
class Match:
    """A finding's span in the scanned text; ``encoding`` is "", "split" or "base64"."""

    kind: str
    start: int
    end: int
    encoding: str = ""


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


# Key formats: (literal prefixes, regex, characters that may not precede the match).
# A kind's regex runs only when one of its prefixes occurs in the text. A group named
# "v" marks the secret inside a longer match (the value after a keyword; the keyword may
# be the dict key just before it, which the structured scan joins with NUL).
_WORD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_PEM_END = r"-----END [A-Z0-9 ]{0,30}PRIVATE KEY(?: BLOCK)?-----"
_KEYS: dict[str, tuple[tuple[str, ...], str, frozenset[str]]] = {
    "private_key": (("PRIVATE KEY",), (
        r"-----BEGIN [A-Z0-9 ]{0,30}PRIVATE KEY(?: BLOCK)?-----"
        r"(?:[^\x00]{0,16384}?" + _PEM_END + r"|[A-Za-z0-9+/=\s\\:,-]*)"), frozenset()),
    "aws_access_key": (("AKIA", "ASIA", "ABIA", "ACCA", "AROA", "AIDA", "AIPA", "ANPA", "ANVA",
                        "APKA"),
                       r"(?:AKIA|ASIA|ABIA|ACCA|AROA|AIDA|AIPA|ANPA|ANVA|APKA)[A-Z0-9]{16}"
                       r"(?![A-Z0-9])", frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")),
    "aws_secret_key": (("secret", "SECRET", "Secret"), (
        r"(?i:aws[^\x00\n]{0,20}?secret[^\x00\n]{0,20}?|secret_?access_?key)[\"']?\s*[:=\x00]\s*"
        r"[\"']?(?P<v>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"), frozenset()),
    "gcp_api_key": (("AIza",), r"AIza[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])", _WORD_CHARS),
    "gcp_service_account": (("private_key_id",),
                            r"\"private_key_id\"\s*:\s*\"(?P<v>[0-9a-f]{40})\"", frozenset()),
    "github_token": (("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
                     r"(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{82})"
                     r"(?![A-Za-z0-9_])", _WORD_CHARS),
    "gitlab_token": (("glpat-", "glptt-", "gldt-", "glrt-", "glsoat-", "glcbt-", "glft-",
                      "glimt-", "glagent-"),
                     r"gl(?:pat|ptt|dt|rt|soat|cbt|ft|imt|agent)-[A-Za-z0-9_-]{20,64}"
                     r"(?![A-Za-z0-9_-])", _WORD_CHARS),
    "slack_token": (("xox", "xapp-", "hooks.slack.com"), (
        r"xox[abposr]-[A-Za-z0-9-]{10,250}(?![A-Za-z0-9-])"
        r"|xapp-\d-[A-Z0-9]{6,}-\d{6,}-[a-z0-9]{32,}"
        r"|https://hooks\.slack\.com/(?:services|workflows)/[A-Za-z0-9/_-]{20,}"), _WORD_CHARS),
    "stripe_key": (("sk_live_", "sk_test_", "rk_live_", "rk_test_", "whsec_"),
                   r"(?:(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,247}|whsec_[A-Za-z0-9]{32,})"
                   r"(?![A-Za-z0-9_])", _WORD_CHARS),
    "anthropic_key": (("sk-ant-",), r"sk-ant-[a-z]{2,8}\d{0,2}-[A-Za-z0-9_-]{32,200}"
                      r"(?![A-Za-z0-9_-])", _WORD_CHARS),
    "openai_key": (("sk-",), r"sk-(?:(?:proj|svcacct|admin)-[A-Za-z0-9_-]{20,200}"
                   r"|[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}|[A-Za-z0-9]{48})(?![A-Za-z0-9_-])",
                   _WORD_CHARS),
    "jwt": (("eyJ",), r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{0,1024}"
            r"(?![A-Za-z0-9_-])", _WORD_CHARS),
}
_KEY_RE = {kind: re.compile(p) for kind, (_, p, _) in _KEYS.items()}
# One pass finds which key formats can occur at all: their literal prefixes, grouped by
# first character (an alternation of ~40 literals is ~10x slower in ``re``).
_PREFIX_KIND = {p: kind for kind, (prefixes, _, _) in _KEYS.items() for p in prefixes}
_BY_FIRST: dict[str, list[str]] = {}
for _p in sorted(_PREFIX_KIND, key=len, reverse=True):
    _BY_FIRST.setdefault(_p[0], []).append(re.escape(_p[1:]))
_TRIGGER = re.compile("|".join(f"{re.escape(c)}(?:{'|'.join(rest)})" for c, rest in _BY_FIRST.items()))
# The same, one regex per first character: each starts with a literal, which ``re`` finds
# at C speed, so eleven passes over a long text beat one pass of the alternation.
_TRIGGER_PARTS = tuple(re.compile(f"{re.escape(c)}(?:{'|'.join(rest)})")
                       for c, rest in _BY_FIRST.items())
_KEY_MIN = 16  # every key format holds a base64-alphabet run at least this long
_KEY_LEAD = 64  # and its prefix or keyword starts at most this far before that run

# Runs of digits and separators: the only places a card or phone number can be.
_DIGIT_RUN = re.compile(r"\d[\d ().-]{7,}\d")
_DIGIT_GROUP = re.compile(r"\d+")
_NANP = re.compile(r"\d{3}[-. ]\d{3}[-. ]\d{4}")  # a hint only: _PHONE decides
_CARD_BEFORE = frozenset(_WORD_CHARS | set(".+-"))
_PHONE = re.compile(
    r"(?<![\w+.-])(?:"
    r"\+[1-9]\d{0,3}(?:[ .-]?\(?\d{1,5}\)?){1,6}"   # international (E.164, spaced or not)
    r"|\(\d{3}\)[ ]?\d{3}[-. ]\d{4}"                  # NANP (415) 555-2671
    r"|\d{3}(?P<sep>[-. ])\d{3}(?P=sep)\d{4}"         # NANP 415-555-2671
    r"|0\d{1,4}(?:[ -]\d{2,4}){2,4}"                  # trunk 0: 020 7946 0958
    r"|0\d{2,4}[ -]\d{5,8}"                            # trunk 0: 07700 900123
    r")(?![\w-])")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}\Z")
_EMAIL_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}"
                           r"[A-Za-z]{2,24}(?![\w-])")
_EMAIL_BEFORE = frozenset(_WORD_CHARS | set(".%+-"))
_FILE_TLDS = frozenset({"png", "jpg", "jpeg", "gif", "svg", "webp", "ico", "js", "css", "py",
                        "ts", "md", "txt", "html", "json"})
# Issuer prefixes (IIN ranges) and lengths of the major card schemes.
_CARD_LENGTHS = {"4": (13, 16, 19), "34": (15,), "37": (15,), "36": (14, 16, 19),
                 "38": (14, 16, 19), "35": (16, 17, 18, 19), "6011": (16, 17, 18, 19),
                 "65": (16, 17, 18, 19), "62": (16, 17, 18, 19), "30": (14, 16, 19)}

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


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a string of digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_ok(text: str) -> bool:
    """A card number: at most one kind of separator, Luhn, a scheme's prefix and length."""
    separators = {c for c in text if c in " -"}
    if len(separators) > 1:
        return False
    digits = text.replace(" ", "").replace("-", "")
    if len(set(digits)) < 2 or not luhn_ok(digits):
        return False
    n = len(digits)
    if digits[0] == "5":
        return 51 <= int(digits[:2]) <= 55 and n == 16
    if digits[0] == "2":
        return 2221 <= int(digits[:4]) <= 2720 and n == 16
    if digits[:2] == "64":
        return 644 <= int(digits[:3]) <= 649 and 16 <= n <= 19
    for prefix in (digits[:4], digits[:2], digits[:1]):
        if prefix in _CARD_LENGTHS:
            return n in _CARD_LENGTHS[prefix]
    return False


def _phone_ok(text: str) -> bool:
    digits = sum(c.isdigit() for c in text)
    if text.startswith("+"):
        if text.count(".") == 1 and not any(c in " -()" for c in text):
            return False  # +35236450.6 is a number
        separated = any(c in " .-()" for c in text)
        return (8 if separated else 10) <= digits <= 15
    if text.startswith("0"):
        return 10 <= digits <= 11 and text[1] != "0"
    if text.startswith("("):
        return text[1] in "23456789"
    return text[0] in "23456789" and text[4] in "23456789"


def _jwt_ok(text: str) -> bool:
    head = text.split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error):
        return False
    return isinstance(decoded, dict) and ("alg" in decoded or "typ" in decoded)


def _triggered(text: str, tokens: list[tuple[int, int]], kinds: frozenset[str]) -> set[str]:
    """The key formats whose prefix occurs near a run long enough to hold one."""
    found: set[str] = set()  # prefixes
    window_start = window_end = -1
    for start, end in tokens:
        if end - start < _KEY_MIN:
            continue
        start = max(0, start - _KEY_LEAD)
        if start <= window_end:
            window_end = end
            continue
        if window_end > 0:
            found.update(_TRIGGER.findall(text, window_start, window_end))
        window_start, window_end = start, end
    if window_end > 0:
        found.update(_TRIGGER.findall(text, window_start, window_end))
    return {_PREFIX_KIND[p] for p in found} & kinds


def _keys(text: str, kinds: set[str], out: list[Match]) -> None:
    for kind in kinds:
        before = _KEYS[kind][2]
        for m in _KEY_RE[kind].finditer(text):
            start, end = m.span("v") if "v" in m.re.groupindex else m.span()
            if start and text[start - 1] in before:
                continue
            if kind == "jwt" and not _jwt_ok(m.group()):
                continue
            out.append(Match(kind, start, end))


def _digits(text: str, kinds: frozenset[str], out: list[Match]) -> None:
    cards, phones = "card_number" in kinds, "phone" in kinds
    for run in _DIGIT_RUN.finditer(text):
        start, end = run.span()
        chunk = run.group()
        digits = len(chunk) - chunk.count(" ") - chunk.count("-") - chunk.count(".") \
            - chunk.count("(") - chunk.count(")")
        plus = start > 0 and text[start - 1] in "+("
        if cards and digits >= 13:
            _cards(text, start, end, out)
        if phones and (digits >= 10 or (plus and digits >= 8)) and (
                plus or "(" in chunk or chunk[0] == "0" or " 0" in chunk
                or _NANP.search(chunk) is not None):
            if plus:
                start -= 1
            stop = min(end + 1, len(text))  # lookaheads see the character after the run
            for m in _PHONE.finditer(text, start, stop):
                if _phone_ok(m.group()) and not (m.group()[0] == "0"
                                                 and _after_digits(text, m.start())):
                    out.append(Match("phone", m.start(), m.end()))


def _cards(text: str, start: int, end: int, out: list[Match]) -> None:
    """Card numbers in the digit run ``text[start:end]``: every way to take 13-19 digits
    in whole groups (``4111 1111 1111 1111``, ``378282246310005``), the first valid one
    from each group on, so adjacent numbers are all found (a greedy regex would not)."""
    groups = [m.span() for m in _DIGIT_GROUP.finditer(text, start, end)]
    i = 0
    while i < len(groups):
        first = groups[i][0]
        before = text[first - 1] if first else ""
        taken = False
        if before not in _CARD_BEFORE and text[first] in "23456":
            total = 0
            for j in range(i, len(groups)):
                if j > i and (groups[j][0] - groups[j - 1][1] != 1
                              or text[groups[j - 1][1]] not in " -"):
                    break  # not one separator between the groups
                total += groups[j][1] - groups[j][0]
                if total > 19:
                    break
                last = groups[j][1]
                if total >= 13 and (last >= len(text) or text[last] not in _WORD_CHARS) \
                        and card_ok(text[first:last]):
                    out.append(Match("card_number", first, last))
                    i, taken = j + 1, True
                    break
        if not taken:
            i += 1


def _after_digits(text: str, start: int) -> bool:
    """True when a group of digits comes just before ``start`` (one space apart): a
    trunk-0 "phone number" there is the tail of a longer number (an IBAN, an account)."""
    return start >= 2 and text[start - 1] == " " and text[start - 2].isdigit()


def _emails(text: str, out: list[Match]) -> None:
    at = text.find("@")
    while at != -1:
        local = _EMAIL_LOCAL.search(text, max(0, at - 64), at)
        domain = _EMAIL_DOMAIN.match(text, at + 1)
        if local is not None and domain is not None:
            start = local.start()
            tld = domain.group().rsplit(".", 1)[-1].lower()
            if (not start or text[start - 1] not in _EMAIL_BEFORE) and tld not in _FILE_TLDS \
                    and local.group() != "git":
                out.append(Match("email", start, domain.end()))
        at = text.find("@", at + 1)


def _direct(text: str, kinds: frozenset[str], tokens: list[tuple[int, int]]) -> list[Match]:
    out: list[Match] = []
    triggered = _triggered(text, tokens, kinds)
    if "private_key" in kinds and "PRIVATE KEY" in text:  # a short (test) key has no long run
        triggered.add("private_key")
    if triggered:
        _keys(text, triggered, out)
    if "card_number" in kinds or "phone" in kinds:
        _digits(text, kinds, out)
    if "email" in kinds and "@" in text:
        _emails(text, out)
    return out


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
    present = {_PREFIX_KIND[p] for part in _TRIGGER_PARTS for p in part.findall(text)}
    wanted = present & kinds & _SPLIT_KINDS
    if "card_number" in kinds and _SPLIT_DIGITS.search(text):
        wanted.add("card_number")
    if not wanted:
        return []
    joined, cuts, shifts = _joined(text)
    if not cuts:
        return []
    out: list[Match] = []
    for m in _direct(joined, frozenset(wanted), _tokens(joined)):
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


def find(text: str, kinds: frozenset[str], entropy: EntropyRule, depth: int = 0) -> list[Match]:
    """Every finding of the given ``kinds`` in ``text``, in order, without overlaps."""
    spans = _tokens(text)
    found = _direct(text, kinds, spans)
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
