"""Tool schemas: golden files for every format, secrets, determinism, agreement with validation.

Regenerate the golden files after an intended change (and review the diff) with:
    FAILCORE_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_schema.py
"""

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field

from failcore._schema import SECRET_NOTE
from failcore._validation import FORMATS, Secret, ToolModels, build_models, tool_schemas

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("FAILCORE_REGEN_GOLDEN") == "1"


# -- the example tools the golden files describe ------------------------------------------------


def fetch_url(url: str, timeout: float = 10.0) -> str:
    """Fetch a URL and return the response body as text.

    Redirects are followed; the body is truncated at 1 MiB.
    """
    raise NotImplementedError


def read_file(path: str, mode: Literal["text", "base64"] = "text", max_bytes: int | None = None) -> str:
    """Read a file below the session root."""
    raise NotImplementedError


class Resources(BaseModel):
    """CPU and memory for each replica."""

    cpu: float = Field(default=0.5, gt=0, description="CPU cores")
    memory_mb: int = Field(default=256, ge=64)


class DeploymentSpec(BaseModel):
    """What to deploy and where."""

    image: str = Field(description="Container image reference")
    replicas: int = Field(default=1, ge=1, le=10)
    env: dict[str, str] = {}
    resources: Resources = Resources()


class DeploymentStatus(BaseModel):
    id: str
    state: Literal["pending", "running", "failed"]
    urls: list[str] = []


def create_deployment(spec: DeploymentSpec, token: Annotated[str, Secret],
                      dry_run: bool = False) -> DeploymentStatus:
    """Create a deployment from a spec."""
    raise NotImplementedError


def notify(  # type: ignore[no-untyped-def]  # no return annotation: no output schema
    channel: str, message: str, api_key: Annotated[str, Field(description="Chat service key")]
):
    raise NotImplementedError


def example_tools() -> list[ToolModels]:
    return [
        build_models("fetch_url", fetch_url),
        build_models("read_file", read_file),
        build_models("create_deployment", create_deployment),
        build_models("notify", notify, secret=["api_key"], description="Post a message to a chat channel."),
    ]


def render(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


@pytest.mark.parametrize("fmt", FORMATS)
def test_golden(fmt: str) -> None:
    path = GOLDEN / f"schemas_{fmt}.json"
    text = render(tool_schemas(example_tools(), fmt))
    if REGEN:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} is missing; create it with FAILCORE_REGEN_GOLDEN=1"
    expected = path.read_text(encoding="utf-8")
    assert text == expected, (
        f"{fmt} schemas differ from {path}. If the change is intended, regenerate with\n"
        f"  FAILCORE_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/test_schema.py\n"
        f"and review the diff of tests/golden/."
    )


# -- format shapes --------------------------------------------------------------------------------


def test_format_shapes() -> None:
    tools = example_tools()
    plain, openai, anthropic, mcp = (tool_schemas(tools, f) for f in FORMATS)
    assert [t["name"] for t in plain] == ["fetch_url", "read_file", "create_deployment", "notify"]
    assert list(plain[0]) == ["name", "description", "input_schema", "output_schema"]
    assert plain[3]["output_schema"] is None
    assert plain[0]["description"] == "Fetch a URL and return the response body as text."

    for entry in openai:
        assert list(entry) == ["type", "function"] and entry["type"] == "function"
        assert list(entry["function"]) == ["name", "description", "parameters"]
        assert entry["function"]["parameters"]["additionalProperties"] is False
        assert entry["function"]["parameters"]["type"] == "object"

    assert all(list(e) == ["name", "description", "input_schema"] for e in anthropic)
    assert list(mcp[0]) == ["name", "description", "inputSchema", "outputSchema"]
    assert "outputSchema" not in mcp[3]
    assert mcp[0]["outputSchema"] == {"properties": {"result": {"type": "string"}},
                                      "required": ["result"], "type": "object",
                                      "additionalProperties": False}
    assert plain[0]["input_schema"] == anthropic[0]["input_schema"] == mcp[0]["inputSchema"]


def test_secret_fields_are_write_only_with_a_note() -> None:
    for fmt in FORMATS:
        for entry in tool_schemas(example_tools(), fmt):
            schema = entry.get("input_schema") or entry.get("inputSchema") or entry["function"]["parameters"]
            for name, prop in schema["properties"].items():
                is_secret = name in ("token", "api_key")
                assert prop.get("writeOnly", False) is is_secret, (fmt, name)
                if is_secret:
                    assert SECRET_NOTE in prop["description"]
    notify_schema = tool_schemas(example_tools(), "anthropic")[3]["input_schema"]
    assert notify_schema["properties"]["api_key"]["description"] == f"Chat service key ({SECRET_NOTE})"


def test_bad_format_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown schema format 'gemini'; valid formats: json, openai, anthropic, mcp"):
        tool_schemas(example_tools(), "gemini")


def test_duplicate_names_are_refused() -> None:
    tool = build_models("fetch_url", fetch_url)
    with pytest.raises(ValueError, match="duplicate tool name 'fetch_url'"):
        tool_schemas([tool, tool], "json")
    assert tool_schemas([], "openai") == []


def test_output_is_deterministic_and_does_not_mutate() -> None:
    tools = example_tools()
    first = {fmt: render(tool_schemas(tools, fmt)) for fmt in FORMATS}
    for fmt in FORMATS:  # mutating a result must not leak into the next one
        for entry in tool_schemas(tools, fmt):
            entry.clear()
    assert {fmt: render(tool_schemas(example_tools(), fmt)) for fmt in FORMATS} == first
    assert {fmt: render(tool_schemas(tools, fmt)) for fmt in FORMATS} == first


def test_titles_are_stripped_but_data_named_title_is_kept() -> None:
    class Doc(BaseModel):
        title: str
        meta: dict[str, str] = {"title": "kept"}

    def publish(doc: Doc, title: str = "t") -> None:
        return None

    schema = tool_schemas([build_models("publish", publish)], "json")[0]["input_schema"]
    text = json.dumps(schema)
    assert '"title": "' not in text.replace('"title": "kept"', "")
    assert set(schema["properties"]) == {"doc", "title"}
    assert set(schema["$defs"]["Doc"]["properties"]) == {"title", "meta"}
    assert schema["$defs"]["Doc"]["properties"]["meta"]["default"] == {"title": "kept"}


def test_schema_agrees_with_validation() -> None:
    for tool in example_tools():
        schema = tool_schemas([tool], "json")[0]["input_schema"]
        required = set(schema.get("required", []))
        for name in schema["properties"]:
            kwargs = {"unused": 1}
            errors = {e["loc"] for e in _errors(tool, kwargs)}
            assert "unused" in errors
            assert (name in errors) is (name in required), (tool.name, name)


def _errors(tool: ToolModels, kwargs: dict[str, Any]) -> list[dict[str, object]]:
    try:
        tool.validate_input(kwargs)
    except Exception as exc:
        return list(getattr(exc, "errors", []))
    return []
