"""The launch post's example runs verbatim, and no supernet grant reopens a blocked range.

Both run in a lab (``netns_lab.py``): a fresh network + mount namespace where
``api.github.com`` resolves through a private hosts file to a "public" address on
``lo`` served by a local HTTP server, and the blocked targets (169.254.169.254,
10.0.0.5 and their IPv6 forms) are tripwire listeners that must never see a
connection. Nothing here can leave the machine, even with a broken guard; without root
and ``unshare`` the tests skip. Each runs as root and as ``nobody`` (uid 65534, through
setpriv; the lab makes the interpreter under /root readable for that).
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest
from netns_lab import LabResult, lab_unavailable, run_lab

README = Path(__file__).resolve().parent.parent / "README.md"
GITHUB = "140.82.112.3"  # what api.github.com resolves to in the lab
USERS = ["root", "nobody"]

_why_not = lab_unavailable()
pytestmark = pytest.mark.skipif(_why_not is not None, reason=f"network lab: {_why_not}")


def readme_example() -> str:
    """The README's first Python block, with the one change the lab needs (no TLS)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    first = blocks[0]
    assert first.count('"https://api.github.com"') == 1
    return first.replace('"https://api.github.com"', '"http://api.github.com"')


def test_the_readme_example_is_the_launch_post_verbatim() -> None:
    post = textwrap.dedent('''\
        session = Session(validator=presets.net_safe(strict=True))
        session.register("http_get", http_get, metadata=ToolMetadata(
            risk_level=RiskLevel.HIGH, side_effect=SideEffect.NETWORK, default_policy=DefaultPolicy.BLOCK))
        try:
            session.call("http_get", url="http://169.254.169.254/latest/meta-data/")
        except SecurityError as e:
            print(f"Attack Neutralized: {e}")
        result = session.call("http_get", url="https://api.github.com")   # "Legitimate Traffic: Target Public Internet"
        print("Success:", result.status)
        ''')
    block = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)[0]
    assert block.endswith(post), "the README's first code block must end with the post's example"
    assert "def http_get(url" in block and "urllib" in block


@pytest.mark.parametrize("user", USERS)
def test_the_readme_example_runs(user: str) -> None:
    lab = run_lab(readme_example(), hosts={"api.github.com": GITHUB}, http=[f"{GITHUB}:80"],
                  tripwires=["169.254.169.254:80"], user=user, timeout_s=120)
    assert lab.tripwires == {"169.254.169.254:80": 0}, lab
    attack = [line for line in lab.stdout.splitlines() if line.startswith("Attack Neutralized: ")]
    assert len(attack) == 1 and "169.254.0.0/16" in attack[0], lab
    assert lab.http == {f"{GITHUB}:80": 1}, lab  # the public call reached the "internet"
    if lab.rc != 0 and "could not be serialised" in lab.stderr and "Response" in lab.stderr:
        pytest.xfail("the Response dataclass defined in the script does not cross the "
                     "worker boundary yet (issue 10 item 3, branch 'reply'); everything up "
                     "to its delivery ran as the post says")
    assert lab.rc == 0, lab.stderr
    assert lab.stdout.splitlines()[-1] == "Success: 200", lab.stdout


# --- supernets, with tripwires on every blocked form --------------------------------------

TRIPWIRES = [
    "169.254.169.254:80", "10.0.0.5:80", "[64:ff9b::a9fe:a9fe]:80", "[2002:a9fe:a9fe::1]:80",
    "[2001:0:4136:e378:8000:63bf:5601:5601]:80", "[64:ff9b::a00:5]:80", "[2002:a00:5::1]:80",
    "[2001:0:4136:e378:8000:63bf:f5ff:fffa]:80", "[fd00:ec2::254]:80",
]
# Every spelling of the two targets a resolver or URL parser accepts; each lands on a
# tripwire above (the IPv4-mapped ones on the IPv4 listener).
TARGETS = [
    "169.254.169.254", "2852039166", "0xa9fea9fe", "0251.0376.0251.0376", "169.254.43518",
    "::ffff:169.254.169.254", "::ffff:a9fe:a9fe", "64:ff9b::a9fe:a9fe",
    "64:ff9b::169.254.169.254", "2002:a9fe:a9fe::1", "2001:0:4136:e378:8000:63bf:5601:5601",
    "fd00:ec2::254",
    "10.0.0.5", "167772165", "012.0.0.5", "0xa.0.0.5", "10.5", "::ffff:10.0.0.5",
    "64:ff9b::a00:5", "2002:a00:5::1", "2001:0:4136:e378:8000:63bf:f5ff:fffa",
]
# grant -> a public address inside it, served over HTTP: the grant still reaches that.
SUPERNETS = {
    "0.0.0.0/0": GITHUB, "[::]/0": "2606:4700::1111", "169.0.0.0/8": "169.1.2.3",
    "10.0.0.0/7": "11.0.0.1", "[::ffff:0:0]/96": f"::ffff:{GITHUB}",
    "[64:ff9b::]/96": "64:ff9b::8c52:7003", "[2002::]/16": "2002:8c52:7003::1",
    "[2001::]/32": "2001:0:4136:e378:8000:63bf:73ad:8ffc", "public": GITHUB,
}
PUBLIC_SERVERS = sorted({h for h in SUPERNETS.values() if not h.startswith("::ffff:")})

PAYLOAD = '''
import json, socket, sys
from failcore import FailCoreError, SecurityError, Session, SideEffect, ToolMetadata, presets

TARGETS, SUPERNETS = json.loads(sys.argv[1] if len(sys.argv) > 1 else %r)


def connect(host: str, port: int) -> str:
    with socket.create_connection((host, port), timeout=3) as s:
        s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
        return s.recv(12).decode()


def fetch(url: str) -> int:
    from urllib.request import urlopen
    with urlopen(url, timeout=3) as r:
        return r.status


def url(host: str) -> str:
    return f"http://[{host}]/latest/meta-data/" if ":" in host else f"http://{host}/latest/meta-data/"


def outcome(session, tool, **kwargs):
    try:
        return f"REACHED {session.call(tool, **kwargs)!r}"
    except SecurityError as e:
        return f"blocked:{e.layer}"
    except FailCoreError as e:
        return f"error:{type(e).__name__}: {e}"[:300]


def net(*caps):
    return ToolMetadata(side_effect=SideEffect.NETWORK, capabilities=list(caps))


out = {"blocked": {}, "reached": {}}
with Session(validator=presets.net_safe(strict=True)) as s:
    for i, (grant, inside) in enumerate(SUPERNETS.items()):
        s.register(f"c{i}", connect, net(f"net:connect:{grant}"))
        s.register(f"f{i}", fetch, net(f"net:connect:{grant}"))
        for target in TARGETS:
            out["blocked"][f"{grant} connect {target}"] = outcome(s, f"c{i}", host=target, port=80)
            out["blocked"][f"{grant} fetch {target}"] = outcome(s, f"f{i}", url=url(target))
        out["reached"][f"{grant} -> {inside}"] = outcome(s, f"f{i}", url=url(inside)[:-len("latest/meta-data/")])
    # Named hosts and grants inside a blocked range: unchanged.
    s.register("named", fetch, net("net:connect:api.github.com:80"))
    out["reached"]["api.github.com by name"] = outcome(s, "named", url="http://api.github.com/")
    s.register("inside", connect, net("net:connect:10.1.2.0/24:80"))
    out["reached"]["10.1.2.0/24 -> 10.1.2.3"] = outcome(s, "inside", host="10.1.2.3", port=80)
# No policy at all: the NETWORK default (public) is still public-only.
with Session() as s:
    s.register("default", connect, ToolMetadata(side_effect=SideEffect.NETWORK))
    s.register("default_fetch", fetch, ToolMetadata(side_effect=SideEffect.NETWORK))
    for target in TARGETS:
        out["blocked"][f"no policy, default connect {target}"] = outcome(s, "default", host=target, port=80)
        out["blocked"][f"no policy, default fetch {target}"] = outcome(s, "default_fetch", url=url(target))
    out["reached"]["no policy, default -> api.github.com"] = outcome(s, "default_fetch", url="http://api.github.com/")
print(json.dumps(out))
'''


def _supernet_lab(user: str) -> tuple[LabResult, dict[str, dict[str, str]]]:
    script = PAYLOAD % json.dumps([TARGETS, SUPERNETS])
    http = [f"[{h}]:80" if ":" in h else f"{h}:80" for h in PUBLIC_SERVERS] + ["10.1.2.3:80"]
    lab = run_lab(script, hosts={"api.github.com": GITHUB}, http=http, tripwires=TRIPWIRES,
                  user=user, timeout_s=200)
    assert lab.rc == 0, lab.stderr
    return lab, json.loads(lab.stdout.splitlines()[-1])


@pytest.mark.parametrize("user", USERS)
def test_no_supernet_grant_reaches_a_blocked_range_in_any_encoding(user: str) -> None:
    lab, out = _supernet_lab(user)
    assert lab.tripwires == dict.fromkeys(TRIPWIRES, 0), lab.tripwires
    wrong = {k: v for k, v in out["blocked"].items() if not v.startswith("blocked:")}
    assert not wrong, wrong
    assert len(out["blocked"]) == 2 * len(TARGETS) * (len(SUPERNETS) + 1)
    unreached = {k: v for k, v in out["reached"].items() if not v.startswith("REACHED")}
    assert not unreached, unreached
    served = {k.strip("[]").rsplit(":", 1)[0].strip("[]"): n for k, n in lab.http.items()}
    assert all(served.get(h, 0) >= 1 for h in PUBLIC_SERVERS), lab.http
