"""Secret and PII scanning of what crosses the boundary: outgoing arguments and results.

``Scan`` is the configuration (an action per finding kind, what to scan, thresholds);
``scan_value`` walks a value (strings, bytes, long integers, at any depth in dicts,
lists, tuples, sets, dataclasses and pydantic models, dict keys included), joins its
strings with ``\\x00`` and runs the detectors of ``failcore._scan_rules`` over them in one
pass. The outcome says, per finding, the kind, where it was (``args.payload.token``,
``result.items[2]``), the action, and a salted hash of the matched text; the text itself
is kept only in memory, to mask it.

Actions: ``warn`` (the default: the caller gets the value as is, the trace records the
finding), ``redact`` (the caller gets the value with each match replaced by
``<redacted:KIND>``, its structure kept; an integer card number becomes that string),
``block`` (the call fails with ``SecurityError``, layer ``scan``), ``off``. Whatever the
action, the trace never holds a matched value: the session masks it in every record of
the call (arguments, result, error messages).

The hash is HMAC-SHA256 under a salt that is random per session unless
``Scan(salt=...)`` fixes one: equal digests within a trace mean the same value leaked
twice, and only someone holding the salt (and a guess) can test what it was.

Bounds: past ``max_bytes`` of text per direction and call, or past the walk's depth and
size limits, the rest is not scanned and an ``unscanned`` finding is reported (action
``warn`` unless configured, e.g. ``block`` to refuse what nobody inspected).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from failcore._scan_kinds import GROUPS, KINDS, Match
from failcore._scan_rules import EntropyRule, find
from failcore._scan_walk import Collector, LeafKind, Path, plain_texts, rebuild, tree

ScanAction = Literal["off", "warn", "redact", "block"]
ACTIONS: tuple[ScanAction, ...] = ("off", "warn", "redact", "block")
UNSCANNED = "unscanned"
_RANK = {a: i for i, a in enumerate(ACTIONS)}
_SEP = "\x00"


@dataclass(frozen=True)
class Scan:
    """What to scan and what to do with each kind of finding.

    ``actions`` maps a kind (``aws_access_key``, ``email``, ... see ``Scan.KINDS``), a
    group (``secrets``, ``pii``) or ``unscanned`` to ``off``/``warn``/``redact``/``block``;
    a kind's own entry beats its group's, and ``default`` covers the rest.
    ``arguments`` / ``results``: which direction is scanned. ``entropy``: the
    high-entropy thresholds. ``max_bytes``: text scanned per direction and call.
    ``salt``: the HMAC key for the findings' hashes (random per session when None).
    """

    KINDS = KINDS

    actions: Mapping[str, ScanAction] = field(default_factory=dict)
    default: ScanAction = "warn"
    arguments: bool = True
    results: bool = True
    entropy: EntropyRule = field(default_factory=EntropyRule)
    max_bytes: int = 4 * 1024 * 1024
    salt: bytes | None = None

    def __post_init__(self) -> None:
        known = set(KINDS) | set(GROUPS) | {UNSCANNED}
        for key, action in dict(self.actions).items():
            if key not in known:
                raise ValueError(f"scan action for unknown kind {key!r}; kinds: "
                                 f"{', '.join(sorted(known))}")
            if action not in ACTIONS:
                raise ValueError(f"scan action {action!r} for {key!r} is not one of "
                                 f"{', '.join(ACTIONS)}")
        if self.default not in ACTIONS:
            raise ValueError(f"scan default {self.default!r} is not one of {', '.join(ACTIONS)}")
        if self.action(UNSCANNED) == "redact":
            raise ValueError("'unscanned' cannot be redacted (nobody knows what to mask); "
                             "use warn or block")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) \
                or self.max_bytes < 1024:
            raise ValueError(f"scan max_bytes must be an int of at least 1024, got {self.max_bytes!r}")
        if not isinstance(self.entropy, EntropyRule):
            raise ValueError("scan entropy must be an EntropyRule")
        object.__setattr__(self, "actions", dict(self.actions))

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.actions.items())), self.default, self.arguments,
                     self.results, self.entropy, self.max_bytes, self.salt))

    def action(self, kind: str) -> ScanAction:
        actions = self.actions
        if kind in actions:
            return actions[kind]
        for group, members in GROUPS.items():
            if kind in members and group in actions:
                return actions[group]
        if kind == UNSCANNED:
            return "warn" if self.default in ("off", "redact") else self.default
        return self.default

    @property
    def kinds(self) -> frozenset[str]:
        """The detector kinds whose action is not ``off``."""
        cached: frozenset[str] | None = self.__dict__.get("_kinds")
        if cached is None:
            cached = frozenset(k for k in KINDS if self.action(k) != "off")
            self.__dict__["_kinds"] = cached
        return cached

    def compose(self, other: Scan) -> Scan:
        """The stricter of two: per kind the stronger action, both directions if either
        scans them, the more sensitive entropy thresholds, the smaller byte bound."""
        keys = set(self.actions) | set(other.actions) | set(KINDS) | {UNSCANNED}
        actions = {k: max(self.action(k), other.action(k), key=_RANK.__getitem__) for k in keys
                   if k not in GROUPS}
        entropy = EntropyRule(min(self.entropy.min_length, other.entropy.min_length),
                              max(self.entropy.max_length, other.entropy.max_length),
                              min(self.entropy.min_bits, other.entropy.min_bits))
        return Scan(actions=actions, default=max(self.default, other.default, key=_RANK.__getitem__),
                    arguments=self.arguments or other.arguments,
                    results=self.results or other.results, entropy=entropy,
                    max_bytes=min(self.max_bytes, other.max_bytes), salt=self.salt or other.salt)

    def to_json(self) -> dict[str, Any]:
        """The configuration as plain data (``policy explain``), every kind's action spelled out."""
        return {"arguments": self.arguments, "results": self.results, "max_bytes": self.max_bytes,
                "actions": {k: self.action(k) for k in (*KINDS, UNSCANNED)},
                "entropy": dataclasses.asdict(self.entropy)}


@dataclass(frozen=True)
class Finding:
    """One finding. ``text`` is the matched value: kept in memory to mask it, never recorded."""

    kind: str
    where: str
    action: ScanAction
    digest: str | None
    encoding: str = ""
    text: str = field(default="", repr=False)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": self.kind, "where": self.where, "action": self.action,
                                "digest": self.digest}
        if self.encoding:
            body["encoding"] = self.encoding
        return body


@dataclass
class ScanOutcome:
    """The findings in one value, the value as the caller gets it, and what to mask."""

    findings: list[Finding]
    value: Any
    masks: dict[str, str]

    @property
    def blocked(self) -> Finding | None:
        return next((f for f in self.findings if f.action == "block"), None)


def marker(kind: str) -> str:
    return f"<redacted:{kind}>"


def new_salt() -> bytes:
    return secrets.token_bytes(16)


def scan_value(config: Scan, value: Any, where: str, salt: bytes,
               skip: frozenset[str] = frozenset()) -> ScanOutcome:
    """Scan ``value`` (labelled ``where``: "args" or "result"); ``skip`` names top-level
    mapping keys left out (arguments declared secret, which are meant to hold secrets)."""
    plain = plain_texts(value, skip, config.max_bytes)
    if plain is not None and (not plain or not find(_SEP.join(plain), config.kinds,
                                                    config.entropy)):
        return ScanOutcome([], value, {})  # the common case: plain data, nothing found
    walk = Collector(config.max_bytes)
    walk.walk(value, skip)
    findings: list[Finding] = []
    masks: dict[str, str] = {}
    changes: dict[Path, Any] = {}
    texts = walk.texts
    if texts:
        text = texts[0] if len(texts) == 1 else _SEP.join(texts)
        matches = find(text, config.kinds, config.entropy)
        if matches:
            starts: list[int] = []
            pos = 0
            for leaf_text in texts:
                starts.append(pos)
                pos += len(leaf_text) + 1
            per_leaf: dict[int, list[Match]] = {}
            for m in matches:
                i = bisect.bisect_right(starts, m.start) - 1
                per_leaf.setdefault(i, []).append(
                    Match(m.kind, m.start - starts[i], m.end - starts[i], m.encoding))
            for i, leaf_matches in per_leaf.items():
                leaf_text = texts[i]
                label = walk.label(where, walk.owners[i])
                redact: list[Match] = []
                for m in leaf_matches:
                    matched = leaf_text[m.start:m.end]
                    action = config.action(m.kind)
                    findings.append(Finding(m.kind, label, action, _digest(salt, matched),
                                            m.encoding, matched))
                    masks.setdefault(matched, marker(m.kind))
                    if action == "redact":
                        redact.append(m)
                if redact:
                    changes[walk.path(walk.owners[i])] = _masked_leaf(
                        leaf_text, walk.leaf_kinds[i], redact)
    if masks:  # a dict key can be the secret: labels never show a match
        findings = [dataclasses.replace(f, where=_mask_text(f.where, masks)) for f in findings]
    if walk.stopped_at is not None:
        findings.append(Finding(UNSCANNED, _mask_text(walk.label(where, walk.stopped_at), masks),
                                config.action(UNSCANNED), None))
    new_value = rebuild(value, tree(changes)) if changes else value
    return ScanOutcome(findings, new_value, masks)


def _mask_text(text: str, masks: Mapping[str, str]) -> str:
    for found in sorted(masks, key=len, reverse=True):
        if found in text:
            text = text.replace(found, masks[found])
    return text


def _digest(salt: bytes, text: str) -> str:
    return hmac.new(salt, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:16]


def _masked_leaf(text: str, kind: LeafKind, matches: list[Match]) -> Any:
    parts: list[str] = []
    last = 0
    for m in sorted(matches, key=lambda m: m.start):
        parts.append(text[last:m.start])
        parts.append(marker(m.kind))
        last = m.end
    parts.append(text[last:])
    masked = "".join(parts)
    if kind == "bytes":
        return masked.encode("utf-8")
    return masked  # an integer card number becomes the marker string


