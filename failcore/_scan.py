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
import copy
import dataclasses
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from failcore._scan_rules import GROUPS, KINDS, EntropyRule, Match, find

ScanAction = Literal["off", "warn", "redact", "block"]
ACTIONS: tuple[ScanAction, ...] = ("off", "warn", "redact", "block")
UNSCANNED = "unscanned"
_RANK = {a: i for i, a in enumerate(ACTIONS)}
_MAX_DEPTH = 64
_MAX_NODES = 100_000
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


# --- walking a value -------------------------------------------------------------------

Path = tuple[tuple[str, Any], ...]  # steps: ("item", key) ("key", key) ("index", i) ("attr", name)
LeafKind = Literal["str", "bytes", "int"]
_SCALARS = (float, bool, type(None))


class _Collector:
    """The scannable leaves of a value, in document order, with their paths kept lazily.

    Nodes are numbered; ``parents``/``steps`` give each node's parent and the step from
    it, so a leaf's path and label are only built for leaves that hold a finding.
    """

    def __init__(self, max_bytes: int) -> None:
        self.texts: list[str] = []
        self.owners: list[int] = []
        self.leaf_kinds: list[LeafKind] = []
        self.parents: list[int] = [-1]
        self.steps: list[tuple[str, Any] | None] = [None]
        self.size = 0
        self.max_bytes = max_bytes
        self.stopped_at: int | None = None

    def _node(self, parent: int, step: tuple[str, Any]) -> int:
        self.parents.append(parent)
        self.steps.append(step)
        return len(self.parents) - 1

    def _leaf(self, node: int, text: str, kind: LeafKind) -> None:
        if self.stopped_at is not None:
            return
        if self.size + len(text) > self.max_bytes:
            self.stopped_at = node
            return
        self.size += len(text) + 1
        self.texts.append(text)
        self.owners.append(node)
        self.leaf_kinds.append(kind)

    def walk(self, value: Any, skip: frozenset[str]) -> None:
        stack: list[tuple[Any, int, int]] = []
        pending: list[tuple[Any, int, int]] = []
        if skip and isinstance(value, Mapping):
            for key, child in value.items():
                if key not in skip:
                    self._child(pending, 0, ("item", key), child, 1)
            stack.extend(reversed(pending))
        else:
            leaf = _leaf_text(value)
            if leaf is None:
                stack.append((value, 0, 0))
            elif leaf:
                self._leaf(0, *leaf)
        nodes = 0
        while stack and self.stopped_at is None:
            item, node, depth = stack.pop()
            nodes += 1
            if nodes > _MAX_NODES or depth >= _MAX_DEPTH:
                self.stopped_at = node
                break
            # Leaves are read in order, containers pushed so they pop in order too; a dict
            # key is read just before its value (a keyword there names the value).
            pending = []
            children: list[tuple[tuple[str, Any], Any]] = []
            if isinstance(item, Mapping):
                for key, child in item.items():
                    if type(key) is str and len(key) >= 6:
                        self._leaf(self._node(node, ("key", key)), key, "str")
                    self._child(pending, node, ("item", key), child, depth + 1)
            elif isinstance(item, list | tuple):
                children = [(("index", i), child) for i, child in enumerate(item)]
            elif isinstance(item, set | frozenset):
                children = [(("member", (i, child)), child)
                            for i, child in enumerate(sorted(item, key=repr))]
            else:
                children = [(("attr", name), child) for name, child in _attributes(item)]
            for step, child in children:
                self._child(pending, node, step, child, depth + 1)
            stack.extend(reversed(pending))

    def _child(self, stack: list[tuple[Any, int, int]], parent: int, step: tuple[str, Any],
               value: Any, depth: int) -> None:
        leaf = _leaf_text(value)
        if leaf is None:
            stack.append((value, self._node(parent, step), depth))
        elif leaf:
            self._leaf(self._node(parent, step), *leaf)

    def path(self, node: int) -> Path:
        steps: list[tuple[str, Any]] = []
        while node > 0:
            step = self.steps[node]
            assert step is not None
            steps.append(step)
            node = self.parents[node]
        return tuple(reversed(steps))

    def label(self, root: str, node: int) -> str:
        where = root
        for step in self.path(node):
            kind, key = step
            if kind == "item":
                where = _label(where, key)
            elif kind == "key":
                where = _label(where, key) + " (key)"
            elif kind == "index":
                where = f"{where}[{key}]"
            elif kind == "member":
                where = f"{where}[{key[0]}]"  # by position: the member itself may be the secret
            else:
                where = f"{where}.{key}"
        return where


def _leaf_text(value: Any) -> tuple[str, LeafKind] | tuple[()] | None:
    """(text, kind) for a leaf worth scanning, () for a leaf that is not, None for a container."""
    t = type(value)
    if t is str:
        return (value, "str") if len(value) >= 6 else ()
    if t is int:
        # 13 to 19 digits: a card number's length
        return (str(abs(value)), "int") if 10 ** 12 <= abs(value) < 10 ** 19 else ()
    if isinstance(value, _SCALARS):
        return ()
    if isinstance(value, bytes | bytearray):
        if len(value) < 6:
            return ()
        try:
            return bytes(value).decode("utf-8"), "bytes"
        except UnicodeDecodeError:
            return ()  # binary data: the detectors read text
    if isinstance(value, str):  # subclasses (str enums): scanned as their text
        return _leaf_text(str(value)) if len(value) >= 6 else ()
    if isinstance(value, int):
        return _leaf_text(int(value))
    return None


def _label(where: str, key: Any) -> str:
    return f"{where}.{key}" if isinstance(key, str) and key.isidentifier() else f"{where}[{key!r}]"


def _attributes(value: Any) -> list[tuple[str, Any]]:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name, None)) for f in dataclasses.fields(value)]
    fields = getattr(type(value), "model_fields", None)  # pydantic v2 models
    if isinstance(fields, Mapping):
        return [(name, getattr(value, name, None)) for name in fields]
    return []  # an opaque object: not scanned


class _NotPlain(Exception):
    pass


def _plain_texts(value: Any, skip: frozenset[str], max_bytes: int) -> list[str] | None:
    """The same leaves ``_Collector`` reads, for plain data (dicts with str keys, lists,
    tuples, str, int, float, bool, None) and within the bounds; None for anything else.

    A quick first look: when it finds nothing the precise walk (paths, labels, redaction)
    is not needed. A dict key is read just before its value, as in the precise walk.
    """
    out: list[str] = []
    budget = [max_bytes, _MAX_NODES]

    def visit(v: Any, depth: int) -> None:
        budget[1] -= 1
        if depth >= _MAX_DEPTH or budget[1] < 0:
            raise _NotPlain
        t = type(v)
        if t is str:
            if len(v) >= 6:
                budget[0] -= len(v) + 1
                if budget[0] < 0:
                    raise _NotPlain
                out.append(v)
        elif t is dict:
            for key, item in v.items():
                if type(key) is str:
                    if len(key) >= 6:
                        out.append(key)
                        budget[0] -= len(key) + 1
                elif type(key) is not int:
                    raise _NotPlain
                visit(item, depth + 1)
        elif t is list or t is tuple:
            for item in v:
                visit(item, depth + 1)
        elif t is int:
            if 10 ** 12 <= abs(v) < 10 ** 19:
                out.append(str(abs(v)))
        elif not (v is None or t is float or t is bool):
            raise _NotPlain

    try:
        if skip and type(value) is dict:
            for key, item in value.items():
                if key not in skip:
                    visit(item, 1)
        else:
            visit(value, 0)
    except (_NotPlain, RecursionError):
        return None
    return out


# --- scanning -------------------------------------------------------------------------


def scan_value(config: Scan, value: Any, where: str, salt: bytes,
               skip: frozenset[str] = frozenset()) -> ScanOutcome:
    """Scan ``value`` (labelled ``where``: "args" or "result"); ``skip`` names top-level
    mapping keys left out (arguments declared secret, which are meant to hold secrets)."""
    plain = _plain_texts(value, skip, config.max_bytes)
    if plain is not None and (not plain or not find(_SEP.join(plain), config.kinds,
                                                    config.entropy)):
        return ScanOutcome([], value, {})  # the common case: plain data, nothing found
    walk = _Collector(config.max_bytes)
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
    new_value = _rebuild(value, _tree(changes)) if changes else value
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


def _tree(changes: dict[Path, Any]) -> dict[Any, Any]:
    root: dict[Any, Any] = {}
    for path, new in changes.items():
        node = root
        for step in path:
            node = node.setdefault(step, {})
        node[None] = new
    return root


def _rebuild(value: Any, node: dict[Any, Any]) -> Any:
    """``value`` with the leaves under ``node`` replaced; untouched parts are shared."""
    if None in node:
        return node[None]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            new_key = node[("key", key)][None] if ("key", key) in node else key
            out[new_key] = _rebuild(item, node[("item", key)]) if ("item", key) in node else item
        if isinstance(value, dict) and type(value) is not dict:
            try:
                same_type = type(value)()
                same_type.update(out)
                return same_type
            except TypeError:
                return out
        return out
    if isinstance(value, list | tuple):
        items = [_rebuild(item, node[("index", i)]) if ("index", i) in node else item
                 for i, item in enumerate(value)]
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, set | frozenset):
        return type(value)(_rebuild(item, node[("member", (i, item))])
                           if ("member", (i, item)) in node else item
                           for i, item in enumerate(sorted(value, key=repr)))
    updates = {step[1]: _rebuild(getattr(value, step[1]), sub) for step, sub in node.items()
               if isinstance(step, tuple) and step[0] == "attr"}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        try:
            return dataclasses.replace(value, **updates)
        except (TypeError, ValueError):
            pass
    if hasattr(value, "model_copy"):
        return value.model_copy(update=updates)
    clone = copy.copy(value)
    for name, new in updates.items():
        object.__setattr__(clone, name, new)
    return clone
