"""Optional integrations in the tests: skipped locally without their extra, a failure in CI.

``.ci/run`` installs every extra, so there a missing library means a broken install and
must fail the run, not quietly skip the tests that would have caught it.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def need(module: str, extra: str) -> ModuleType:
    """Import ``module`` for an integration test module, or skip it (outside CI)."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(
        module, reason=f"the {extra} integration needs its extra: pip install -e '.[{extra}]' "
        "(CI installs every extra and fails instead of skipping)")
