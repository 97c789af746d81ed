"""The confinement report (issue 16 item 6): detected, proven by the self-test, visible in
``session.confinement`` and the trace, and fail-closed under ``confinement="require"``.

``judge`` is tested on synthetic self-test reports (a probe that got through, a connect
the parent's listener saw although the child claimed a refusal, old ABIs); the sessions
run the real self-test on this kernel.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

import failcore
from failcore import ConfinementUnavailable, Session, ToolMetadata
from failcore import _confinement as confinement
from failcore._trace import read_trace
from failcore._trace_schema import validate_record
from failcore_worker import _landlock

ABI = _landlock.abi_version()
needs_kernel = pytest.mark.skipif(ABI < 6, reason=f"needs Landlock ABI 6 or later (this "
                                                  f"kernel has {ABI})")
LAYERS = ("landlock", "landlock_net", "landlock_scopes", "netns", "capabilities",
          "no_new_privs", "userns", "uid_drop", "seccomp")


def good_report(**selftest: Any) -> dict[str, Any]:
    """What a zygote on a kernel with every layer reports."""
    test: dict[str, Any] = {
        "connect_before": errno.ENETUNREACH,
        "capabilities": {"in_force": True, "reason": "no capabilities"},
        "no_new_privs": {"in_force": True, "reason": "set"},
        "landlock": {"in_force": True, "reason": "Landlock ABI 7",
                     "plan": {"fs": ["execute", "read_file"]}},
        "open": errno.EACCES, "connect": errno.EACCES, "signal": errno.EPERM,
        "abstract": errno.EPERM, "exec": errno.EACCES, "done": True,
        "seccomp": {"in_force": True, "reason": "seccomp filter"},
        "listen": errno.EPERM, "udp": errno.EPERM,
    }
    test.update(selftest)
    return {"netns": {"in_force": True, "reason": "empty network namespace"},
            "userns": {"in_force": False, "reason": "not needed"},
            "bounding": {"in_force": True, "reason": "bounding set empty"},
            "seccomp": {"in_force": True, "reason": "seccomp filter"},
            "landlock_abi": 7, "selftest": test}


def judged(report: dict[str, Any], arrived: tuple[int, int] = (0, 0)) -> confinement.Confinement:
    return confinement.judge("auto", report, arrived, None)


# --- judging the self-test ----------------------------------------------------------------------


def test_every_probe_refused_means_every_layer_in_force() -> None:
    report = judged(good_report())
    assert report.complete, str(report)
    assert report.landlock_rights == ("execute", "read_file")


@pytest.mark.parametrize(("probe", "layer"), [
    ("open", "landlock"), ("exec", "landlock"), ("connect", "landlock_net"),
    ("signal", "landlock_scopes"), ("abstract", "landlock_scopes"), ("connect_before", "netns"),
    ("listen", "seccomp"), ("udp", "seccomp"),
])
def test_a_probe_that_got_through_takes_its_layer_out(probe: str, layer: str) -> None:
    report = judged(good_report(**{probe: 0}))
    assert report.missing == (report.layer(layer),)
    assert "succeeded" in report.layer(layer).reason


def test_a_failure_that_is_not_the_kernels_refusal_proves_nothing() -> None:
    report = judged(good_report(exec=errno.ENOENT))  # /bin/true missing: exec proves nothing
    assert not report.layer("landlock").in_force
    assert "ENOENT" in report.layer("landlock").reason


def test_the_parents_listener_outranks_the_childs_word() -> None:
    report = judged(good_report(), arrived=(1, 0))
    assert not report.layer("netns").in_force
    assert "reached the parent's loopback listener" in report.layer("netns").reason
    report = judged(good_report(), arrived=(0, 1))
    assert not report.layer("landlock_net").in_force and "ARRIVED" in report.layer("landlock_net").reason


def test_a_child_that_stopped_early_proves_nothing() -> None:
    test = good_report()["selftest"]
    for key in ("open", "connect", "signal", "abstract", "exec", "done"):
        del test[key]
    report = judged({**good_report(), "selftest": test})
    assert not report.layer("landlock").in_force
    assert "not tried" in report.layer("landlock").reason


@pytest.mark.parametrize(("abi", "missing"), [
    (3, {"landlock_net", "landlock_scopes"}), (5, {"landlock_scopes"}), (7, set()),
])
def test_older_abis_say_what_they_lack(abi: int, missing: set[str]) -> None:
    report = judged({**good_report(), "landlock_abi": abi})
    assert {x.name for x in report.missing} == missing
    for name in missing:
        assert f"ABI {abi} <" in report.layer(name).reason


def test_no_landlock_and_no_namespaces() -> None:
    report = judged({"netns": {"in_force": False, "reason": "unshare failed: EPERM"},
                     "landlock_abi": 0, "selftest": {"landlock": {
                         "in_force": False, "reason": "the kernel has no Landlock"}}})
    assert {x.name for x in report.missing} == set(confinement.REQUIRED)
    assert "unshare failed" in report.layer("netns").reason
    assert "no Landlock" in report.layer("landlock_net").reason


def test_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="confinement must be one of 'auto', 'require', 'off'"):
        Session(confinement="strict")


# --- real sessions ---------------------------------------------------------------------------------


@needs_kernel
def test_session_reports_and_traces_what_is_in_force(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    with Session(trace=trace) as s:
        report = s.confinement
        s.register("t", os.getpid, ToolMetadata())
        assert s.confinement.tools[0].name == "t"
    assert report.complete, str(report)
    assert tuple(x.name for x in report.layers) == LAYERS
    text = str(report)
    assert text.startswith("confinement='auto': every kernel layer in force")
    for name in LAYERS:
        assert f"  {name} " in text
    assert report.layer("seccomp").in_force and "listen(2) failed with EPERM" in report.layer("seccomp").reason
    start = read_trace(trace)[0]
    assert start["kind"] == "session.start"
    assert start["body"]["confinement"] == report.to_wire()
    for record in read_trace(trace):
        validate_record(record)


@needs_kernel
def test_require_starts_where_every_layer_is_in_force() -> None:
    with Session(confinement="require") as s:
        assert s.confinement.complete
        s.register("t", lambda: "ok", ToolMetadata())
        assert s.call("t") == "ok"


def test_require_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = confinement.judge

    def without_netns(mode: str, report: dict[str, Any], arrived: tuple[int, int],
                      privilege: Any) -> confinement.Confinement:
        return real(mode, {**report, "netns": {"in_force": False, "reason": "test: no netns"}},
                    arrived, privilege)

    monkeypatch.setattr(confinement, "judge", without_netns)
    trace = tmp_path / "trace.jsonl"
    with pytest.raises(ConfinementUnavailable) as info:
        Session(trace=trace, confinement="require")
    assert "netns: test: no netns" in str(info.value)
    assert "confinement='auto'" in str(info.value), "the message says what to change"
    kinds = [r["kind"] for r in read_trace(trace)]
    assert kinds == ["session.start", "session.end"]
    assert isinstance(info.value, failcore.FailCoreError)


def test_off_skips_the_kernel_layers() -> None:
    def status() -> str:
        from failcore_worker import guards

        guards.runtime_begin()
        with open("/proc/self/status") as f:
            return next(line for line in f if line.startswith("NoNewPrivs"))

    with Session(confinement="off") as s:
        assert not any(x.in_force for x in s.confinement.layers if x.name in confinement.REQUIRED)
        s.register("status", status, ToolMetadata())
        assert s.call("status").split() == ["NoNewPrivs:", "0"]
    with Session() as s:
        s.register("status", status, ToolMetadata())
        assert s.call("status").split() == ["NoNewPrivs:", "1"]


def test_public_names() -> None:
    assert "ConfinementUnavailable" in failcore.__all__ and "Confinement" in failcore.__all__
