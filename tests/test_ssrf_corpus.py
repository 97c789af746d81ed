"""A corpus of SSRF URL forms: refused by layer 1 (check_host on the URL's host, as the
parent pre-check does) and, inside a private network namespace, at connect time by the
guards in a real worker-like process. Plus legitimate forms that stay allowed when granted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from failcore_worker.rules import Grants, NetRule, check_host

REPO = str(Path(__file__).resolve().parent.parent)

SSRF = [
    # IPv4 loopback in every encoding
    "http://127.0.0.1/", "http://127.1/", "http://127.0.1/", "http://2130706433/",
    "http://0x7f000001/", "http://0X7F000001/", "http://0x7f.0x0.0x0.0x1/", "http://0177.0.0.1/",
    "http://017700000001/", "http://0177.1/", "http://0x7f.1/", "http://127.0.0.1./",
    "http://127.000.000.001/", "http://127.127.127.127/", "http://0x00000000007f000001/",
    "http://127.0.0.1:8080/admin", "gopher://127.0.0.1:6379/_INFO",
    # unspecified
    "http://0/", "http://0.0.0.0/", "http://0x0/", "http://[::]/", "http://[0:0:0:0:0:0:0:0]/",
    # cloud metadata
    "http://169.254.169.254/latest/meta-data/", "http://169.254.43518/", "http://2852039166/",
    "http://0xa9fea9fe/", "http://0251.0376.0251.0376/", "http://0xa9.0xfe.0xa9.0xfe/",
    "http://169.0xfe.169.254/", "http://0251.254.43518/", "http://good@169.254.169.254/",
    "http://good:pass@169.254.169.254:80/", "http://%31%36%39.254.169.254/",
    "http://%2531%2536%2539.254.169.254/", "http://169.254.169.254.nip.io/",
    "http://metadata.google.internal/computeMetadata/v1/", "http://metadata/",
    "http://instance-data/latest/", "http://[fd00:ec2::254]/", "http://100.100.100.200/",
    "http://192.0.0.192/",
    # private and shared ranges
    "http://10.0.0.1/", "http://10.1/", "http://167772161/", "http://172.16.0.1/",
    "http://192.168.0.1/", "http://192.168.1/", "http://0xc0a80001/", "http://100.64.0.1/",
    # IPv6 loopback, mapped, compatible, NAT64, 6to4, Teredo, link-local, ULA
    "http://[::1]/", "https://[::1]:443/", "http://[0:0:0:0:0:0:0:1]/", "http://user@[::1]:80/",
    "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/", "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:a9fe:a9fe]/", "http://[0:0:0:0:0:ffff:127.0.0.1]/", "http://[::127.0.0.1]/",
    "http://[::169.254.169.254]/", "http://[64:ff9b::169.254.169.254]/",
    "http://[64:ff9b::a9fe:a9fe]/", "http://[64:ff9b:1::a9fe:a9fe]/", "http://[2002:a9fe:a9fe::]/",
    "http://[2002:7f00:1::1]/", "http://[2001:0:4136:e378:8000:63bf:5601:5601]/",
    "http://[fe80::1%25eth0]/", "http://[fe80::a9fe:a9fe]/", "http://[fc00::1]/",
    "http://[fec0::1]/", "http://[ff02::1]/", "http://[::ffff:0:a9fe:a9fe]/",
    # localhost and other internal names
    "http://localhost/", "http://LOCALHOST/", "http://localhost./", "http://foo.localhost/",
    "http://localhost.localdomain/", "http://ip6-localhost/", "http://%6c%6f%63%61%6c%68%6f%73%74/",
    "http://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/",  # fullwidth "localhost"
    "http://\uff11\uff12\uff17.\uff10.\uff10.\uff11/",  # fullwidth digits
    "http://127\u30020\u30020\u30021/",  # ideographic full stops
    "http://service.internal/", "http://printer.local/", "http://0x7f.0.0.1.nip.io/",
    "http://127.0.0.1.sslip.io/",
    # multicast, broadcast, reserved, benchmarking, documentation
    "http://224.0.0.1/", "http://255.255.255.255/", "http://240.0.0.1/", "http://198.18.0.1/",
    "http://192.0.2.1/",
    # not valid addresses at all, but a resolver may still make something of them
    "http://1.2.3.4.5/", "http://08.0.0.1/",
]

ALLOWED = [
    ("http://api.example.com/", "api.example.com", 80),
    ("https://API.EXAMPLE.COM./v1", "api.example.com", 443),
    ("http://user:pw@api.example.com/", "api.example.com", 80),
    ("https://a.cdn.example.net/x", "*.cdn.example.net", 443),
    ("http://93.184.216.34/", "93.184.216.34", 80),
    ("http://[2606:4700::1111]/", "2606:4700::1111", 80),
    ("http://127.0.0.1:8080/", "127.0.0.1", 8080),
    ("http://localhost:8080/", "127.0.0.1", 8080),
    ("http://localhost:8080/", "localhost", 8080),
    ("http://[::1]:8080/", "::1", 8080),
    ("http://10.0.0.5:5432/", "10.0.0.5", 5432),
    ("http://10.0.0.5:5432/", "10.0.0.0/24", 5432),
    ("http://metadata.google.internal/", "metadata.google.internal", 80),
]

SAFE = Grants(net=(NetRule("*"), NetRule("*.example.com")), block_ranges=True)


def host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None, url
    return parts.hostname, parts.port or {"https": 443, "gopher": 70}.get(parts.scheme, 80)


def test_corpus_is_large_and_distinct() -> None:
    assert len(SSRF) >= 60 and len(set(SSRF)) == len(SSRF)


@pytest.mark.parametrize("url", SSRF)
def test_layer1_blocks(url: str) -> None:
    host, port = host_port(url)
    verdict = check_host(SAFE, host, port)
    assert verdict.action == "block" and verdict.rule.startswith("net_safe"), (url, verdict)
    assert verdict.reason


@pytest.mark.parametrize("url, granted, port", ALLOWED)
def test_layer1_allows_what_is_granted(url: str, granted: str, port: int) -> None:
    host, url_port = host_port(url)
    assert url_port == port
    grants = Grants(net=(NetRule(granted, port, port, f"net:connect:{granted}:{port}"),),
                    block_ranges=True)
    verdict = check_host(grants, host, port)
    assert verdict.action == "allow" and verdict.rule == f"capability net:connect:{granted}:{port}"
    assert check_host(grants, host, port + 1).action == "block"


@pytest.mark.netns
def test_guards_block_the_corpus_at_connect_time(tmp_path: Path) -> None:
    """In a fresh interpreter with the guards on, try every URL host as a client would:
    resolve then connect (create_connection), and a raw socket connect with the host as
    written (names are judged before CPython resolves them). Each must be refused by the
    guard, not by the (empty) network."""
    implicit = sorted({os.path.realpath(p) for p in (
        sys.prefix, sys.base_prefix, *sysconfig.get_paths().values(), os.path.join(REPO, "worker"))})
    grants = Grants(net=SAFE.net, block_ranges=True, implicit_read=tuple(implicit))
    targets = [host_port(url) for url in SSRF]
    script = textwrap.dedent(f"""
        import json, os, socket, sys
        sys.path.insert(0, {REPO!r})
        from failcore_worker import guards
        from failcore_worker.rules import Grants
        guards.install(Grants.from_wire(json.loads({json.dumps(grants.to_wire())!r})), {str(tmp_path)!r})
        results = []
        for host, port in json.loads({json.dumps(targets)!r}):
            row = []
            for how in ("create_connection", "raw"):
                try:
                    if how == "create_connection":
                        socket.create_connection((host, port), timeout=0.3).close()
                    else:
                        family = socket.AF_INET6 if ":" in host else socket.AF_INET
                        with socket.socket(family) as s:
                            s.settimeout(0.3)
                            s.connect((host, port))
                    row.append("connected")
                except guards.GuardDenied as exc:
                    row.append("denied")
                except (OSError, UnicodeError) as exc:
                    row.append("error " + type(exc).__name__ + " " + str(exc)[:80])
            results.append(row)
        print(json.dumps(results))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for url, (via_resolver, raw) in zip(SSRF, results, strict=True):
        assert via_resolver == "denied", (url, via_resolver)
        assert raw == "denied", (url, raw)
