"""Shared fixtures: no process outlives a test; non-loopback tests only inside a netns."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import psutil
import pytest
from hypothesis import settings

# No per-example deadline: the machines are shared and noisy, and a slow example is not a
# wrong one (pytest-timeout still bounds every test). In CI, derandomised: a run that
# fails fails again on a rerun.
settings.register_profile("failcore", deadline=None, print_blob=True)
settings.register_profile("ci", parent=settings.get_profile("failcore"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "failcore")


def in_private_netns() -> bool:
    """True when the only network interface is loopback (a fresh ``unshare -n``)."""
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return False
    return names <= {"lo"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if in_private_netns():
        return
    skip = pytest.mark.skip(
        reason="attempts non-loopback connections: runs only inside a fresh network "
        "namespace (unshare -n), never in the open; .ci/run runs it that way"
    )
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


def _descendants() -> set[int]:
    try:
        return {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
    except psutil.Error:
        return set()


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every process a test starts is gone when the test ends (sessions closed, trees killed)."""
    before = _descendants()
    yield
    deadline = time.monotonic() + 5.0
    left = _descendants() - before
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = _descendants() - before
    if left:
        details = []
        for pid in left:
            try:
                p = psutil.Process(pid)
                details.append(f"{pid} {p.name()} {p.cmdline()[:4]}")
                p.kill()
            except psutil.Error:
                pass
        pytest.fail(f"processes outlived the test: {details}")
