"""The public surface is exactly what __all__ says, sorted, and every error a public
function raises is exported (httpx's test_exported_members)."""

from __future__ import annotations

import inspect

import failcore
from failcore import _errors


def test_all_is_sorted_and_complete() -> None:
    assert failcore.__all__ == sorted(failcore.__all__)
    for name in failcore.__all__:
        assert hasattr(failcore, name), name
    # Every public class or function reachable from the package is in __all__ (submodules,
    # imported as a side effect of using them, are not names of the API).
    public = {n for n, obj in vars(failcore).items()
              if not n.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))}
    assert public <= set(failcore.__all__)


def test_every_error_is_exported_and_drawn_in_the_tree() -> None:
    errors = {n for n, obj in inspect.getmembers(_errors, inspect.isclass)
              if issubclass(obj, Exception) and obj.__module__ == _errors.__name__}
    assert errors <= set(failcore.__all__)
    doc = _errors.__doc__ or ""
    for name in errors:
        assert name in doc, f"{name} missing from the error tree in _errors' docstring"


def test_exported_members_say_where_they_live() -> None:
    for name in failcore.__all__:
        obj = getattr(failcore, name)
        module = getattr(obj, "__module__", "") or ""
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert module.startswith("failcore"), (name, module)
