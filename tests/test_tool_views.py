"""What every integration reads: tool views, error text for a model, missing extras.

These run without any extra installed: they pin the shared layer the MCP server and the
framework adapters stand on.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import agent_tools
import pytest

from failcore import FailCoreError, MissingExtra, SecurityError, Session
from failcore._tool_views import error_text, views


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    with agent_tools.make_session(str(tmp_path / "trace.jsonl")) as s:
        yield s


def test_views_show_the_schemas_the_session_publishes(session: Session) -> None:
    published = session.schemas(format="json")
    shown = views(session)
    assert [v.name for v in shown] == [p["name"] for p in published]
    for v, p in zip(shown, published, strict=True):
        assert (v.description, v.input_schema, v.output_schema) == \
            (p["description"], p["input_schema"], p["output_schema"])
    by_name = {v.name: v for v in shown}
    assert by_name["add"].structured(5) == {"result": 5} and by_name["add"].text(5) == "5"
    point = by_name["point"].models.validate_output({"x": 1, "y": 2})
    assert by_name["point"].structured(point) == {"x": 1, "y": 2}  # explicit model: unwrapped
    assert by_name["point"].text(point) == '{"x": 1, "y": 2}'
    assert by_name["slow"].text("done") == "done"
    assert by_name["sleepy"].isolation == "tool" and by_name["fetch"].isolation == "call"


def test_error_text_names_the_rule_and_hides_secrets(session: Session) -> None:
    with pytest.raises(FailCoreError) as raised:
        session.call("login", user="bob", password="hunter2-pass")
    text = error_text(session, "login", {"user": "bob", "password": "hunter2-pass"}, raised.value)
    # The tool put the secret in its error; the caller's exception is scrubbed like the trace.
    assert agent_tools.SECRET_VALUE not in str(raised.value) and "<secret>" in str(raised.value)
    assert text.startswith("ToolFailed: login: the tool raised PermissionError")
    assert agent_tools.SECRET_VALUE not in text and "hunter2-pass" not in text
    bare = SecurityError("refused", rule="net_safe: 127.0.0.0/8 (loopback)", layer="precheck")
    assert error_text(session, "fetch", {}, bare) == \
        "SecurityError: refused [rule: net_safe: 127.0.0.0/8 (loopback)]"


@pytest.mark.parametrize("module, library, extra", [
    ("failcore.integrations.langchain", "langchain_core", "langchain"),
    ("failcore.integrations.openai_agents", "agents", "openai-agents"),
    ("failcore.integrations.pydantic_ai", "pydantic_ai", "pydantic-ai"),
    ("failcore.mcp", "mcp", "mcp"),
    ("failcore.otel", "opentelemetry.trace", "otel"),
])
def test_a_missing_extra_names_the_install_line(module: str, library: str, extra: str,
                                                session: Session,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    integration = importlib.import_module(module)  # importing needs no extra
    monkeypatch.setitem(sys.modules, library, None)  # as if it were not installed
    entry = {"failcore.mcp": "build_server", "failcore.otel": "instrument"}.get(module, "tools")
    with pytest.raises(MissingExtra, match=rf"pip install 'failcore\[{extra}\]'") as raised:
        getattr(integration, entry)(session)
    assert isinstance(raised.value, ImportError)
