"""Layer 1: find the URLs and paths in a call's arguments and judge them before dispatch.

The walk visits every value (dict keys and values, lists, tuples, sets, dataclasses,
pydantic models) under any argument name, because an agent can put a URL wherever a
tool happens to read one. It is bounded: past ``MAX_DEPTH`` levels or ``MAX_NODES``
values it stops and reports a block, since passing on data nobody inspected would make
the bound an evasion.

Only clear forms count, so ordinary text is not mistaken for a target: a string that
*is* a URL (``scheme://...``; for the WHATWG "special" schemes any ``http:...``, with
backslashes read as slashes and extra slashes skipped, the way browsers and many
clients parse them), a ``file:`` URL, or a string that is a path (absolute, ``~``, or
containing a ``../`` or ``..\\`` step) as written or once percent-decoded, twice, ...:
``ROOT/%2e%2e/secret`` is judged as written and as ``ROOT/../secret``, the worse
verdict kept, since the tool may decode it before opening. URLs and paths inside
longer text are not judged here; the worker's guards judge whatever the tool actually
opens. A plain
absolute path (no ``..`` step) is judged only for a tool that has filesystem grants or
runs under fs_safe: for a network-only tool ``"/repos/x"`` is far more likely an API
route than a file, and the worker blocks any file it would really open.

Hosts are judged with ``failcore_worker.rules.check_host`` and paths with ``check_path``: the
same decisions the worker makes at connect/open time.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import SplitResult, unquote, urlsplit

from failcore_worker import rules
from failcore_worker.rules import Grants, Verdict, worse

MAX_DEPTH = 64
MAX_NODES = 10_000

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):(.*)", re.DOTALL)
_SPECIAL = frozenset({"http", "https", "ws", "wss", "ftp"})
_UNSAFE_SCHEMES = frozenset({"file", "gopher", "dict"})
_DEFAULT_PORTS = {
    "http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21, "ftps": 990, "sftp": 22,
    "ssh": 22, "gopher": 70, "dict": 2628, "ldap": 389, "ldaps": 636, "smtp": 25,
    "imap": 143, "pop3": 110, "redis": 6379, "telnet": 23, "tftp": 69, "git": 9418,
    "mysql": 3306, "postgres": 5432, "postgresql": 5432, "mongodb": 27017, "amqp": 5672,
}
_MAX_DECODINGS = 4
_C0_AND_SPACE = "".join(map(chr, range(0x21)))


def scan_arguments(
    grants: Grants, args: Mapping[str, Any], cwd: str | None = None, keep_allowed: bool = False
) -> list[tuple[str, Verdict]]:
    """``(argument path, verdict)`` for every URL or path in ``args`` not judged "allow"
    (``keep_allowed``: for every URL or path, allowed ones too: ``policy explain``)."""
    scan = _Scan(grants, cwd, keep_allowed)
    for name, value in args.items():
        scan.walk(value, str(name), 1)
    return scan.findings


class _Scan:
    def __init__(self, grants: Grants, cwd: str | None, keep_allowed: bool = False) -> None:
        self.grants = grants
        self.cwd = cwd
        self.keep_allowed = keep_allowed
        self.findings: list[tuple[str, Verdict]] = []
        self.nodes = 0
        self.stopped = False

    def walk(self, value: Any, where: str, depth: int) -> None:
        if self.stopped:
            return
        self.nodes += 1
        if self.nodes > MAX_NODES:
            self.stopped = True
            self.findings.append((where, Verdict(
                "block", "precheck: arguments too large to inspect",
                f"the arguments hold more than {MAX_NODES} values; inspection stopped at "
                f"{where}. Pass large data as a file the tool is granted instead",
            )))
            return
        if isinstance(value, str):
            self.judge(value, where)
            return
        if isinstance(value, bytes | bytearray):
            if len(value) <= 4096 and value.isascii():
                self.judge(bytes(value).decode("ascii"), where)
            return
        children = _children(value, where)
        if children is None:
            return
        if depth >= MAX_DEPTH:
            self.findings.append((where, Verdict(
                "block", "precheck: arguments nested too deeply",
                f"{where} is nested more than {MAX_DEPTH} levels deep; inspection stops "
                "there. Flatten the arguments",
            )))
            return
        for child_where, child in children:
            self.walk(child, child_where, depth + 1)

    def judge(self, text: str, where: str) -> None:
        verdict = judge_string(self.grants, text, self.cwd)
        if verdict is not None and (verdict.action != "allow" or self.keep_allowed):
            self.findings.append((where, verdict))


def _children(value: Any, where: str) -> list[tuple[str, Any]] | None:
    if isinstance(value, Mapping):
        out: list[tuple[str, Any]] = []
        for key, item in value.items():
            label = f"{where}.{key}" if isinstance(key, str) and key.isidentifier() else (
                f"{where}[{key!r}]")
            if isinstance(key, str | bytes):
                out.append((f"{label} (key)", key))
            out.append((label, item))
        return out
    if isinstance(value, list | tuple):
        return [(f"{where}[{i}]", item) for i, item in enumerate(value)]
    if isinstance(value, set | frozenset):
        return [(f"{where}[{i}]", item) for i, item in enumerate(sorted(value, key=repr))]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f"{where}.{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
    fields = getattr(type(value), "model_fields", None)  # pydantic v2 models
    if isinstance(fields, Mapping):
        return [(f"{where}.{name}", getattr(value, name, None)) for name in fields]
    return None


def judge_string(grants: Grants, text: str, cwd: str | None = None) -> Verdict | None:
    """The verdict on one string if it is a URL or a path, else None."""
    if "\x00" in text:
        text = text.split("\x00", 1)[0]  # what a C-level consumer would see
    clean = re.sub(r"[\t\n\r]", "", text).strip(_C0_AND_SPACE)
    m = _SCHEME.fullmatch(clean)
    if m is not None:
        scheme, rest = m.group(1).lower(), m.group(2)
        if scheme == "file":
            return _judge_file_url(grants, rest, cwd)
        if scheme in _SPECIAL or rest.startswith("//"):
            return _judge_url(grants, scheme, rest)
    fs_tool = bool(grants.fs) or grants.fs_root is not None
    worst: Verdict | None = None
    for candidate in _decodings(text):
        if _looks_like_path(candidate) and (fs_tool or _has_traversal(candidate)):
            worst = worse(worst, _judge_path(grants, candidate, cwd))
    return worst


def _decodings(text: str) -> list[str]:
    """``text`` and each successive percent-decoding of it (``%252e`` -> ``%2e`` -> ``.``).

    A tool may decode its argument once, twice or not at all before opening it, so each
    form is judged and the worse verdict kept (SECURITY.md, layer 1). Bounded like
    ``rules._normalise_host``. Overlong UTF-8 (``%c0%ae``) is not a dot to Python's
    decoder (it becomes U+FFFD), nor to the kernel, so it is judged as the name it is.
    """
    forms = [text]
    for _ in range(_MAX_DECODINGS):
        if "%" not in forms[-1]:
            break
        decoded = unquote(forms[-1])
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    return forms


def _has_traversal(text: str) -> bool:
    return "../" in text or "..\\" in text or text == ".." or text.endswith(("/..", "\\.."))


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "~")) or _has_traversal(text)


def _judge_path(grants: Grants, path: str, cwd: str | None) -> Verdict:
    if "\\" in path and ".." in path:
        path = path.replace("\\", "/")
    if path.startswith("~"):
        path = os.path.expanduser(path)
    return rules.check_path(grants, path, False, cwd)


def _judge_file_url(grants: Grants, rest: str, cwd: str | None) -> Verdict:
    if grants.block_ranges:
        return Verdict(
            "block", "net_safe: file:// URLs are blocked",
            "a file: URL makes a URL-fetching tool read local files; pass a path argument "
            "and grant it with fs:read:PATH instead",
        )
    path = rest
    if path.startswith("//"):
        path = "/" + path[2:].partition("/")[2]  # drop the (local) host part
    worst: Verdict | None = None
    for decoded in _decodings(path)[1:] or [path]:  # a file: URL is decoded at least once
        worst = worse(worst, _judge_path(grants, decoded or "/", cwd))
    assert worst is not None
    return worst


def _judge_url(grants: Grants, scheme: str, rest: str) -> Verdict:
    if grants.block_ranges and scheme in _UNSAFE_SCHEMES:
        return Verdict(
            "block", f"net_safe: {scheme}:// URLs are blocked",
            f"{scheme}:// lets a request smuggle raw bytes to any port (a classic SSRF "
            "vector); use http(s)",
        )
    # Two readings, because parsers disagree: RFC 3986 (urllib3, urllib) and WHATWG
    # (browsers, some clients: '\' is '/', any number of slashes). Judge both.
    readings = {f"{scheme}:{rest}"}
    if scheme in _SPECIAL:
        readings.add(f"{scheme}://" + rest.replace("\\", "/").lstrip("/"))
    worst: Verdict | None = None
    for url in sorted(readings):
        verdict = _judge_authority(grants, scheme, url)
        worst = worse(worst, verdict)
    assert worst is not None
    return worst


def _judge_authority(grants: Grants, scheme: str, url: str) -> Verdict:
    try:
        parts: SplitResult = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError as e:
        return Verdict(
            "block", "precheck: malformed URL",
            f"the URL could not be parsed ({e}); a URL clients disagree about is refused",
        )
    if not host:
        return Verdict("allow", "precheck: no host", "URL names no host")
    if port is None:
        port = _DEFAULT_PORTS.get(scheme, 0)
    return rules.check_host(grants, host, port)
