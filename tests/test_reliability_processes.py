"""Reliability: the processes a tool starts. Fork and subprocess bombs (granted and
denied), grandchildren that outlive a return or a crash, and the zygote itself dying.

Every test checks the process table, not only the error: a call is over only when every
process it started is gone (zombies count as gone).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_reliability_support import (
    TracedSession,
    call_within,
    kill_marked_sleeps,
    marked_sleeps,
    sleep_marker,
    wait_gone,
    wait_group_empty,
    wait_no_marked_sleeps,
    worker_pids,
)

from failcore import (
    FailCoreError,
    Limits,
    ResourceLimitExceeded,
    SecurityError,
    SideEffect,
    ToolMetadata,
    ToolTimeout,
    WorkerCrashed,
)

SLEEP = ["proc:exec:/bin/sleep"]


@pytest.fixture
def run(tmp_path: Path) -> Iterator[TracedSession]:
    traced = TracedSession(tmp_path / "trace.jsonl")
    yield traced
    traced.session.close()


@pytest.fixture
def marker() -> Iterator[str]:
    mark = sleep_marker()
    yield mark
    kill_marked_sleeps(mark)  # only when a test failed and left some behind


def proc_tool(isolation: str = "tool", timeout_s: float = 30.0, caps: list[str] | None = None,
              processes: int = 32) -> ToolMetadata:
    return ToolMetadata(side_effect=SideEffect.PROCESS, capabilities=caps or SLEEP,
                        isolation=isolation,  # type: ignore[arg-type]
                        limits=Limits(timeout_s=timeout_s, processes=processes))


def fork_bomb(levels: int) -> int:
    """2**levels processes, each a copy of the worker, all sleeping."""
    import os
    import time

    for _ in range(levels):
        os.fork()
    time.sleep(60)
    return os.getpid()


def subprocess_bomb(marker: str, count: int) -> int:
    import subprocess
    import time

    for _ in range(count):
        subprocess.Popen(["/bin/sleep", marker])
    time.sleep(60)
    return count


def spawn(marker: str, then: str, new_session: bool) -> int:
    """Start one sleeping grandchild, then return, crash or hang."""
    import os
    import subprocess
    import time

    child = subprocess.Popen(["/bin/sleep", marker], start_new_session=new_session)
    if then == "crash":
        os._exit(5)
    if then == "hang":
        time.sleep(60)
    return child.pid


def own_pid() -> int:
    import os

    return os.getpid()


# A bomb ends one of two ways: the watchdog sees more than Limits.processes descendants
# (ResourceLimitExceeded), or, with a high limit, the deadline passes (ToolTimeout). Either
# way the whole tree must be gone.
BOMB_ENDS = [
    pytest.param(32, ResourceLimitExceeded, id="over-processes-limit"),
    pytest.param(100_000, ToolTimeout, id="at-the-deadline"),
]


@pytest.mark.parametrize(("processes", "error"), BOMB_ENDS)
def test_fork_bomb_with_exec_granted_is_killed_whole(
    run: TracedSession, processes: int, error: type[FailCoreError]
) -> None:
    s = run.session
    s.register("bomb", fork_bomb, proc_tool(timeout_s=1.5, processes=processes))
    s.register("pid", own_pid)
    with pytest.raises(error):
        s.call("bomb", levels=8)
    worker = worker_pids(run.path)[-1]
    assert not wait_group_empty(worker), "copies of the forked worker survived the kill"
    assert s.call("pid") > 0
    run.finish()


@pytest.mark.parametrize(("processes", "error"), BOMB_ENDS)
def test_subprocess_bomb_with_exec_granted_is_killed_whole(
    run: TracedSession, marker: str, processes: int, error: type[FailCoreError]
) -> None:
    s = run.session
    s.register("bomb", subprocess_bomb, proc_tool(timeout_s=2, processes=processes))
    with pytest.raises(error):
        s.call("bomb", marker=marker, count=200)
    assert not wait_no_marked_sleeps(marker)
    run.finish()


def py_bomb(count: int) -> int:
    import subprocess
    import sys
    import time

    for _ in range(count):
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(60)
    return count


def test_python_subprocess_bomb_with_sys_executable_granted(run: TracedSession) -> None:
    """The granted program is the interpreter itself: its children die with the tree too."""
    s = run.session
    s.register("bomb", py_bomb, proc_tool(timeout_s=3, caps=[f"proc:exec:{sys.executable}"],
                                          processes=8))
    with pytest.raises((ResourceLimitExceeded, ToolTimeout)):
        s.call("bomb", count=20)
    assert not wait_group_empty(worker_pids(run.path)[-1])
    run.finish()


@pytest.mark.parametrize("how", ["fork", "popen", "posix_spawn", "system"])
def test_process_creation_without_exec_grant_is_security_error(run: TracedSession,
                                                               marker: str, how: str) -> None:
    def make_child(how: str, marker: str) -> int:
        import os
        import subprocess

        if how == "fork":
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            return pid
        if how == "popen":
            return subprocess.Popen(["/bin/sleep", marker]).pid
        if how == "posix_spawn":
            return os.posix_spawn("/bin/sleep", ["/bin/sleep", marker], {})
        return os.system(f"/bin/sleep {marker}")

    s = run.session
    s.register("child", make_child)
    s.register("pid", own_pid)
    before = len(worker_pids(run.path))
    with pytest.raises(SecurityError):
        s.call("child", how=how, marker=marker)
    assert not marked_sleeps(marker)
    assert not wait_gone(worker_pids(run.path)[before:])  # a refused worker is not reused
    assert s.call("pid") > 0
    run.finish()


# --- grandchildren ------------------------------------------------------------------------


@pytest.mark.parametrize("new_session", [False, True], ids=["same-group", "setsid"])
def test_fresh_worker_grandchild_does_not_outlive_the_call(run: TracedSession, marker: str,
                                                            new_session: bool) -> None:
    s = run.session
    s.register("spawn", spawn, proc_tool(isolation="call"))
    child = s.call("spawn", marker=marker, then="return", new_session=new_session)
    assert not wait_gone([child]), "isolation='call': nothing may carry over, processes included"
    run.finish()


@pytest.mark.parametrize("new_session", [False, True], ids=["same-group", "setsid"])
def test_hanging_tool_grandchild_dies_with_the_tree(run: TracedSession, marker: str,
                                                    new_session: bool) -> None:
    s = run.session
    s.register("spawn", spawn, proc_tool(timeout_s=1))
    with pytest.raises(ToolTimeout):
        s.call("spawn", marker=marker, then="hang", new_session=new_session)
    assert not wait_no_marked_sleeps(marker)
    run.finish()


@pytest.mark.parametrize("new_session", [False, True], ids=["same-group", "setsid"])
def test_warm_worker_background_child_does_not_outlive_call(run: TracedSession, marker: str,
                                                            new_session: bool) -> None:
    """Decided in RELIABILITY.md (F6, fixed in 9149c0b): a warm worker keeps its Python
    state between calls, never its processes."""
    s = run.session
    s.register("spawn", spawn, proc_tool(isolation="tool"))
    child = s.call("spawn", marker=marker, then="return", new_session=new_session)
    assert not wait_gone([child])
    assert s.call("spawn", marker=marker, then="return", new_session=new_session) != child
    run.finish()


@pytest.mark.parametrize("new_session", [False, True], ids=["same-group", "setsid"])
def test_grandchild_of_crashed_worker_is_killed(run: TracedSession, marker: str,
                                                new_session: bool) -> None:
    """F5 (fixed in 9149c0b): a setsid orphan of a dead worker used to go to pid 1, out of
    reach; the zygote is now a child subreaper and kills what it adopts."""
    s = run.session
    s.register("spawn", spawn, proc_tool())
    with pytest.raises(WorkerCrashed, match="code 5"):
        s.call("spawn", marker=marker, then="crash", new_session=new_session)
    left = wait_no_marked_sleeps(marker)
    run.finish()
    assert not left, f"grandchildren of the crashed worker survived: {left}"


# --- the zygote -----------------------------------------------------------------------------


@pytest.mark.parametrize("isolation", ["tool", "call"])
def test_session_recovers_after_the_zygote_is_killed(run: TracedSession, isolation: str) -> None:
    """F7 (fixed in 9149c0b): the zygote SIGKILLed from outside takes its workers with it
    (PDEATHSIG); a new zygote is started, requests that found a dead worker are re-sent
    to a live one, and the session goes on. Every call still ends in the trace."""
    s = run.session
    s.register("pid", own_pid, ToolMetadata(isolation=isolation))  # type: ignore[arg-type]
    first = s.call("pid")
    zygote = s._backend._pool.zygote.proc.pid  # type: ignore[union-attr]
    os.kill(zygote, signal.SIGKILL)
    assert not wait_gone([zygote, first]), "workers die with their zygote (PDEATHSIG)"
    failed: list[WorkerCrashed] = []
    for _ in range(10):  # workers prespawned by the dead zygote fail once each
        try:
            call_within(s, "pid", 30)
            break
        except WorkerCrashed as exc:
            failed.append(exc)
    print(f"\ncalls failed after the zygote died ({isolation}): {len(failed)}", [str(e) for e in failed])
    # A request that never reached a worker is retried on another one (nothing ran), and
    # the dead zygote's prespawned workers are dropped: at most one call can still land
    # on a worker that is dying at that very moment.
    assert len(failed) <= 1, failed
    assert all(call_within(s, "pid", 30) > 0 for _ in range(3))
    assert s._backend._pool.zygote.proc.pid != zygote  # type: ignore[union-attr]
    run.finish()
