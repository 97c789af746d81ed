"""The core runtime: spawned, locked-down workers; isolation modes; failures and recovery."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from failcore import (
    DefaultPolicy,
    InputValidationError,
    Limits,
    OutputValidationError,
    RegistrationError,
    ResourceLimitExceeded,
    RiskLevel,
    Session,
    SideEffect,
    ToolFailed,
    ToolMetadata,
    ToolTimeout,
    WorkerCrashed,
)

WARM = ToolMetadata(isolation="tool")
FRESH = ToolMetadata(isolation="call")


@pytest.fixture
def session() -> Iterator[Session]:
    with Session() as s:
        yield s


def add(a: int, b: int) -> int:
    return a + b


def whoami() -> dict:
    import os
    import sys

    return {"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(),
            "env": dict(os.environ), "pytest_loaded": "pytest" in sys.modules,
            "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")), "uid": os.getuid()}


def _gone(path: str, within_s: float = 5.0) -> bool:
    """Scratch directories are removed right after the reply, off the caller's clock."""
    deadline = time.monotonic() + within_s
    while os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_module_function_closure_and_lambda(session: Session) -> None:
    offset = 10

    def closure(x: int) -> int:
        return x + offset

    session.register("add", add)
    session.register("closure", closure)
    session.register("lam", lambda x: x * 2)
    assert session.call("add", a=2, b=3) == 5
    assert session.call("closure", x=1) == 11
    assert session.call("lam", x=21) == 42


def test_decorator_and_acall(session: Session) -> None:
    @session.tool(metadata=WARM)
    def upper(text: str) -> str:
        return text.upper()

    async def main() -> list[str]:
        return list(await asyncio.gather(*(session.acall("upper", text=f"x{i}") for i in range(20))))

    assert asyncio.run(main()) == [f"X{i}" for i in range(20)]


def test_worker_is_spawned_clean_and_locked_down(session: Session) -> None:
    os.environ["FAILCORE_TEST_PARENT_SECRET"] = "hunter2"
    try:
        session.register("whoami", whoami, ToolMetadata(
            isolation="call", side_effect=SideEffect.FILESYSTEM, capabilities=["fs:read:/proc"]))
        info = session.call("whoami")
    finally:
        del os.environ["FAILCORE_TEST_PARENT_SECRET"]
    assert info["pid"] != os.getpid()
    assert info["ppid"] != os.getpid(), "workers are forked by the zygote, never by the parent"
    assert not info["pytest_loaded"], "the worker must not inherit the parent's memory"
    assert "FAILCORE_TEST_PARENT_SECRET" not in info["env"]
    assert set(info["env"]) <= {"PATH", "LANG", "LC_ALL", "HOME", "TMPDIR"}
    assert info["fds"][:3] == [0, 1, 2] and len(info["fds"]) <= 5, info["fds"]
    assert _gone(info["cwd"]), "the per-call working directory is removed afterwards"


def test_granted_env_passes_and_nothing_else(session: Session) -> None:
    os.environ["FC_TEST_TOKEN"] = "granted-value"
    os.environ["FC_TEST_OTHER"] = "not-granted"
    try:
        session.register("env", lambda: dict(os.environ), ToolMetadata(
            side_effect=SideEffect.ENVIRONMENT, capabilities=["env:FC_TEST_TOKEN"]))
        env = session.call("env")
    finally:
        del os.environ["FC_TEST_TOKEN"], os.environ["FC_TEST_OTHER"]
    assert env["FC_TEST_TOKEN"] == "granted-value"
    assert "FC_TEST_OTHER" not in env


def rlimits() -> dict:
    import resource

    return {name: resource.getrlimit(getattr(resource, name))
            for name in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE")}


def test_rlimits_with_lowered_hard_limits(session: Session) -> None:
    session.register("rl", rlimits, ToolMetadata(limits=Limits(
        timeout_s=5, memory_mb=300, file_size_mb=3, open_files=50)))
    limits = session.call("rl")
    for name, (soft, hard) in limits.items():
        assert hard != resource.RLIM_INFINITY, f"{name} hard limit not lowered"
        assert hard - soft <= 1, name
    assert limits["RLIMIT_FSIZE"][0] == 3 * 1024 * 1024
    assert limits["RLIMIT_NOFILE"][0] == 50
    assert limits["RLIMIT_CORE"][0] == 0


def test_each_call_gets_its_own_directory(session: Session) -> None:
    def scratch(name: str) -> str:
        with open(name, "w") as f:
            f.write("data")
        return os.getcwd()

    session.register("scratch", scratch, WARM)
    first = session.call("scratch", name="a.txt")
    second = session.call("scratch", name="b.txt")
    assert first != second
    assert _gone(first) and _gone(second)


def test_isolation_tool_reuses_and_call_does_not(session: Session) -> None:
    session.register("warm", lambda: os.getpid(), WARM)
    session.register("fresh", lambda: os.getpid(), FRESH)
    assert len({session.call("warm") for _ in range(5)}) == 1
    assert len({session.call("fresh") for _ in range(5)}) == 5


def test_high_risk_defaults_to_fresh_worker(session: Session) -> None:
    session.register("risky", lambda: os.getpid(), ToolMetadata(risk_level=RiskLevel.HIGH))
    assert session.call("risky") != session.call("risky")


def test_timeout_kills_tree_and_session_recovers(session: Session) -> None:
    def hang() -> None:
        time.sleep(60)

    session.register("hang", hang, ToolMetadata(limits=Limits(timeout_s=0.5), isolation="tool"))
    session.register("add", add)
    started = time.monotonic()
    with pytest.raises(ToolTimeout, match="timeout_s=0.5"):
        session.call("hang")
    assert time.monotonic() - started < 10
    assert session.call("add", a=1, b=1) == 2
    with pytest.raises(ToolTimeout):
        session.call("hang")


def test_timeout_from_threads_and_asyncio(session: Session) -> None:
    session.register("hang", lambda: time.sleep(60),
                     ToolMetadata(limits=Limits(timeout_s=0.3), isolation="call"))
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            session.call("hang")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(errors) == 3 and all(isinstance(e, ToolTimeout) for e in errors)

    async def main() -> list[object]:
        return await asyncio.gather(*(session.acall("hang") for _ in range(3)), return_exceptions=True)

    assert all(isinstance(e, ToolTimeout) for e in asyncio.run(main()))


def test_timeout_kills_grandchildren(session: Session) -> None:
    marker = f"failcore-grandchild-{os.getpid()}-{time.monotonic_ns()}"

    def spawn_and_hang(marker: str) -> None:
        import subprocess
        import time

        subprocess.Popen(["/bin/sleep", "300"], start_new_session=True,
                         env={"FAILCORE_MARKER": marker})
        subprocess.Popen(["/bin/sleep", "301"], env={"FAILCORE_MARKER": marker})
        time.sleep(60)

    session.register("spawner", spawn_and_hang, ToolMetadata(
        side_effect=SideEffect.PROCESS, capabilities=["proc:exec:/bin/sleep"],
        limits=Limits(timeout_s=1.5)))
    with pytest.raises(ToolTimeout):
        session.call("spawner", marker=marker)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        alive = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "sleep"
                 and _env_marker(p) == marker]
        if not alive:
            break
        time.sleep(0.05)
    assert not alive, f"grandchildren survived: {alive}"


def _env_marker(p: psutil.Process) -> str | None:
    try:
        return p.environ().get("FAILCORE_MARKER")
    except psutil.Error:
        return None


def test_crash_is_worker_crashed_and_next_call_works(session: Session) -> None:
    session.register("exit", lambda: os._exit(3), WARM)
    session.register("segv", lambda: os.kill(os.getpid(), signal.SIGSEGV), WARM)
    session.register("add", add, WARM)
    with pytest.raises(WorkerCrashed, match="code 3"):
        session.call("exit")
    with pytest.raises(WorkerCrashed, match="SIGSEGV"):
        session.call("segv")
    assert session.call("add", a=2, b=2) == 4


def test_memory_bomb_is_resource_limit(session: Session) -> None:
    def bomb() -> int:
        blocks = []
        for _ in range(100):
            blocks.append(bytearray(50 * 1024 * 1024))
        return len(blocks)

    session.register("bomb", bomb, ToolMetadata(limits=Limits(memory_mb=200, timeout_s=20)))
    with pytest.raises(ResourceLimitExceeded):
        session.call("bomb")
    session.register("add", add)
    assert session.call("add", a=1, b=2) == 3


def test_tool_exception_is_tool_failed_with_remote_details(session: Session) -> None:
    def boom(x: int) -> int:
        raise KeyError(f"missing {x}")

    session.register("boom", boom, WARM)
    with pytest.raises(ToolFailed) as info:
        session.call("boom", x=7)
    assert info.value.remote_type == "KeyError"
    assert "missing 7" in info.value.remote_message
    assert "raise KeyError" in info.value.remote_traceback
    session.register("add", add, WARM)
    assert session.call("add", a=3, b=4) == 7


def test_output_limit_is_checked_before_reading(session: Session) -> None:
    session.register("big", lambda: b"x" * (4 * 1024 * 1024),
                     ToolMetadata(limits=Limits(output_bytes=1024 * 1024)))
    rss_before = psutil.Process().memory_info().rss
    with pytest.raises(ResourceLimitExceeded, match="output_bytes"):
        session.call("big")
    assert psutil.Process().memory_info().rss - rss_before < 3 * 1024 * 1024


class Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, ("touch /tmp/failcore-pwned-by-reply",))


def test_reply_cannot_run_code_in_the_parent(session: Session) -> None:
    if os.path.exists("/tmp/failcore-pwned-by-reply"):
        os.unlink("/tmp/failcore-pwned-by-reply")
    session.register("evil", lambda: Evil())
    with pytest.raises(OutputValidationError, match="type .*Evil that cannot cross"):
        session.call("evil")
    assert not os.path.exists("/tmp/failcore-pwned-by-reply")


def test_unpicklable_result_is_a_clear_error(session: Session) -> None:
    session.register("gen", lambda: (i for i in range(3)))
    with pytest.raises(OutputValidationError, match="type generator that cannot cross the process "
                                                    "boundary; return plain data or one of"):
        session.call("gen")


def test_unknown_tool_and_bad_args_refused(session: Session) -> None:
    session.register("add", add)
    with pytest.raises(InputValidationError, match="unknown tool"):
        session.call("nope")
    with pytest.raises(InputValidationError):
        session.call("add", a=1)
    assert session.call("add", a=1, b=1) == 2


def test_registration_invariants(session: Session) -> None:
    with pytest.raises(RegistrationError, match="ALLOW"):
        session.register("x", add, ToolMetadata(risk_level=RiskLevel.HIGH,
                                                default_policy=DefaultPolicy.ALLOW))
    with pytest.raises(RegistrationError, match=r"PROCESS.*capabilities=\['proc:exec:/usr/bin/git'\]"):
        session.register("x", add, ToolMetadata(side_effect=SideEffect.PROCESS))
    with pytest.raises(RegistrationError, match=r"ENVIRONMENT.*capabilities=\['env:API_TOKEN'\]"):
        session.register("x", add, ToolMetadata(side_effect=SideEffect.ENVIRONMENT))
    with pytest.raises(RegistrationError, match="outside the declared side effects"):
        session.register("x", add, ToolMetadata(capabilities=["fs:read:/tmp"]))
    with pytest.raises(RegistrationError, match="already registered"):
        session.register("x", add)
        session.register("x", add)
    with pytest.raises(RegistrationError, match="invalid"):
        session.register("bad name!", add)


def test_workers_exit_when_the_parent_dies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import os, sys, time
        from failcore import Session, ToolMetadata
        s = Session()
        s.register("pid", lambda: os.getpid(), ToolMetadata(isolation="tool"))
        s.register("hang", lambda: time.sleep(60), ToolMetadata(isolation="call"))
        print(s.call("pid"), s._backend._root, flush=True)
        import threading
        threading.Thread(target=lambda: s.call("hang"), daemon=True).start()
        time.sleep(60)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pid_text, root = proc.stdout.readline().split()  # type: ignore[union-attr]
        worker_pid = int(pid_text)
        time.sleep(0.5)
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert psutil.pid_exists(worker_pid)
        proc.kill()
        proc.wait(10)
        gone, alive = psutil.wait_procs(tree, timeout=5)
        assert not alive, f"workers outlived their parent: {alive}"
        assert not os.path.exists(root), "the zygote removes a dead parent's scratch space"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]


def test_cancelling_an_acall_kills_the_worker_tree(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from failcore import CallCancelled
    from failcore._trace import read_trace

    marker = tmp_path / "still-running"

    def slow(path: str) -> str:
        import time

        time.sleep(1.5)
        open(path, "w").close()  # must never happen: the call was cancelled
        return "done"

    trace = tmp_path / "t.jsonl"
    with Session(trace=str(trace)) as session:
        session.register("slow", slow, ToolMetadata(
            isolation="call", side_effect=SideEffect.FILESYSTEM,
            capabilities=[f"fs:write:{tmp_path}"], limits=Limits(timeout_s=30)))

        async def main() -> None:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(session.acall("slow", path=str(marker)), 0.3)

        started = time.monotonic()
        asyncio.run(main())
        time.sleep(2.0)
        assert not marker.exists(), "the cancelled tool kept running"
        assert time.monotonic() - started < 10
        session.register("add", add)
        assert session.call("add", a=1, b=1) == 2
    ends = [r["body"] for r in read_trace(str(trace)) if r["kind"] == "call.end"]
    assert ends[0]["status"] == "cancelled" and ends[0]["error"]["type"] == CallCancelled.__name__


def test_timeout_cannot_be_set_from_tool_arguments(session: Session) -> None:
    def sleepy(timeout_s: float, limits: dict) -> None:  # names an agent might try
        time.sleep(30)

    session.register("sleepy", sleepy, ToolMetadata(limits=Limits(timeout_s=0.5)))
    started = time.monotonic()
    with pytest.raises(ToolTimeout, match="timeout_s=0.5"):
        session.call("sleepy", timeout_s=999.0, limits={"timeout_s": 999})
    assert time.monotonic() - started < 10


def test_remote_traceback_cannot_copy_files_and_reads_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from failcore._trace import read_trace

    def forged() -> None:
        # A code object may name any file: formatting its traceback with source lines
        # would copy that file's first lines into the error and the trace.
        code = compile("\n\nraise ValueError('boom')", "/etc/passwd", "exec")
        exec(code)

    trace = tmp_path / "t.jsonl"
    with Session(trace=str(trace)) as session:
        session.register("forged", forged)
        with pytest.raises(ToolFailed) as info:
            session.call("forged")
    text = info.value.remote_traceback
    assert 'File "/etc/passwd", line 3' in text and "ValueError: boom" in text
    assert "root:" not in text and "root:" not in trace.read_text()
    guards = [r for r in read_trace(str(trace)) if r["kind"] == "guard"]
    assert guards == [], f"formatting the traceback touched files: {guards}"
