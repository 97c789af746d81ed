"""What each kind of finding looks like: the patterns and checks of the scanner.

``direct(text, kinds, tokens)`` finds every kind in a text as it stands; ``failcore.
_scan_rules.find`` reads a text the other ways (split across lines, base64, entropy)
and calls back here. Key formats are looked for only when their literal prefix occurs
near a base64-alphabet run long enough to hold one (``AKIA``, ``ghp_``, ``-----BEGIN``...),
then matched by their own regex and checked at their boundaries. Card numbers and phone
numbers are looked for inside runs of digits and separators, e-mail around each ``@``;
each candidate is confirmed where a regex alone would be noisy: Luhn, issuer prefix and
length for cards; digit counts and shapes for phones; a JSON header for JWTs.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
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


def direct(text: str, kinds: frozenset[str], tokens: list[tuple[int, int]]) -> list[Match]:
    """Every finding of ``kinds`` in ``text`` as it stands (``tokens``: the text's runs of
    base64-alphabet characters, near which key prefixes are looked for)."""
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


def present_key_kinds(text: str) -> set[str]:
    """The key formats whose literal prefix occurs anywhere in ``text``."""
    return {_PREFIX_KIND[p] for part in _TRIGGER_PARTS for p in part.findall(text)}
