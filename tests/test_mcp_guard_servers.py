"""``failcore mcp guard`` with real third-party servers from the registries, driven by the
MCP SDK's client: ``mcp-server-fetch`` (PyPI) and ``@modelcontextprotocol/server-filesystem``
(npm, run with ``npx``).

Every scenario runs in a network namespace (and mount namespace) this test creates with
``unshare -n -m``: the "public" host, the internal and metadata addresses and their
tripwire listeners all live on that namespace's loopback, names resolve from a private
hosts file, and ``tests/_guard_scenarios.py`` refuses to run anywhere else. Nothing here
can reach the machine's network even if the guard is broken.

Each runs twice: as root, and unprivileged (the guard and the confined launcher in a user
namespace as uid 65534, with no capability anywhere, so they take the
``CLONE_NEWUSER|CLONE_NEWNET`` path; the kernel uid stays root's so that the interpreter
under /root stays readable, which Landlock, not file modes, must then hold). The escape
scenario also runs as the real uid 65534 (``setpriv``, the system's /usr/bin/python3, which
nobody can read): there RLIMIT_NPROC, which uid 0 ignores, is proven too.

The servers are installed by ``.ci/run``; locally a missing one skips with a reason, in CI
(``CI`` set) it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = REPO / "tests" / "_guard_scenarios.py"
FETCH = Path(sys.executable).parent / "mcp-server-fetch"
FILESYSTEM = REPO / ".mcp-servers" / "node_modules" / ".bin" / "mcp-server-filesystem"
MODES = ["root", "unprivileged"]

pytestmark = [pytest.mark.timeout(240)]


def _missing(what: str, install: str) -> None:
    message = f"{what} is not installed ({install}; .ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _namespace_prefix() -> list[str]:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        _missing("unshare/ip (util-linux, iproute2)", "apt-get install util-linux iproute2")
    prefix = ["unshare", "-n", "-m"] if os.geteuid() == 0 else ["unshare", "-U", "-r", "-n", "-m"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        reason = (f"cannot create a network namespace ({probe.stderr.decode().strip()}); these "
                  "tests attempt non-loopback connections and never run in the open")
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return prefix


def run_scenario(name: str, mode: str) -> dict[str, Any]:
    """Run one scenario in a fresh namespace; its process group is ours to end."""
    argv = [*_namespace_prefix(), sys.executable, str(SCENARIOS), name, mode]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = out.decode().strip().splitlines()
    assert proc.returncode == 0 and lines, f"scenario {name} failed:\n{err.decode()[-4000:]}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def _no_tripwire(result: dict[str, Any]) -> None:
    assert result["tripped"] == {"10.0.0.5": 0, "169.254.169.254": 0, "93.184.216.35": 0}


def _need_fetch() -> None:
    if not FETCH.exists():
        _missing("mcp-server-fetch", f"pip install mcp-server-fetch into {sys.prefix}")


def _need_filesystem() -> None:
    if not FILESYSTEM.exists() or shutil.which("npx") is None:
        _missing("@modelcontextprotocol/server-filesystem",
                 "npm install --prefix .mcp-servers @modelcontextprotocol/server-filesystem")


def _refused_before_forwarding(trace: dict[str, Any], rule_start: str) -> None:
    assert any(r["rule"].startswith(rule_start) for r in trace["refused"]), trace["refused"]


@pytest.mark.parametrize("mode", MODES)
def test_fetch_server_ssrf_refused_public_host_works(mode: str) -> None:
    _need_fetch()
    result = run_scenario("fetch", mode)
    _no_tripwire(result)
    assert result["tools"] == ["fetch"]
    assert not result["public"]["is_error"]
    assert "public page served inside the test namespace" in result["public"]["text"]
    # Refused by the pre-check, never forwarded: the server saw none of these.
    for step, rule in (("metadata", "net_safe: 169.254.0.0/16"), ("internal", "net_safe: 10.0.0.0/8"),
                       ("internal_name", "default_policy=BLOCK"), ("other", "default_policy=BLOCK")):
        assert result[step]["is_error"], step
        assert f"rule: {rule}" in result[step]["text"], result[step]["text"]
    # A redirect to an internal address is the client's next request: the proxy refuses it
    # on the address, and the agent is told which rule.
    for step, rule in (("redirect_internal", "net_safe: 10.0.0.0/8"),
                       ("redirect_metadata", "net_safe: 169.254.0.0/16")):
        assert result[step]["is_error"], step
        assert "FailCore proxy refused" in result[step]["text"] and rule in result[step]["text"]
    assert result["bad_args"]["is_error"] and "guard: input schema" in result["bad_args"]["text"]
    assert result["hits"] == {"/": 1, "/redirect-internal": 1, "/redirect-metadata": 1}
    trace = result["trace"]
    assert trace["verify_ok"], trace["verify_errors"]
    assert trace["kinds"][0] == "session.start" and trace["kinds"][-1] == "session.end"
    _refused_before_forwarding(trace, "net_safe: 169.254.0.0/16")
    forwarded = [r for r in trace["responses"] if r["forwarded"]]
    assert len(forwarded) == 3  # the public page and the two redirects; nothing else
    blocked = {g["host"] for g in trace["guard"] if g["action"] == "block"}
    assert blocked == {"10.0.0.5", "169.254.169.254"}
    assert all(g["observed"] == "parent" for g in trace["guard"])
    layers = trace["start"]["confinement"]
    assert all(layers[k]["in_force"] for k in ("netns", "landlock", "no_new_privs", "capabilities"))
    assert trace["start"]["proxy"] is True
    if mode == "unprivileged":
        assert "CLONE_NEWUSER" in layers["netns"]["reason"]


@pytest.mark.parametrize("mode", MODES)
def test_fetch_server_asked_directly_reaches_only_what_the_proxy_allows(mode: str) -> None:
    _need_fetch()
    result = run_scenario("fetch_direct", mode)
    _no_tripwire(result)
    assert not result["public"]["is_error"]
    for step in ("internal", "metadata", "other", "redirect_internal"):
        assert result[step]["is_error"] and "403" in result[step]["text"], result[step]
    blocked = {e["host"] for e in result["proxy"] if e["action"] == "block"}
    assert blocked == {"10.0.0.5", "169.254.169.254", "93.184.216.35"}


@pytest.mark.parametrize("mode", MODES)
def test_filesystem_server_through_npx(mode: str) -> None:
    _need_filesystem()
    result = run_scenario("fs", mode)
    _no_tripwire(result)
    assert "read_text_file" in result["tools"] and "list_directory" in result["tools"]
    assert "write_file" not in result["tools"]  # [tools.write_file] enabled = false
    assert not result["good"]["is_error"]
    assert result["good"]["text"] == "hello from the granted tree\n"
    for step in ("traversal", "absolute_outside", "relative_traversal", "symlink_out"):
        assert result[step]["is_error"], step
        assert "before it reached the server" in result[step]["text"]
        assert "TOP SECRET" not in result[step]["text"]
    assert "guard: input schema" in result["policy_schema"]["text"]
    assert "guard: tool not served" in result["disabled"]["text"]
    assert "guard: unknown tool" in result["unknown"]["text"]
    trace = result["trace"]
    assert trace["verify_ok"], trace["verify_errors"]
    stages = [r["stage"] for r in trace["refused"]]
    assert stages == ["precheck"] * 4 + ["validate", "disabled", "unknown"]
    assert [r["forwarded"] for r in trace["responses"]] == [True] + [False] * 7


@pytest.mark.parametrize("mode", MODES)
def test_filesystem_server_asked_directly_cannot_read_outside_its_grants(mode: str) -> None:
    # The server's own arguments allow the outside directory; the guard policy does not.
    _need_filesystem()
    result = run_scenario("fs_direct", mode)
    _no_tripwire(result)
    assert result["layers"]["landlock"]
    for step in ("outside", "list_outside"):
        assert result[step]["is_error"] and "EACCES" in result[step]["text"], result[step]
        assert "TOP SECRET" not in result[step]["text"]


@pytest.mark.parametrize("mode", [*MODES, "nobody"])
def test_code_trying_to_escape_gets_kernel_errors(mode: str) -> None:
    # "nobody": the launcher and the code run as the real uid 65534 (setpriv), with the
    # system's Python: a truly unprivileged kernel uid, which RLIMIT_NPROC applies to.
    if shutil.which("node") is None:
        _missing("node", "apt-get install nodejs")
    if mode == "nobody" and (os.geteuid() != 0 or shutil.which("setpriv") is None
                             or not os.access("/usr/bin/python3", os.X_OK)):
        _missing("root, setpriv and /usr/bin/python3", "the nobody variant switches uid")
    result = run_scenario("hostile", mode)
    _no_tripwire(result)
    py = result["python"]
    assert py["write_scratch"] == "ok"
    for key in ("read_secret", "read_etc_shadow", "write_outside", "connect_internal",
                "connect_metadata", "connect_public_not_granted", "connect_public_granted",
                "exec_sh", "bind_port", "mknod_char"):
        assert py[key] == "PermissionError:13", (key, py[key])  # EACCES from Landlock
    assert py["signal_parent"] == "PermissionError:1"  # EPERM: Landlock's signal scope
    assert py["allocate_512mb"] == "MemoryError"  # RLIMIT_DATA from memory_mb = 256
    if mode == "nobody":
        # RLIMIT_NPROC counts the server's own user namespace: the 16th process is refused.
        assert py["fork_40"].startswith("BlockingIOError:11"), py["fork_40"]
    else:
        # The kernel uid is 0 (root, or root mapped into a user namespace), which ignores
        # RLIMIT_NPROC: there the guard's watchdog is what counts (test_mcp_guard.py).
        assert py["fork_40"] == "ok"
    js = result["node"]
    for key in ("read_secret", "write_outside", "exec_sh", "connect_internal", "connect_metadata"):
        assert js[key] == "EACCES", (key, js[key])
    assert result["outside_files"] == ["secret.txt"]
    for runtime in ("python", "node"):
        assert all(result[f"{runtime}_layers"][k] for k in
                   ("netns", "landlock", "landlock_net", "landlock_scopes", "no_new_privs",
                    "capabilities"))
        expected = "unshare(CLONE_NEWNET)" if mode == "root" else "CLONE_NEWUSER"
        assert expected in result[f"{runtime}_netns"]
