"""OpenAI Agents SDK FunctionTools over a session, run by the SDK's own Runner against its
scripted test model (no model service, no network; the SDK's tracing export is off)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration_support import need, records

need("agents", "openai-agents")
import agent_tools  # noqa: E402
from agents import Agent, FunctionTool, Runner, UserError, set_tracing_disabled  # noqa: E402
from agents.strict_schema import ensure_strict_json_schema  # noqa: E402
from agents.testing import ModelStep, ScriptedModel, assistant_message, function_call  # noqa: E402

from failcore import RegistrationError, SecurityError, Session  # noqa: E402
from failcore.integrations import openai_agents  # noqa: E402

pytestmark = pytest.mark.integration
set_tracing_disabled(True)  # the SDK would otherwise export traces to its service


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    return tmp_path / "trace.jsonl"


@pytest.fixture
def session(trace: Path) -> Iterator[Session]:
    with agent_tools.make_session(str(trace)) as s:
        yield s


def run_calls(session: Session, *calls: tuple[str, dict[str, Any] | str],
              sync: bool = True, **options: Any) -> list[str]:
    """One scripted model turn calling ``calls``, then a final answer; the tool outputs."""
    model = ScriptedModel([
        ModelStep(output=[function_call(name, args, call_id=f"call_{i}")
                          for i, (name, args) in enumerate(calls)]),
        ModelStep(output=[assistant_message("done")]),
    ])
    agent = Agent(name="tester", tools=openai_agents.tools(session, **options), model=model)
    result = (Runner.run_sync(agent, "go") if sync
              else asyncio.run(Runner.run(agent, "go")))
    assert result.final_output == "done"
    outputs = [item.output for item in result.new_items if type(item).__name__ == "ToolCallOutputItem"]
    # What the model was sent back is exactly those outputs, by call id.
    sent = {i["call_id"]: i["output"] for i in model.calls[-1].input
            if isinstance(i, dict) and i.get("type") == "function_call_output"}
    assert [sent[f"call_{i}"] for i in range(len(calls))] == [str(o) for o in outputs]
    return [str(o) for o in outputs]


def test_tools_carry_the_sessions_schema_in_strict_form(session: Session) -> None:
    tools = openai_agents.tools(session)
    assert [t.name for t in tools] == list(session.tools)
    expected = {s["name"]: s["input_schema"] for s in session.schemas(format="json")}
    for tool in tools:
        assert isinstance(tool, FunctionTool) and tool.strict_json_schema
        assert tool.params_json_schema == ensure_strict_json_schema(
            json.loads(json.dumps(expected[tool.name])))
    point = next(t for t in tools if t.name == "point")
    assert point.params_json_schema["required"] == ["x", "y"]  # strict: every property


def test_open_dict_arguments_fall_back_or_refuse(trace: Path) -> None:
    def tag(labels: dict[str, str]) -> int:
        return len(labels)

    with Session() as session:
        session.register("tag", tag)
        [auto] = openai_agents.tools(session)
        assert auto.strict_json_schema is False
        with pytest.raises(RegistrationError, match="tag: its argument schema has no strict form"):
            openai_agents.tools(session, strict=True)
        [plain] = openai_agents.tools(session, strict=False)
        assert plain.strict_json_schema is False


@pytest.mark.parametrize("sync", [True, False], ids=["run_sync", "run"])
def test_calls_and_errors_through_the_runner(session: Session, trace: Path, sync: bool) -> None:
    outputs = run_calls(session, ("add", {"a": 2, "b": 3}), ("point", {"x": 4, "y": 1}),
                        ("add", {"a": "2", "b": 3}), ("fetch", {"url": "http://127.0.0.1:9/"}),
                        ("slow", {"seconds": 5}),
                        ("login", {"user": "bob", "password": "hunter2-pass"}),
                        ("add", "not json"), sync=sync)
    assert outputs[:2] == ["5", '{"x": 4, "y": 1}']
    assert outputs[2] == ("InputValidationError: add: argument 'a': Input should be a valid "
                          "integer (got str '2')")
    assert outputs[3].startswith("SecurityError: fetch: argument 'url' refused before dispatch")
    assert "[rule: net_safe: 127.0.0.0/8 (loopback)]" in outputs[3]
    assert outputs[4].startswith("ToolTimeout: slow: no answer within timeout_s=1")
    assert outputs[5].startswith("ToolFailed: login") and outputs[5].count("<secret>") == 2
    assert agent_tools.SECRET_VALUE not in outputs[5] and "hunter2-pass" not in outputs[5]
    assert outputs[6].startswith("InputValidationError: add: the arguments are not JSON")
    # The SDK runs a turn's tool calls concurrently: match trace calls by tool call id.
    labels = {r["call_id"]: r["body"]["context"]["tool_call_id"]
              for r in records(trace) if r["kind"] == "call.start"}
    status = {labels[r["call_id"]]: r["body"]["status"]
              for r in records(trace) if r["kind"] == "call.end"}
    assert status == {"call_0": "ok", "call_1": "ok", "call_2": "invalid_input",
                      "call_3": "blocked", "call_4": "timeout", "call_5": "failed"}


def test_failure_error_function_words_or_raises(session: Session) -> None:
    seen: list[Exception] = []

    def mine(ctx: Any, error: Exception) -> str:
        seen.append(error)
        return "tool unavailable"

    assert run_calls(session, ("fetch", {"url": "http://127.0.0.1:9/"}),
                     failure_error_function=mine) == ["tool unavailable"]
    assert isinstance(seen[0], SecurityError) and seen[0].layer == "precheck"
    with pytest.raises(UserError, match="Error running tool fetch") as raised:
        run_calls(session, ("fetch", {"url": "http://127.0.0.1:9/"}), failure_error_function=None)
    assert isinstance(raised.value.__cause__, SecurityError)  # the run ends on the refusal
