"""The installed package layout: the child side cannot be shadowed by a user's module."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import failcore_worker

SCRIPT = textwrap.dedent("""
    import failcore_worker, worker
    from failcore import Session

    def add(a: int, b: int) -> int:
        return a + b

    assert worker.MINE == "the user's own worker module"
    with Session() as session:
        session.register("add", add)
        print(session.call("add", a=2, b=3), worker.MINE)
""")


def test_a_users_worker_module_shadows_nothing(tmp_path: Path) -> None:
    # A script next to its own worker.py (and a worker/ package) runs with its directory
    # first on sys.path: FailCore must neither import the user's module as its own nor
    # hand it to the workers.
    (tmp_path / "worker.py").write_text('MINE = "the user\'s own worker module"\n')
    pkg = tmp_path / "sub" / "worker"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('raise ImportError("the user\'s worker package was imported")\n')
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(tmp_path / "sub")  # the package form shadows too, were it used
    out = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["5", "the", "user's", "own", "worker", "module"]


def test_worker_package_is_installed_under_its_own_name() -> None:
    assert failcore_worker.__name__ == "failcore_worker"
    assert Path(failcore_worker.__file__).parent.name in ("worker", "failcore_worker")
