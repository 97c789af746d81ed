"""LangChain StructuredTools over a session, invoked through LangChain's own tool API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration_support import bodies, ended, in_flight, need

need("langchain_core", "langchain")
import agent_tools  # noqa: E402
from langchain_core.messages import ToolMessage  # noqa: E402
from langchain_core.tools import StructuredTool, ToolException  # noqa: E402

from failcore import Session, ToolTimeout  # noqa: E402
from failcore.integrations import langchain  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    with agent_tools.make_session(str(tmp_path / "trace.jsonl")) as s:
        yield s


@pytest.fixture
def trace(tmp_path: Path) -> Path:
    return tmp_path / "trace.jsonl"


def by_name(session: Session, **options: Any) -> dict[str, StructuredTool]:
    return {t.name: t for t in langchain.tools(session, **options)}


def call(tool_name: str, args: dict[str, Any], call_id: str = "call_1") -> dict[str, Any]:
    return {"name": tool_name, "args": args, "id": call_id, "type": "tool_call"}


def test_the_args_schema_is_the_model_the_session_validates_with(session: Session) -> None:
    tools = by_name(session)
    assert list(tools) == list(session.tools)
    for name, tool in tools.items():
        assert tool.args_schema is session._tools[name].models.input_model
        assert tool.description == session._tools[name].models.description


def test_sync_and_async_calls_run_in_the_session(session: Session, trace: Path) -> None:
    tools = by_name(session)
    assert tools["add"].invoke({"a": 2, "b": 3}) == "5"
    message = tools["point"].invoke(call("point", {"x": 4}))
    assert isinstance(message, ToolMessage) and message.status == "success"
    assert message.content == '{"x": 4, "y": 0}' and message.artifact == agent_tools.Point(x=4, y=0)
    assert asyncio.run(tools["add"].ainvoke({"a": 1, "b": 1})) == "2"
    assert [b["status"] for b in bodies(trace, "call.end")] == ["ok", "ok", "ok"]


def test_a_refusal_is_a_tool_error_naming_the_rule(session: Session, trace: Path) -> None:
    # Loopback: net_safe refuses it before dispatch; were that broken, nothing leaves the host.
    message = by_name(session)["fetch"].invoke(call("fetch", {"url": "http://127.0.0.1:9/x"}))
    assert message.status == "error"
    assert message.content.startswith("SecurityError: fetch: argument 'url' refused before dispatch")
    assert "[rule: net_safe: 127.0.0.0/8 (loopback)]" in message.content
    assert bodies(trace, "call.end")[-1]["status"] == "blocked"
    with pytest.raises(ToolException, match=r"rule: net_safe: 127\.0\.0\.0/8") as raised:
        by_name(session, handle_tool_error=False)["fetch"].invoke({"url": "http://127.0.0.1:9/x"})
    assert raised.value.__cause__ is not None and raised.value.__cause__.rule.startswith("net_safe")


def test_bad_arguments_use_langchains_validation_path_with_failcore_wording(
        session: Session, trace: Path) -> None:
    message = by_name(session)["add"].invoke(call("add", {"a": "2", "b": 3}))
    assert message.status == "error"
    assert message.content == ("InputValidationError: add: argument 'a': Input should be a valid "
                               "integer (got str '2')")
    bad_secret = by_name(session)["login"].invoke(
        call("login", {"user": "bob", "password": 12345678}))
    assert bad_secret.status == "error" and "12345678" not in bad_secret.content
    assert bodies(trace, "call.start") == []  # refused by LangChain, with the session's model


def test_timeout_and_the_tools_own_error_hide_secrets(session: Session) -> None:
    tools = by_name(session)
    late = asyncio.run(tools["slow"].ainvoke(call("slow", {"seconds": 5})))
    assert late.status == "error" and late.content.startswith("ToolTimeout: slow")
    leaked = tools["login"].invoke(call("login", {"user": "bob", "password": "hunter2-pass"}))
    assert leaked.status == "error" and leaked.content.count("<secret>") == 2
    assert agent_tools.SECRET_VALUE not in leaked.content and "hunter2-pass" not in leaked.content
    with pytest.raises(ToolException) as raised:
        by_name(session, handle_tool_error=False)["slow"].invoke({"seconds": 5})
    assert isinstance(raised.value.__cause__, ToolTimeout)


def test_cancelling_ainvoke_kills_the_worker(session: Session, trace: Path) -> None:
    async def run() -> str:
        task = asyncio.create_task(by_name(session)["sleepy"].ainvoke({"seconds": 30}))
        cid, _ = await in_flight(trace, "sleepy")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return cid

    mine = ended(trace, asyncio.run(run()))
    assert [r["body"]["reason"] for r in mine if r["kind"] == "worker.kill"] == ["cancelled"]
    assert [r["body"]["status"] for r in mine if r["kind"] == "call.end"] == ["cancelled"]
