"""The SSRF corpus through a real Session under net_safe(strict=True).

A tool granted only ``net:connect:api.example.com:443`` is handed every form of an
internal address we know: first as a URL argument (refused by the pre-check or, failing
that, by the worker), then hidden from the pre-check (host and port as separate values,
or the URL base64-encoded) so that only the worker's resolve/connect guard can refuse it.

Everything here is ``netns``: the tools really try to connect (and some forms are DNS
names), so these tests run only inside a fresh network namespace, where nothing can
leave the machine. Run (from the repository root)::

    unshare -n sh -c 'ip link set lo up && .venv/bin/python -m pytest -m netns \
        tests/test_ssrf_session.py -q'

"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from failcore import (
    FailCoreError,
    Limits,
    SecurityError,
    Session,
    SideEffect,
    ToolMetadata,
    presets,
)
from failcore._trace import read_trace

pytestmark = pytest.mark.netns

GRANT = "net:connect:api.example.com:443"

# Hosts as written in a URL (IPv6 in brackets), every one an internal target.
HOSTS: list[str] = [
    # cloud metadata, 169.254.169.254, in every IPv4 spelling resolvers accept
    "169.254.169.254", "2852039166", "0xa9fea9fe", "0xA9.0xFE.0xA9.0xFE", "0251.0376.0251.0376",
    "0251.254.169.254", "169.254.43518", "169.16689662", "00000251.0000376.00251.0376",
    "0x00a9.0xfe.0xa9.0xfe", "169.254.169.254.", "%31%36%39.254.169.254",
    "\uff11\uff16\uff19\uff0e\uff12\uff15\uff14\uff0e\uff11\uff16\uff19\uff0e\uff12\uff15\uff14",
    "169.254.0.1",
    # loopback
    "127.0.0.1", "127.1", "127.0.1", "2130706433", "0x7f000001", "017700000001", "0x7f.1",
    "0177.0.0.1", "127.127.127.127", "127.0.0.1.",
    # unspecified / this network
    "0", "0.0.0.0", "0x0", "0.1.2.3",
    # private, CGNAT and other special-purpose ranges
    "10.0.0.1", "012.0.0.1", "167772161", "192.168.0.1", "3232235521", "172.16.0.1",
    "172.31.255.255", "100.64.0.1", "192.0.0.170", "192.0.2.1", "198.18.0.1", "224.0.0.1",
    "239.255.255.250", "240.0.0.1", "255.255.255.255",
    # IPv6: loopback, unspecified, mapped, compatible, NAT64, 6to4, Teredo, ULA, link-local
    "[::1]", "[0:0:0:0:0:0:0:1]", "[::]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:127.0.0.1]", "[::ffff:169.254.169.254]", "[::ffff:a9fe:a9fe]",
    "[::169.254.169.254]", "[64:ff9b::169.254.169.254]", "[64:ff9b::a9fe:a9fe]",
    "[64:ff9b:1::a9fe:a9fe]", "[2002:a9fe:a9fe::]", "[2002:7f00:1::1]",
    "[2001:0:4136:e378:8000:63bf:5601:5601]", "[fd00:ec2::254]", "[fc00::1]", "[fe80::1]",
    "[fe80::a9fe:a9fe%25eth0]", "[ff02::1]", "[::ffff:10.0.0.1]",
    # names that are internal by definition or resolve to whatever they spell
    "localhost", "LOCALHOST", "localhost.", "api.localhost", "metadata.google.internal",
    "metadata.google.internal.", "metadata", "instance-data", "localtest.me", "lvh.me",
    "169.254.169.254.nip.io", "api.example.com.127.0.0.1.sslip.io", "printer.local",
    "router.home.arpa",
]

# URL-level tricks on top of the hosts: userinfo, fragments, backslashes, odd slashes,
# whitespace, schemes that smuggle raw bytes.
TRICKS: list[str] = [
    "http://api.example.com@169.254.169.254/",
    "https://api.example.com:443@169.254.169.254/",
    "http://169.254.169.254#@api.example.com/",
    "https://169.254.169.254\\@api.example.com/",
    "http:/169.254.169.254/latest/meta-data/",
    "http:\\\\169.254.169.254\\latest\\",
    "http:///169.254.169.254/",
    " http://169.254.169.254/",
    "http://169.254.169.254\t/",
    "HTTP://169.254.169.254/",
    "https://169.254.169.254:443/",
    "http://169.254.169.254:0080/",
    "gopher://127.0.0.1:6379/_FLUSHALL",
    "dict://127.0.0.1:11211/stat",
    "ftp://169.254.169.254/",
    "file:///etc/passwd",
    "https://api.example.com.169.254.169.254.nip.io/",
    "https://[::ffff:169.254.169.254]:443/",
]


def _urls() -> list[str]:
    out = []
    for i, host in enumerate(HOSTS):
        scheme, port = ("https", ":443") if i % 2 else ("http", "")
        out.append(f"{scheme}://{host}{port}/latest/meta-data/")
    return out + TRICKS


URLS = _urls()


def _hidden_targets() -> list[tuple[str, int]]:
    """(host, port) as a client would pass them to connect: brackets stripped."""
    return [(h[1:-1] if h.startswith("[") else h, 443 if i % 2 else 80)
            for i, h in enumerate(HOSTS)]


def _urllib_targets() -> list[str]:
    """The URLs whose urllib reading really goes to an internal host.

    A URL that urllib itself reads as api.example.com (e.g. ``https://x\\@api.example.com``)
    is refused by the pre-check (it judges the worse of two parsers) but is no SSRF for
    urllib: it would connect to the granted host, so it is left out of the worker-only test.
    """
    out = []
    for url in URLS:
        try:
            host = urlsplit(url.strip()).hostname
        except ValueError:
            continue
        if host and host != "api.example.com" and url.strip().lower().startswith("http"):
            out.append(url)
    return out


def test_corpus_is_large_and_distinct() -> None:
    assert len(set(URLS)) == len(URLS) >= 60
    assert len(set(HOSTS)) == len(HOSTS) >= 60


# --- tools ---------------------------------------------------------------------------------------


def fetch(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as r:
        return str(r.status)


def connect(host: str, port: int) -> str:
    import socket

    socket.create_connection((host, port), timeout=2).close()
    return "connected"


def fetch_encoded(blob: str) -> str:
    import base64
    import urllib.request

    with urllib.request.urlopen(base64.b64decode(blob).decode(), timeout=2) as r:
        return str(r.status)


@pytest.fixture
def trace_path(tmp_path: Path) -> Path:
    return tmp_path / "trace.jsonl"


@pytest.fixture
def session(trace_path: Path) -> Iterator[Session]:
    meta = ToolMetadata(side_effect=SideEffect.NETWORK, capabilities=[GRANT],
                        isolation="tool", limits=Limits(timeout_s=10))
    with Session(validator=presets.net_safe(strict=True), trace=trace_path) as s:
        for name, fn in (("fetch", fetch), ("connect", connect), ("fetch_encoded", fetch_encoded)):
            s.register(name, fn, meta)
        yield s


def _outcome(session: Session, tool: str, **kwargs: object) -> str | SecurityError:
    try:
        return f"NOT REFUSED: returned {session.call(tool, **kwargs)!r}"
    except SecurityError as err:
        return err
    except FailCoreError as err:
        return f"NOT REFUSED: {type(err).__name__}: {err}"


# --- tests ---------------------------------------------------------------------------------------


def test_every_url_form_is_refused(session: Session) -> None:
    failures = []
    layers: dict[str, int] = {}
    for url in URLS:
        out = _outcome(session, "fetch", url=url)
        if isinstance(out, SecurityError):
            layers[out.layer] = layers.get(out.layer, 0) + 1
        else:
            failures.append(f"{url!r}: {out}")
    assert not failures, "\n".join(failures)
    assert layers.get("precheck", 0) > len(URLS) // 2, layers


def test_every_host_hidden_from_the_precheck_is_refused_by_the_worker(session: Session) -> None:
    failures = []
    for host, port in _hidden_targets():
        out = _outcome(session, "connect", host=host, port=port)
        if not isinstance(out, SecurityError):
            failures.append(f"{host!r}:{port}: {out}")
        elif out.layer != "worker":
            failures.append(f"{host!r}:{port}: refused by {out.layer}, not the worker: {out}")
        elif not out.rule.startswith("net_safe"):
            failures.append(f"{host!r}:{port}: refused by rule {out.rule!r}, not net_safe")
    assert not failures, "\n".join(failures)


def test_every_encoded_url_is_refused_by_the_worker(session: Session, trace_path: Path) -> None:
    """Refused by the worker, or rejected by urllib itself before any network operation
    (a bad port, a control character, a non-latin-1 Host header): the trace shows no
    resolve or connect for those calls."""
    targets = _urllib_targets()
    assert len(targets) >= 60
    outcomes = [_outcome(session, "fetch_encoded", blob=base64.b64encode(url.encode()).decode())
                for url in targets]
    records = read_trace(trace_path)
    ends = [r for r in records if r["kind"] == "call.end" and r["body"]["tool"] == "fetch_encoded"]
    assert len(ends) == len(targets)
    failures, rejected_by_client = [], 0
    for url, out, end in zip(targets, outcomes, ends, strict=True):
        if isinstance(out, SecurityError):
            if out.layer != "worker":
                failures.append(f"{url!r}: refused by {out.layer}, not the worker: {out}")
            continue
        net_ops = [r["body"] for r in records if r["kind"] == "guard"
                   and r["call_id"] == end["call_id"] and r["body"]["op"].startswith("net.")]
        if end["body"]["status"] != "failed" or net_ops:
            failures.append(f"{url!r}: {out}; network operations: {net_ops}")
        rejected_by_client += 1
    assert not failures, "\n".join(failures)
    assert rejected_by_client <= 5, "nearly every form must reach the guard to be a real test"


def test_the_session_still_works_after_the_corpus(session: Session) -> None:
    for url in URLS[:10]:
        _outcome(session, "fetch", url=url)
    session.register("ping", lambda: "pong")
    assert session.call("ping") == "pong"
