"""Pydantic AI Tools over a session, run by a Pydantic AI Agent whose model is a local
function (pydantic_ai.models.function.FunctionModel: no model service, no network)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration_support import need, records

need("pydantic_ai", "pydantic-ai")
import agent_tools  # noqa: E402
from pydantic_ai import Agent, Tool  # noqa: E402
from pydantic_ai.messages import (  # noqa: E402
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel  # noqa: E402

from failcore import Session  # noqa: E402
from failcore.integrations import pydantic_ai  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    return tmp_path / "trace.jsonl"


@pytest.fixture
def session(trace: Path) -> Iterator[Session]:
    with agent_tools.make_session(str(trace)) as s:
        yield s


def run_calls(session: Session, *calls: tuple[str, dict[str, Any]],
              sync: bool = True) -> tuple[dict[str, ToolReturnPart], list[Any]]:
    """One model turn calling ``calls`` (tool call ids t0, t1, ...), then a final answer.
    Returns what came back per tool call id, and the tool definitions the model saw."""
    returned: dict[str, ToolReturnPart] = {}
    shown: list[Any] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if not shown:
            shown.extend(info.function_tools)
            return ModelResponse(parts=[ToolCallPart(name, args, tool_call_id=f"t{i}")
                                        for i, (name, args) in enumerate(calls)])
        for message in messages:
            for part in getattr(message, "parts", []):
                if isinstance(part, ToolReturnPart):
                    returned[part.tool_call_id] = part
        return ModelResponse(parts=[TextPart("done")])

    agent = Agent(FunctionModel(model), tools=pydantic_ai.tools(session))
    result = agent.run_sync("go") if sync else asyncio.run(agent.run("go"))
    assert result.output == "done"
    return returned, shown


def test_the_model_sees_the_sessions_schema(session: Session) -> None:
    tools = pydantic_ai.tools(session)
    assert all(isinstance(t, Tool) for t in tools)
    _, shown = run_calls(session)
    expected = {s["name"]: s for s in session.schemas(format="json")}
    assert [d.name for d in shown] == list(session.tools)
    for definition in shown:
        assert definition.parameters_json_schema == expected[definition.name]["input_schema"]
        assert definition.description == expected[definition.name]["description"]


@pytest.mark.parametrize("sync", [True, False], ids=["run_sync", "run"])
def test_calls_and_errors_through_the_agent(session: Session, trace: Path, sync: bool) -> None:
    returned, _ = run_calls(session, ("add", {"a": 2, "b": 3}), ("point", {"x": 4}),
                            ("add", {"a": "2", "b": 3}), ("fetch", {"url": "http://127.0.0.1:9/"}),
                            ("slow", {"seconds": 5}),
                            ("login", {"user": "bob", "password": "hunter2-pass"}), sync=sync)
    assert returned["t0"].content == 5 and returned["t0"].outcome == "success"
    assert returned["t1"].content == agent_tools.Point(x=4, y=0)
    # Bad arguments: ModelRetry, the model is asked to correct them.
    assert returned["t2"].outcome == "retried"
    assert returned["t2"].content == ("InputValidationError: add: argument 'a': Input should be "
                                      "a valid integer (got str '2')")
    # Everything else: ToolFailed, a failure the model sees and does not retry.
    assert returned["t3"].outcome == "failed"
    assert "[rule: net_safe: 127.0.0.0/8 (loopback)]" in returned["t3"].content
    assert returned["t4"].outcome == "failed"
    assert returned["t4"].content.startswith("ToolTimeout: slow")
    assert returned["t5"].outcome == "failed" and returned["t5"].content.count("<secret>") == 2
    assert agent_tools.SECRET_VALUE not in returned["t5"].content
    labels = {r["call_id"]: r["body"]["context"]["tool_call_id"]
              for r in records(trace) if r["kind"] == "call.start"}
    status = {labels[r["call_id"]]: r["body"]["status"]
              for r in records(trace) if r["kind"] == "call.end"}
    assert status == {"t0": "ok", "t1": "ok", "t2": "invalid_input", "t3": "blocked",
                      "t4": "timeout", "t5": "failed"}
