"""``Policy.explain`` and ``failcore policy explain``: every layer's rules and the verdict for
a prospective call, without running anything."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from failcore import Budget, Policy, Scan, presets
from failcore._cli import main
from failcore._policy import load_policy

ROOT = Path(__file__).resolve().parent.parent
STRICT = ROOT / "policies" / "strict.toml"
GH = "net:connect:api.github.com:443"


def layer(explanation: Any, name: str) -> list[Any]:
    return [r for r in explanation.rules if r.layer == name]


def test_allowed_call_lists_every_layer() -> None:
    e = presets.net_safe(strict=True).explain("http_get", {"url": "https://api.github.com/x"}, [GH])
    assert e.verdict == "allow" and not e.needs_approval
    assert e.granted == (GH,)
    [cap] = layer(e, "capabilities")
    assert (cap.subject, cap.action) == (GH, "allow")
    [pre] = layer(e, "precheck")
    assert (pre.subject, pre.action) == ("args.url", "allow")
    worker = layer(e, "worker")
    assert any(r.rule == GH and r.action == "allow" for r in worker)
    assert any(r.rule == "net_safe: special ranges" and r.action == "block" for r in worker)
    assert any(r.subject == "default" and r.action == "block" for r in worker)
    assert [r.rule for r in layer(e, "scan")] == ["scan: results"]


def test_ssrf_is_blocked_at_the_precheck() -> None:
    e = presets.net_safe(strict=True).explain(
        "http_get", {"url": "http://169.254.169.254/latest/meta-data/"}, [GH])
    assert e.verdict == "block"
    [pre] = layer(e, "precheck")
    assert pre.action == "block" and "169.254.0.0/16" in pre.rule


def test_audit_mode_warns_instead() -> None:
    # The tool's own default decides what no grant covers; the policy's ranges only warn.
    e = presets.net_safe(strict=False).explain("http_get", {"url": "http://10.0.0.5/"}, [GH],
                                               default_policy="WARN")
    assert e.verdict == "warn"
    assert layer(e, "precheck")[0].rule.endswith("(warn_only)")


def test_refused_capabilities_warn_and_do_not_block() -> None:
    e = presets.strict(root="/srv").explain("tool", {}, ["fs:read:/etc", "proc:exec:/bin/ls"])
    caps = {r.subject: r for r in layer(e, "capabilities")}
    assert caps["fs:read:/etc"].action == "block" and "outside" in caps["fs:read:/etc"].reason
    assert caps["proc:exec:/bin/ls"].rule == "strict: exec denied"
    assert e.granted == () and e.verdict == "warn"


def test_registration_invariants_block() -> None:
    e = Policy().explain("deploy", {}, [], risk_level="HIGH", default_policy="ALLOW")
    [reg] = layer(e, "registration")
    assert reg.action == "block" and "default_policy=ALLOW" in reg.reason
    assert e.verdict == "block"


def test_guardrails_are_explained() -> None:
    policy = Policy(name="guarded", budget=Budget(calls=100),
                    tool_budgets={"deploy": Budget(calls_per_minute=2)},
                    scan=Scan(actions={"secrets": "block"}), approve_tools=("deploy",))
    e = policy.explain("deploy", {"note": "key AKIA" + "IOSFODNN7EXAMPLE", "to": "ann@example.com"})
    assert e.verdict == "block" and e.needs_approval
    scan = {r.subject: r for r in layer(e, "scan")}
    assert scan["args.note"].action == "block" and scan["args.to"].action == "warn"
    assert all("AKIA" not in r.reason and "ann@" not in r.reason for r in e.rules)
    budgets = {(r.subject, r.rule) for r in layer(e, "budget")}
    assert budgets == {("session", "budget: calls"), ("tool deploy", "budget: calls_per_minute")}
    assert [r.rule for r in layer(e, "approval")] == ["approval: policy"]
    no_approver = policy.explain("deploy", {}, approver=False)
    assert any(r.rule == "approval: no approver" for r in layer(no_approver, "registration"))
    assert no_approver.verdict == "block"


def test_high_risk_needs_approval_only_with_an_approver() -> None:
    assert Policy().explain("t", {}, risk_level="HIGH", approver=True).needs_approval
    assert not Policy().explain("t", {}, risk_level="HIGH", approver=False).needs_approval
    assert layer(Policy().explain("t", {}, risk_level="HIGH"), "approval")


def test_explain_resolves_no_names(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("explain must not resolve names")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "gethostbyname", refuse)
    e = presets.net_safe(strict=True).explain(
        "http_get", {"url": "http://internal.corp.example/"}, ["net:connect:internal.corp.example:80"])
    assert e.verdict == "allow"


# --- the command line ----------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_text_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "explain", str(STRICT), "--tool", "http_get",
                       "--cap", GH, "--arg", "url=http://169.254.169.254/")
    assert code == 1
    assert "[precheck]" in out and "169.254.0.0/16" in out and "verdict: BLOCK" in out
    code, out, _ = run(capsys, "policy", "explain", str(STRICT), "--tool", "http_get",
                       "--cap", GH, "--arg", "url=https://api.github.com/")
    assert code == 0 and "verdict: ALLOW" in out


def test_cli_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "policy", "explain", str(STRICT), "--tool", "deploy",
                       "--risk", "high", "--approver", "yes", "--arg", 'payload={"n": 5}',
                       "--arg", "count=3", "--json")
    data = json.loads(out)
    assert code == 0 and data["needs_approval"] is True and data["risk_level"] == "HIGH"
    assert {r["layer"] for r in data["rules"]} >= {"worker", "scan", "approval"}
    assert data["policy"] == "strict"


def test_cli_secret_arguments_are_not_scanned(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[policy]\nname = "p"\n[scan]\nactions = { secrets = "block" }\n')
    token = "gh" + "p_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"
    code, out, _ = run(capsys, "policy", "explain", str(path), "--tool", "t", "--arg",
                       f"token={token}")
    assert code == 1 and token not in out
    code, out, _ = run(capsys, "policy", "explain", str(path), "--tool", "t", "--arg",
                       f"token={token}", "--secret", "token")
    assert code == 0


@pytest.mark.parametrize("argv", [
    ["--tool", "t", "--arg", "novalue"],
    ["--tool", "t", "--cap", "net:connect:"],
    ["--tool", "t", "--risk", "EXTREME"],
])
def test_cli_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, _, _ = run(capsys, "policy", "explain", str(STRICT), *argv)
    assert code == 2


def test_cli_missing_policy(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "policy", "explain", str(tmp_path / "none.toml"), "--tool", "t")
    assert code == 2 and "no such file" in err


def test_policy_explain_equals_the_file_loaded() -> None:
    assert load_policy(STRICT).explain("t", {}).policy == "strict"
