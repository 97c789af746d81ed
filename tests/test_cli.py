"""The ``failcore`` command line and re-judging (``failcore replay``)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from failcore import _cli
from failcore._metadata import DefaultPolicy
from failcore._rejudge import Finding, rejudge
from failcore._trace import TraceWriter, read_trace
from failcore_worker.rules import Grants, GuardEvent, Verdict

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "failcore_sample_traces", ROOT / "tests" / "fixtures" / "sample_traces.py")
assert _spec is not None and _spec.loader is not None
samples: Any = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(samples)

SUBCOMMANDS = (["show"], ["verify"], ["replay"], ["report"], ["policy"], ["policy", "check"])


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    path = tmp_path / "trace.jsonl"
    samples.write_sample_trace(str(path))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = _cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


class FakePolicy:
    """Blocks metadata URLs at the pre-check and every exec in the worker; allows the rest."""

    name = "fake"

    def grants(self, caps: Any, default: DefaultPolicy, defaults: Any = ()) -> Grants:
        return Grants(default=default.value.lower())  # type: ignore[arg-type]

    def precheck(self, grants: Grants, args: Mapping[str, Any]) -> list[tuple[str, Verdict]]:
        return [(k, Verdict("block", "fake: metadata", "no metadata"))
                for k, v in args.items() if isinstance(v, str) and "169.254" in v]

    def rejudge(self, event: GuardEvent, grants: Grants) -> Verdict:
        if event.get("op") == "proc.exec":
            return Verdict("block", "fake: no exec", "no programs")
        return Verdict("allow", "fake: fine", "")


class AllowAll(FakePolicy):
    name = "allow"

    def precheck(self, grants: Grants, args: Mapping[str, Any]) -> list[tuple[str, Verdict]]:
        return []

    def rejudge(self, event: GuardEvent, grants: Grants) -> Verdict:
        return Verdict("allow", "ok", "")


# --- rejudge ------------------------------------------------------------------------------


def test_rejudge_lists_new_and_lifted_blocks(sample: Path) -> None:
    findings = rejudge(read_trace(sample), FakePolicy())
    by_key = {(f.call_id, f.layer): f for f in findings}
    assert set(by_key) == {("c000001", "precheck"), ("c000003", "worker"), ("c000005", "worker")}
    kept = by_key["c000001", "precheck"]
    assert (kept.what, kept.original, kept.verdict.action, kept.changed) == ("url", "block", "block", False)
    lifted = by_key["c000003", "worker"]
    assert lifted.newly_allowed and lifted.what == "fs.open /etc/passwd" and lifted.tool == "read_file"
    new = by_key["c000005", "worker"]
    assert new.newly_blocked and new.original == "warn" and new.verdict.rule == "fake: no exec"
    assert new.to_json()["changed"] is True


def test_rejudge_reports_precheck_findings_the_new_policy_drops(sample: Path) -> None:
    findings = rejudge(read_trace(sample), AllowAll())
    assert [(f.call_id, f.layer, f.original, f.verdict.action) for f in findings] == [
        ("c000001", "precheck", "block", "allow"),
        ("c000003", "worker", "block", "allow"),
        ("c000005", "worker", "warn", "allow"),
    ]
    assert all(isinstance(f, Finding) for f in findings)


def test_rejudge_passes_tool_grants_and_args(sample: Path) -> None:
    seen: list[tuple[str, Any]] = []

    class Spy(AllowAll):
        def grants(self, caps: Any, default: DefaultPolicy, defaults: Any = ()) -> Grants:
            seen.append(("grants", (list(caps), default)))
            return super().grants(caps, default, defaults)

        def precheck(self, grants: Grants, args: Mapping[str, Any]) -> list[tuple[str, Verdict]]:
            seen.append(("precheck", dict(args)))
            return []

    rejudge(read_trace(sample), Spy())
    assert seen[:3] == [
        ("grants", (["net:connect:api.github.com:443"], DefaultPolicy.BLOCK)),
        ("grants", (["fs:read:/data"], DefaultPolicy.BLOCK)),
        ("grants", (["proc:exec:/bin/ls"], DefaultPolicy.WARN)),
    ]
    assert ("precheck", {"argv": ["cat", "x"], "token": "<secret>"}) in seen


# --- show / verify --------------------------------------------------------------------------


def test_show_prints_one_line_per_call(sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "show", str(sample))
    assert code == 0 and err == ""
    call_lines = [line for line in out.splitlines() if line.startswith("c0000")]
    assert [line.split()[:3] for line in call_lines] == [
        ["c000001", "http_get", "blocked"], ["c000002", "http_get", "ok"],
        ["c000003", "read_file", "blocked"], ["c000004", "read_file", "invalid_input"],
        ["c000005", "run", "ok"], ["c000006", "http_get", "timeout"],
    ]
    assert "41.5 ms" in out
    assert "    block [precheck] url  rule: net_safe: 169.254.0.0/16" in out
    assert "    block [worker] fs.open /etc/passwd  rule: default_policy=BLOCK" in out
    assert "    warn  [worker] proc.exec /usr/bin/cat" in out
    assert "verify ok" in out
    assert "6 calls (2 blocked, 1 invalid_input, 2 ok, 1 timeout); 2 blocked attempts" in out


def test_show_json(sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "show", str(sample), "--json")
    data = json.loads(out)
    assert code == 0
    assert data["counts"] == samples.SAMPLE_COUNTS | {"sessions": 1}
    assert [c["status"] for c in data["calls"]] == ["blocked", "ok", "blocked", "invalid_input",
                                                    "ok", "timeout"]
    assert data["verify"]["ok"] is True


def test_show_escapes_terminal_control_characters(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.jsonl"
    with TraceWriter(path) as w:
        w.record("call.start", "c000001", {"tool": "evil\x1b[2J\x07", "args": {}})
        w.record("guard", "c000001", {"op": "fs.open", "path": "/x\x1b]0;pwned\x07", "action": "block",
                                      "rule": "r\x1b[31m", "reason": ""})
    code, out, _ = run(capsys, "show", str(path))
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert "\\x1b[2J" in out


def test_show_on_a_tampered_trace_says_so(sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = sample.read_bytes().split(b"\n")
    del lines[3]
    sample.write_bytes(b"\n".join(lines))
    code, out, _ = run(capsys, "show", str(sample))
    assert code == 0 and "verify FAILED" in out


def test_verify_ok_and_failed(sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "verify", str(sample))
    assert code == 0 and out.startswith(f"OK: {sample}: 42 records")
    lines = sample.read_bytes().split(b"\n")
    lines[10], lines[11] = lines[11], lines[10]
    sample.write_bytes(b"\n".join(lines))
    code, out, _ = run(capsys, "verify", str(sample))
    assert code == 1
    assert "error: line 11: seq is 11, expected 10" in out and "FAILED" in out
    code, out, _ = run(capsys, "verify", str(sample), "--json")
    assert code == 1 and json.loads(out)["ok"] is False


def test_verify_truncated_trace_passes_with_warning(sample: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    sample.write_bytes(sample.read_bytes()[:-7])
    code, out, _ = run(capsys, "verify", str(sample))
    assert code == 0 and "warning: truncated final line" in out


# --- replay ---------------------------------------------------------------------------------


def test_replay_with_a_blocking_policy(sample: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cli, "_load_policy", lambda path: FakePolicy())
    code, out, _ = run(capsys, "replay", str(sample), "--policy", "p.toml")
    assert code == 1
    assert "under policy fake (p.toml)" in out
    [new] = [line for line in out.splitlines() if "NEW" in line]
    assert new.startswith("c000005") and "proc.exec /usr/bin/cat" in new and "fake: no exec" in new
    [lifted] = [line for line in out.splitlines() if "ALLOWED NOW" in line]
    assert lifted.startswith("c000003") and "fs.open /etc/passwd" in lifted
    assert "would block 2 (1 not blocked originally); 1 originally blocked would be allowed" in out
    code, out, _ = run(capsys, "replay", str(sample), "--policy", "p.toml", "--json")
    data = json.loads(out)
    assert code == 1 and (data["would_block"], data["newly_blocked"], data["newly_allowed"]) == (2, 1, 1)


def test_replay_with_a_permissive_policy_exits_0(sample: Path, capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cli, "_load_policy", lambda path: AllowAll())
    code, out, _ = run(capsys, "replay", str(sample), "--policy", "p.toml")
    assert code == 0 and "would block 0" in out and "3 originally blocked" not in out


def test_replay_without_policy_lists_recorded_decisions(sample: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "replay", str(sample))
    assert code == 0 and "3 recorded decisions" in out


def test_replay_with_a_shipped_policy_file(sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy_module = pytest.importorskip("failcore._policy")
    if not hasattr(policy_module, "load_policy"):
        pytest.skip("failcore._policy.load_policy is not available yet")
    code, out, err = run(capsys, "replay", str(sample), "--policy", str(ROOT / "policies" / "strict.toml"))
    assert code == 1, err
    assert "proc.exec /usr/bin/cat" in out and "strict: exec denied" in out


def test_replay_with_a_missing_policy_file(sample: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "replay", str(sample), "--policy", str(tmp_path / "nope.toml"))
    assert code == 2 and "no such file" in err


# --- report / policy check / misc -----------------------------------------------------------


def test_report_writes_html(sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_path = tmp_path / "report.html"
    code, out, _ = run(capsys, "report", str(sample), "-o", str(out_path))
    assert code == 0 and "verify ok" in out
    assert 'id="failcore-summary"' in out_path.read_text(encoding="utf-8")
    code, _, err = run(capsys, "report", str(sample), "-o", str(tmp_path / "no" / "dir" / "r.html"))
    assert code == 2 and "cannot write" in err


def test_policy_check(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    policy_module = pytest.importorskip("failcore._policy")
    good = tmp_path / "good.toml"
    good.write_text("[policy]\n", encoding="utf-8")
    monkeypatch.setattr(policy_module, "check_policy_file",
                        lambda path: [] if str(path) == str(good) else ["key 'x': unknown key"],
                        raising=False)
    code, out, _ = run(capsys, "policy", "check", str(good))
    assert code == 0 and out.startswith("OK")
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy]\nx = 1\n", encoding="utf-8")
    code, out, _ = run(capsys, "policy", "check", str(bad))
    assert code == 1 and "problem: key 'x': unknown key" in out
    for missing in (tmp_path / "missing.toml", tmp_path):
        code, _, err = run(capsys, "policy", "check", str(missing))
        assert code == 2 and err.count("\n") == 1


def test_policy_check_on_shipped_files(capsys: pytest.CaptureFixture[str]) -> None:
    policy_module = pytest.importorskip("failcore._policy")
    if not hasattr(policy_module, "check_policy_file"):
        pytest.skip("failcore._policy.check_policy_file is not available yet")
    for path in sorted((ROOT / "policies").glob("*.toml")):
        code, out, _ = run(capsys, "policy", "check", str(path))
        assert code == 0, out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("failcore ")


@pytest.mark.parametrize("argv", [[], *SUBCOMMANDS])
def test_help_everywhere(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *argv, "--help")
    assert code == 0
    assert "exit codes:" in out and "usage: failcore" in out
    assert len(out.split("\n\n")[1]) > 80  # a real description paragraph


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys)[0] == 2  # no command: help on stderr
    assert run(capsys, "policy")[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys, "report", "t.jsonl")[0] == 2  # -o is required
    assert run(capsys, "show")[0] == 2


BAD_INPUTS = {
    "missing": None,
    "empty": b"",
    "binary": bytes(range(256)) * 4,
    "not a trace": b'{"hello": "world"}\n',
    "json list": b"[1, 2, 3]\n",
    "only a partial line": b'{"body":{',
}


@pytest.mark.parametrize("command", [["show"], ["show", "--json"], ["verify"], ["replay"],
                                     ["report", "-o", "REPORT"]])
@pytest.mark.parametrize("kind", [*BAD_INPUTS, "directory"])
def test_bad_input_exits_2_without_traceback(command: list[str], kind: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "input.jsonl"
    if kind == "directory":
        path.mkdir()
    elif BAD_INPUTS[kind] is not None:
        path.write_bytes(BAD_INPUTS[kind])  # type: ignore[arg-type]
    argv = [command[0], str(path), *[str(tmp_path / "r.html") if a == "REPORT" else a
                                     for a in command[1:]]]
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith(f"failcore {command[0]}: error: ") and err.count("\n") == 1
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "r.html").exists()


def test_console_entry_point_in_a_real_process(sample: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "failcore._cli", "verify", str(sample)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("OK:")
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01\x02\xff\n" * 10)
    proc = subprocess.run([sys.executable, "-m", "failcore._cli", "show", str(garbage)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "not valid UTF-8" in proc.stderr


def test_policy_check_warns_about_allow_entries_holding_blocked_ranges(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "wide.toml"
    path.write_text('[policy]\nblock_ranges = true\nallow = ["net:connect:0.0.0.0/0:443", '
                    '"net:connect:10.1.2.0/24", "net:connect:public", '
                    '"net:connect:[::]/0"]\n', encoding="utf-8")
    code, out, _ = run(capsys, "policy", "check", str(path))
    assert code == 0 and out.splitlines()[-1] == f"OK: {path} (2 warning(s))", out
    lines = [line for line in out.splitlines() if line.startswith("warning:")]
    assert "allow entry net:connect:0.0.0.0/0:443 contains ranges net_safe blocks" in lines[0]
    assert "10.0.0.0/8 (private)" in lines[0] and "and 13 more" in lines[0]
    assert "net:connect:[::]/0" in lines[1] and "::1/128 (loopback)" in lines[1]
    assert "10.1.2.0/24" not in " ".join(lines).split("e.g.")[0]  # inside 10/8: no warning
    open_path = tmp_path / "open.toml"
    open_path.write_text('[policy]\nallow = ["net:connect:169.0.0.0/8"]\n', encoding="utf-8")
    code, out, _ = run(capsys, "policy", "check", str(open_path))
    assert code == 0 and "block_ranges is off" in out and "169.254.0.0/16" in out
    assert "net:connect:public@169.0.0.0/8" in out


def test_replay_warns_about_recorded_grants_holding_blocked_ranges(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from failcore import Session, SideEffect, ToolMetadata

    trace = tmp_path / "trace.jsonl"
    with Session(trace=trace) as s:
        s.register("wide", lambda: 1, ToolMetadata(
            side_effect=SideEffect.NETWORK, capabilities=["net:connect:10.0.0.0/7:5432"]))
        s.register("narrow", lambda: 1, ToolMetadata(
            side_effect=SideEffect.NETWORK, capabilities=["net:connect:10.1.2.0/24"]))
    code, out, _ = run(capsys, "replay", str(trace), "--policy",
                       str(ROOT / "policies" / "net_safe.toml"))
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert code == 0 and len(warnings) == 1, out
    assert "tool wide: recorded grant net:connect:10.0.0.0/7:5432 contains" in warnings[0]
    assert "10.0.0.0/8 (private)" in warnings[0]
    code, out, _ = run(capsys, "replay", str(trace), "--policy",
                       str(ROOT / "policies" / "net_safe.toml"), "--json")
    assert len(json.loads(out)["warnings"]) == 1
