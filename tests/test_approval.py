"""Approval of risky calls: sync and async approvers, who decided, timeouts and errors as
refusals, redacted arguments, policy-marked tools, and HIGH tools without an approver."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import pytest

import failcore
from failcore import (
    ApprovalDecision,
    ApprovalRequest,
    Budget,
    RegistrationError,
    RiskLevel,
    SecurityError,
    Session,
    SideEffect,
    ToolMetadata,
    call_context,
    load_policy,
)
from failcore._trace import read_trace, verify_trace
from failcore._validation import Secret

HIGH = ToolMetadata(risk_level=RiskLevel.HIGH)
AWS = "AKIA" + "IOSFODNN7EXAMPLE"


def deploy(target: str, token: Annotated[str, Secret] = "none") -> str:
    return f"deployed {target}"


def low(x: int) -> int:
    return x + 1


def approvals(trace: Path) -> list[dict[str, Any]]:
    return [r["body"] for r in read_trace(trace) if r["kind"] == "approval"]


def test_approve_and_deny_with_who_decided(tmp_path: Path) -> None:
    seen: list[ApprovalRequest] = []

    def approver(req: ApprovalRequest) -> ApprovalDecision:
        seen.append(req)
        ok = req.args["target"] == "staging"
        return ApprovalDecision(ok, by="alice", reason="staging only")

    trace = tmp_path / "t.jsonl"
    with Session(trace=trace, approve=approver) as s:
        s.register("deploy", deploy, HIGH)
        s.register("low", low)
        assert s.call("deploy", target="staging") == "deployed staging"
        with pytest.raises(SecurityError) as info:
            s.call("deploy", target="prod")
        assert s.call("low", x=1) == 2  # LOW tools are not asked
    err = info.value
    assert err.layer == "approval" and err.rule == "approval: denied"
    assert "by alice" in str(err) and "staging only" in str(err)
    assert [r.tool for r in seen] == ["deploy", "deploy"]
    assert seen[0].risk_level == "HIGH" and seen[0].reasons == ("risk_level HIGH",)
    assert verify_trace(trace).ok
    assert [(a["decision"], a["by"]) for a in approvals(trace)] == [
        ("approved", "alice"), ("denied", "alice")]
    denied = [r for r in read_trace(trace) if r["call_id"] == "c000002"]
    assert [r["kind"] for r in denied][-2:] == ["approval", "call.end"]
    assert "worker.spawn" not in [r["kind"] for r in denied]  # nothing ran


def test_plain_booleans() -> None:
    answers = iter([True, False])
    with Session(approve=lambda req: next(answers)) as s:
        s.register("deploy", deploy, HIGH)
        s.call("deploy", target="a")
        with pytest.raises(SecurityError, match="approval denied"):
            s.call("deploy", target="b")


def test_arguments_are_redacted_and_grants_shown() -> None:
    seen: list[ApprovalRequest] = []

    def approver(req: ApprovalRequest) -> bool:
        seen.append(req)
        return True

    meta = ToolMetadata(risk_level=RiskLevel.CRITICAL, side_effect=SideEffect.NETWORK,
                        capabilities=["net:connect:api.example.com:443"])
    with Session(approve=approver) as s:
        s.register("deploy", deploy, meta)
        with call_context(ticket="OPS-7"):
            s.call("deploy", target=f"key {AWS} mail ann@example.com", token="hunter2-secret")
    [req] = seen
    assert req.args == {"target": "key <redacted:aws_access_key> mail <redacted:email>",
                        "token": "<secret>"}
    assert req.grants == ("net:connect:api.example.com:443",)
    assert req.context == {"ticket": "OPS-7"} and req.risk_level == "CRITICAL"


def test_timeout_is_a_refusal(tmp_path: Path) -> None:
    release = threading.Event()

    def slow(req: ApprovalRequest) -> bool:
        release.wait(10)
        return True

    trace = tmp_path / "t.jsonl"
    try:
        with Session(trace=trace, approve=slow, approval_timeout_s=0.2) as s:
            s.register("deploy", deploy, HIGH)
            started = time.monotonic()
            with pytest.raises(SecurityError, match="approval timeout") as info:
                s.call("deploy", target="x")
            assert time.monotonic() - started < 5
            assert info.value.rule == "approval: timeout"
    finally:
        release.set()
    [a] = approvals(trace)
    assert a["decision"] == "timeout" and a["waited_ms"] >= 150


def test_a_raising_or_odd_approver_refuses() -> None:
    def broken(req: ApprovalRequest) -> bool:
        raise KeyError("no such user")

    with Session(approve=broken) as s:
        s.register("deploy", deploy, HIGH)
        with pytest.raises(SecurityError, match="approval error.*KeyError") as info:
            s.call("deploy", target="x")
        assert info.value.rule == "approval: error"
    with Session(approve=lambda req: "yes") as s:
        s.register("deploy", deploy, HIGH)
        with pytest.raises(SecurityError, match="return True, False or ApprovalDecision"):
            s.call("deploy", target="x")


def test_async_approver_on_a_private_loop_for_call() -> None:
    loops: list[asyncio.AbstractEventLoop] = []

    async def approver(req: ApprovalRequest) -> ApprovalDecision:
        loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0.01)
        return ApprovalDecision(True, by="bot")

    with Session(approve=approver) as s:
        s.register("deploy", deploy, HIGH)
        assert s.call("deploy", target="x") == "deployed x"
        assert s.call("deploy", target="y") == "deployed y"
    assert len(loops) == 2 and loops[0] is loops[1]  # one private loop, reused


def test_async_approver_runs_on_the_callers_loop_for_acall() -> None:
    seen: list[asyncio.AbstractEventLoop] = []

    async def approver(req: ApprovalRequest) -> bool:
        seen.append(asyncio.get_running_loop())
        return req.args["target"] != "prod"

    async def main() -> tuple[asyncio.AbstractEventLoop, list[Any]]:
        with Session(approve=approver) as s:
            s.register("deploy", deploy, HIGH)
            out = await asyncio.gather(s.acall("deploy", target="a"),
                                       s.acall("deploy", target="prod"), return_exceptions=True)
            return asyncio.get_running_loop(), out

    loop, out = asyncio.run(main())
    assert out[0] == "deployed a" and isinstance(out[1], SecurityError)
    assert seen == [loop, loop]


def test_async_approver_timeout_is_cancelled() -> None:
    cancelled = threading.Event()

    async def approver(req: ApprovalRequest) -> bool:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return True

    with Session(approve=approver, approval_timeout_s=0.2) as s:
        s.register("deploy", deploy, HIGH)
        with pytest.raises(SecurityError, match="approval timeout"):
            s.call("deploy", target="x")
    assert cancelled.wait(5)


def test_high_risk_without_an_approver_runs_as_before(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    with Session(trace=trace) as s:
        s.register("deploy", deploy, HIGH)
        assert s.call("deploy", target="x") == "deployed x"
    assert approvals(trace) == []


POLICY = """
[policy]
name = "change-control"

[tools.deploy]
approve = true
"""


def test_policy_marked_tools_need_an_approver(tmp_path: Path) -> None:
    path = tmp_path / "cc.toml"
    path.write_text(POLICY)
    policy = load_policy(path)
    assert policy.approve_tools == ("deploy",)
    with Session(validator=policy) as s:
        with pytest.raises(RegistrationError, match="requires approval.*Session\\(approve"):
            s.register("deploy", deploy)
        s.register("low", low)  # other tools are unaffected
    asked: list[tuple[str, ...]] = []
    with Session(validator=policy, approve=lambda r: asked.append(r.reasons) or True) as s:
        s.register("deploy", deploy)  # LOW risk, but the policy marks it
        s.register("low", low)
        s.call("deploy", target="x")
        s.call("low", x=1)
    assert asked == [("policy 'change-control' marks it approve = true",)]


def test_a_refused_approval_does_not_spend_the_budget() -> None:
    answers = iter([False, True])
    with Session(approve=lambda r: next(answers), budgets=Budget(calls=1)) as s:
        s.register("deploy", deploy, HIGH)
        with pytest.raises(SecurityError):
            s.call("deploy", target="x")
        assert s.call("deploy", target="x") == "deployed x"


def test_bad_approver_arguments() -> None:
    with pytest.raises(TypeError):
        Session(approve="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="approval_timeout_s"):
        Session(approve=lambda r: True, approval_timeout_s=0)


def test_exported() -> None:
    assert failcore.ApprovalRequest is ApprovalRequest
    assert failcore.ApprovalDecision is ApprovalDecision


def test_async_callable_objects_and_returned_coroutines_are_awaited() -> None:
    class Desk:
        async def __call__(self, req: ApprovalRequest) -> ApprovalDecision:
            await asyncio.sleep(0)
            return ApprovalDecision(True, by="desk")

    async def decide(req: ApprovalRequest) -> bool:
        return req.args["target"] == "ok"

    with Session(approve=Desk()) as s:
        s.register("deploy", deploy, HIGH)
        assert s.call("deploy", target="x") == "deployed x"
    with Session(approve=lambda req: decide(req)) as s:  # a plain callable returning a coroutine
        s.register("deploy", deploy, HIGH)
        assert s.call("deploy", target="ok") == "deployed ok"
        with pytest.raises(SecurityError, match="approval denied"):
            s.call("deploy", target="no")
