"""The README's guardrail examples run and print what their comments say."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from failcore._cli import main
from failcore._policy import check_policy_file

README = Path(__file__).resolve().parent.parent / "README.md"


def section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Guardrails")
    return text[start:text.index("\n## ", start + 1)]


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section(), re.DOTALL)


def test_python_examples_print_what_they_say() -> None:
    expected = ["session.sum:usage.tokens 120.0 100", "scan scan: aws_access_key",
                "deployed staging"]
    examples = blocks("python")
    assert len(examples) == len(expected)
    for code, want in zip(examples, expected, strict=True):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102
        assert out.getvalue().strip() == want


def test_toml_example_is_a_valid_policy(tmp_path: Path) -> None:
    [toml] = blocks("toml")
    path = tmp_path / "p.toml"
    path.write_text('[policy]\nname = "readme"\n' + toml)
    assert check_policy_file(path) == []


def test_explain_example(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    [bash] = blocks("bash")
    command = bash.split("\n#", 1)[0].replace("\\\n", " ")
    argv = shlex.split(command)
    assert argv[:3] == ["failcore", "policy", "explain"]
    monkeypatch.chdir(README.parent)
    assert main(argv[1:]) == 1
    out = capsys.readouterr().out
    assert "verdict: BLOCK" in out and "169.254.0.0/16" in out
