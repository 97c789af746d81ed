"""One home per decision: the worker's guards and ``failcore replay --policy`` judge the same
guard event the same way, for every op they both know (issue 11: a property test feeds the
same events to both)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from failcore import Policy
from failcore_worker import _guard_judge, guards
from failcore_worker.protocol import GuardEvent
from failcore_worker.rules import FsRule, Grants, NetRule

NAMES = ["api.example.com", "evil.example.net", "x.internal", "localhost", "10.0.0.5",
         "metadata.google.internal", "db.example.com"]
HOSTS = ["api.example.com", "*.example.com", "public", "10.0.0.0/8", "0.0.0.0/0", "127.0.0.1",
         "localhost"]
PROGRAMS = ["/bin/true", "/bin/sh", "true", "/usr/bin/env"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("agree")
    for sub in ("data", "data/inner", "out", "secret"):
        (root / sub).mkdir()
    (root / "data" / "a.txt").write_text("a")
    (root / "secret" / "key").write_text("k")
    os.symlink(root / "secret" / "key", root / "data" / "link")
    yield root


def grants_for(root: Path) -> st.SearchStrategy[Grants]:
    fs_rules = st.sampled_from([FsRule(str(root / "data"), False), FsRule(str(root / "out"), True),
                                FsRule(str(root / "data" / "inner"), True)])
    return st.builds(
        Grants,
        net=st.lists(st.builds(NetRule, st.sampled_from(HOSTS),
                               st.sampled_from([0, 443]), st.just(65535)),
                     max_size=3).map(tuple),
        fs=st.lists(fs_rules, max_size=2).map(tuple),
        exec=st.lists(st.sampled_from(["/bin/true", "true", "/bin/sh"]), max_size=2).map(tuple),
        default=st.sampled_from(["block", "warn", "allow"]),
        block_ranges=st.booleans(),
        fs_root=st.sampled_from([None, str(root), str(root / "data")]),
        deny_exec=st.booleans(),
    )


def _worker(grants: Grants, judge: Any, *args: Any) -> str:
    """What the worker's guard decides, run in this process with ``grants`` in force."""
    saved = _guard_judge.state.grants
    _guard_judge.state.grants = grants
    _guard_judge.state.events.clear()
    try:
        judge(*args)
        events = _guard_judge.state.events
        return events[-1]["action"] if events else "allow"
    except guards.GuardDenied:
        return "block"
    finally:
        _guard_judge.state.grants = saved
        _guard_judge.state.events.clear()


def _replay(grants: Grants, event: dict[str, Any]) -> str:
    return Policy().rejudge(cast(GuardEvent, event), grants).action


@settings(max_examples=300)
@given(data=st.data())
def test_resolve_exec_and_fork_agree(tree: Path, data: st.DataObject) -> None:
    g = data.draw(grants_for(tree))
    name, port = data.draw(st.sampled_from(NAMES)), data.draw(st.sampled_from([0, 80, 443]))
    assert _worker(g, _guard_judge.judge_resolve, name, port) == _replay(
        g, {"op": "net.resolve", "host": name, "port": port})
    program = data.draw(st.sampled_from(PROGRAMS))
    assert _worker(g, _guard_judge.judge_exec, program) == _replay(
        g, {"op": "proc.exec", "program": program})
    assert _worker(g, guards._on_fork, ()) == _replay(g, {"op": "proc.fork", "target": "fork"})


@settings(max_examples=300)
@given(data=st.data())
def test_file_operations_agree(tree: Path, data: st.DataObject) -> None:
    g = data.draw(grants_for(tree))
    rel = data.draw(st.sampled_from(["data/a.txt", "data/link", "data/inner/new", "out/x",
                                     "secret/key", "data/../secret/key", "nowhere/file"]))
    write = data.draw(st.booleans())
    path = str(tree / rel)
    op = "fs.modify" if write else "fs.open"
    worker = _worker(g, _guard_judge.judge_path, op, path, write)
    assert worker == _replay(g, {"op": op, "path": path, "write": write}), (g, rel, write)
