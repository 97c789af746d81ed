"""The leaves of a value the scanner reads, where each one is, and the value rebuilt.

``Collector`` walks any value (strings, bytes, integers of a card number's length, in
dicts with their keys, lists, tuples, sets, dataclasses and pydantic models) and keeps
each leaf's path lazily, so labels (``result.items[2].email``) and paths are built only
for leaves that hold a finding. ``plain_texts`` is a quicker first look at plain data.
``rebuild`` returns the value with some leaves replaced, its structure and types kept
and untouched parts shared.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Literal

MAX_DEPTH = 64
MAX_NODES = 100_000

Path = tuple[tuple[str, Any], ...]  # steps: ("item", key) ("key", key) ("index", i) ("attr", name)
LeafKind = Literal["str", "bytes", "int"]
_SCALARS = (float, bool, type(None))


class Collector:
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
        elif self._over(value):
            self.stopped_at = 0
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
            if nodes > MAX_NODES or depth >= MAX_DEPTH:
                self.stopped_at = node
                break
            # Leaves are read in order, containers pushed so they pop in order too; a dict
            # key is read just before its value (a keyword there names the value).
            pending = []
            children: Iterable[tuple[tuple[str, Any], Any]] = ()
            if isinstance(item, Mapping):
                for key, child in item.items():
                    if type(key) is str and len(key) >= 6:
                        self._leaf(self._node(node, ("key", key)), key, "str")
                    self._child(pending, node, ("item", key), child, depth + 1)
                    if len(self.parents) > MAX_NODES:
                        break
            elif isinstance(item, list | tuple):
                children = ((("index", i), child) for i, child in enumerate(item))
            elif isinstance(item, set | frozenset):
                if len(item) > MAX_NODES:  # sorting it would cost more than the bound allows
                    self.stopped_at = node
                    break
                children = ((("member", (i, child)), child)
                            for i, child in enumerate(sorted(item, key=repr)))
            else:
                children = ((("attr", name), child) for name, child in _attributes(item))
            # Lazily, and never past the node bound: a list of a million numbers must not
            # become a million path entries here.
            for step, child in children:
                if len(self.parents) > MAX_NODES:
                    break
                self._child(pending, node, step, child, depth + 1)
            if len(self.parents) > MAX_NODES:
                self.stopped_at = node
            stack.extend(reversed(pending))

    def _over(self, value: Any) -> bool:
        """Bytes too long to fit what is left of ``max_bytes`` even as 4-byte characters:
        the scan stops there without decoding them (a 200 MB result is not copied)."""
        return isinstance(value, bytes | bytearray) and \
            len(value) > 4 * (self.max_bytes - self.size)

    def _child(self, stack: list[tuple[Any, int, int]], parent: int, step: tuple[str, Any],
               value: Any, depth: int) -> None:
        if self._over(value):
            if self.stopped_at is None:
                self.stopped_at = self._node(parent, step)
            return
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


def plain_texts(value: Any, skip: frozenset[str], max_bytes: int) -> list[str] | None:
    """The same leaves ``_Collector`` reads, for plain data (dicts with str keys, lists,
    tuples, str, int, float, bool, None) and within the bounds; None for anything else.

    A quick first look: when it finds nothing the precise walk (paths, labels, redaction)
    is not needed. A dict key is read just before its value, as in the precise walk.
    """
    out: list[str] = []
    budget = [max_bytes, MAX_NODES]

    def visit(v: Any, depth: int) -> None:
        budget[1] -= 1
        if depth >= MAX_DEPTH or budget[1] < 0:
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


def tree(changes: dict[Path, Any]) -> dict[Any, Any]:
    root: dict[Any, Any] = {}
    for path, new in changes.items():
        node = root
        for step in path:
            node = node.setdefault(step, {})
        node[None] = new
    return root


def rebuild(value: Any, node: dict[Any, Any]) -> Any:
    """``value`` with the leaves under ``node`` replaced; untouched parts are shared."""
    if None in node:
        return node[None]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            new_key = node[("key", key)][None] if ("key", key) in node else key
            out[new_key] = rebuild(item, node[("item", key)]) if ("item", key) in node else item
        if isinstance(value, dict) and type(value) is not dict:
            try:
                same_type = type(value)()
                same_type.update(out)
                return same_type
            except TypeError:
                return out
        return out
    if isinstance(value, list | tuple):
        items = [rebuild(item, node[("index", i)]) if ("index", i) in node else item
                 for i, item in enumerate(value)]
        if isinstance(value, list):
            return items
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, set | frozenset):
        return type(value)(rebuild(item, node[("member", (i, item))])
                           if ("member", (i, item)) in node else item
                           for i, item in enumerate(sorted(value, key=repr)))
    updates = {step[1]: rebuild(getattr(value, step[1]), sub) for step, sub in node.items()
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
