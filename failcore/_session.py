"""The Session: registry, dispatch to locked-down workers, trace, replay.

Layers, top to bottom: ``Session`` (API, registration invariants, validation, policy
pre-check, token, trace) -> ``_dispatch.exchange`` (one request/response within a
deadline) -> ``_workers.Pool`` (prespawned workers forked by a clean zygote).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextvars
import functools
import itertools
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

from failcore import _dispatch
from failcore._capabilities import parse_capabilities
from failcore._dispatch import Outcome
from failcore._errors import (
    CallCancelled,
    FailCoreError,
    InputValidationError,
    OutputValidationError,
    RegistrationError,
    SecurityError,
    ToolFailed,
)
from failcore._metadata import DefaultPolicy, ToolMetadata
from failcore._policy import Policy
from failcore._privilege import plan as privilege_plan
from failcore._recording import NoTrace, ObservedTrace, Observer, ScrubbingTrace, current_context
from failcore._replay import Replayer
from failcore._token import TokenMinter, ToolGrants
from failcore._tool import (
    TOOL_NAME,
    Tool,
    check_invariants,
    restore_source,
    secret_values,
    ship,
)
from failcore._validation import build_models
from failcore._watchdog import Watchdog
from failcore._workers import Pool, Worker, descendants
from failcore._zygote import MINIMAL_ENV, Zygote
from failcore_worker import protocol
from failcore_worker.rules import GuardEvent, under

_SYSTEM_READ = (
    "/etc/ssl", "/usr/lib/ssl", "/usr/share/ca-certificates", "/etc/ca-certificates",
    "/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/gai.conf", "/etc/host.conf",
    "/etc/services", "/etc/protocols", "/etc/localtime", "/usr/share/zoneinfo",
    "/dev/null", "/dev/urandom", "/dev/random", "/dev/zero",
)


# Detail kept in call.end so replay can re-raise the same error: (record key, attribute).
_ERROR_DETAIL = (("rule", "rule"), ("target", "target"), ("layer", "layer"),
                 ("remote_type", "remote_type"), ("traceback", "remote_traceback"))


class _CallHandle:
    """Links an ``acall`` to the worker serving it, so cancelling can kill that worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._worker: Worker | None = None
        self._cancelled = False

    def attach(self, worker: Worker) -> bool:
        with self._lock:
            self._worker = worker
            return not self._cancelled

    def detach(self) -> None:
        with self._lock:
            self._worker = None

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            worker = self._worker
        if worker is not None:
            worker.kill("cancelled")


class Session:
    """Runs registered tools in locked-down workers. Thread-safe; use as a context manager.

    ``validator``: the session policy (a preset, ``load_policy(...)`` or a composition);
    ``None`` means no session-wide restriction beyond each tool's own capabilities.
    ``trace``: a JSONL path or ``None``. ``replay``: answer calls from a recorded trace
    instead of running anything. ``prespawn``: idle workers kept ready for fresh calls.
    ``max_workers_per_tool``: warm workers a tool may have at once. ``worker_user``:
    ``"auto"`` (drop to ``nobody`` when the parent is root and the interpreter is readable
    by it), a user name/uid to force, or ``None`` to never drop. ``trace_result_bytes``:
    results whose reply is larger are recorded by size only (replay cannot answer them).
    ``async_threads``: threads that run ``acall``s, so at most this many run at once (more
    only adds GIL contention on a small machine: 64 ran ~20% slower than 16 here).
    """

    def __init__(self, validator: Policy | None = None, trace: str | os.PathLike[str] | None = None,
                 *, replay: str | os.PathLike[str] | None = None, prespawn: int = 2,
                 max_workers_per_tool: int = 2, worker_user: str | int | None = "auto",
                 watchdog_interval_s: float = 0.05,
                 trace_result_bytes: int = 1024 * 1024, async_threads: int = 16) -> None:
        from failcore import presets
        from failcore._trace import TraceWriter

        if prespawn < 0 or max_workers_per_tool < 1 or async_threads < 1:
            raise ValueError("prespawn must be >= 0, max_workers_per_tool and async_threads >= 1")
        self._async_threads = async_threads
        self.policy: Policy = validator if validator is not None else presets.allow_all()
        self._tools: dict[str, Tool] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._calls = 0
        self._workers_named = 0
        self._closed = False
        self._local = threading.local()
        self._max_workers = max_workers_per_tool
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._replay = Replayer(os.fspath(replay)) if replay is not None else None
        self._trace: Any = TraceWriter(os.fspath(trace)) if trace is not None else NoTrace()
        self._observers: list[Observer] = []
        self._tracing = trace is not None
        self._trace_result_bytes = trace_result_bytes
        from failcore import __version__

        self._trace.record("session.start", None, {
            "failcore_version": __version__, "policy": getattr(self.policy, "name", None), "format": 1})
        self._pool: Pool | None = None
        self._watchdog: Watchdog | None = None
        self._root: str | None = None
        if self._replay is not None:
            return
        self.privilege = privilege_plan(worker_user)
        # tmpfs when there is one: a per-call directory costs ~10 us there, ~160 us on disk.
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else None
        self._root = tempfile.mkdtemp(prefix="failcore-", dir=shm)
        os.chmod(self._root, 0o711)
        self._minter = TokenMinter()
        self._implicit_read = self._implicit_reads()
        # Only entries the worker may read: an import that misses would otherwise list a
        # directory the guards refuse (and fail the call) even when the tool expects it.
        self._worker_sys_path = [
            p for p in sys.path
            if p and any(under(os.path.realpath(p), r) for r in self._implicit_read)]
        try:
            self._pool = Pool(self._root, prespawn, self.privilege.uid,
                              tuple(self._implicit_read))
            self._watchdog = Watchdog(self._pool, watchdog_interval_s)
        except BaseException:
            self.close()
            raise
        self._finalizer = weakref.finalize(self, Session._finalize, self._pool,
                                           self._watchdog, self._root)
        atexit.register(self._finalizer)

    @property
    def _zygote(self) -> Zygote | None:
        return self._pool.zygote if self._pool is not None else None

    # ----------------------------------------------------------------- lifecycle
    @staticmethod
    def _finalize(pool: Pool | None, watchdog: Watchdog | None, root: str | None) -> None:
        if watchdog is not None:
            watchdog.stop()
        if pool is not None:
            pool.close()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def close(self) -> None:
        """Stop every worker (killing their trees), remove scratch space, close the trace."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
        else:
            Session._finalize(self._pool, self._watchdog, self._root)
        self._trace.record("session.end", None, {"calls": self._calls})
        self._trace.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- registration
    def register(self, name: str, fn: Callable[..., Any],
                 metadata: ToolMetadata | None = None) -> Callable[..., Any]:
        """Register ``fn`` as tool ``name``; refuses metadata that breaks SPEC section 3."""
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise RegistrationError(
                f"tool name {name!r} is invalid: use letters, digits, '_', '.', '-' (max 64), "
                "starting with a letter or '_'")
        if not callable(fn):
            raise RegistrationError(f"{name}: {fn!r} is not callable")
        metadata = metadata if metadata is not None else ToolMetadata()
        if not isinstance(metadata, ToolMetadata):
            raise RegistrationError(f"{name}: metadata must be a ToolMetadata, got {type(metadata).__name__}")
        caps = parse_capabilities(metadata.capabilities)
        check_invariants(name, metadata, caps)
        models = build_models(name, fn, input_model=metadata.input_model,
                              output_model=metadata.output_model, secret=metadata.secret,
                              description=metadata.description)
        grants = self.policy.grants(caps, metadata.default_policy)
        granted, refused = self.policy.intersect(caps)
        parts = ToolGrants.build(grants, metadata.limits.to_wire())
        try:
            blob = ship(fn)
        except Exception as exc:
            raise RegistrationError(f"{name}: the tool cannot be serialised for a worker: {exc}") from exc
        env_names = tuple(str(c).split(":", 1)[1] for c in granted if str(c).startswith("env:"))
        with self._lock:
            if self._closed:
                raise RegistrationError(f"{name}: the session is closed")
            if name in self._tools:
                raise RegistrationError(f"tool {name!r} is already registered")
            self._tools[name] = Tool(name, fn, metadata, caps, models, parts, blob, env_names)
        self._trace.record("tool.register", None, {
            "tool": name, "risk_level": metadata.risk_level.value,
            "side_effects": sorted(e.value for e in metadata.side_effects),
            "default_policy": DefaultPolicy(metadata.default_policy).value,
            "capabilities": [str(c) for c in caps], "limits": metadata.limits.to_wire(),
            "isolation": metadata.effective_isolation,
        })
        self._trace.record("policy.grants", None, {
            "tool": name, "granted": [str(c) for c in granted],
            "grants": parts.grants_wire, "grants_sha256": parts.grants_sha256,
            "refused": [{"capability": getattr(v, "capability", ""), "rule": v.rule,
                         "reason": v.reason, "action": v.action} for v in refused],
        })
        return fn

    def tool(self, name: str | None = None, *, metadata: ToolMetadata | None = None,
             **fields: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of ``register``: ``@session.tool(metadata=...)`` or with fields."""
        if metadata is not None and fields:
            raise RegistrationError("pass either metadata=ToolMetadata(...) or its fields, not both")

        def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
            self.register(name or fn.__name__, fn, metadata or ToolMetadata(**fields))
            return fn

        return decorate

    @property
    def tools(self) -> tuple[str, ...]:
        return tuple(self._tools)

    def schemas(self, format: str = "json") -> Any:
        """The tools' schemas in ``json``, ``openai``, ``anthropic`` or ``mcp`` form."""
        from failcore._validation import tool_schemas

        return tool_schemas([t.models for t in self._tools.values()], format)

    def add_observer(self, observer: Observer) -> None:
        """Call ``observer(kind, call_id, body)`` with every trace record from now on.

        Works with or without a trace file; bodies are what the trace gets (secrets
        already scrubbed). Observers run on the calling thread, so keep them quick.
        """
        with self._lock:
            if not self._observers:
                self._trace = ObservedTrace(self._trace, self._observers)
            self._observers.append(observer)

    # --------------------------------------------------------------------- calls
    def call(self, name: str, /, **kwargs: Any) -> Any:
        """Run tool ``name`` with keyword arguments; raises a FailCoreError subclass on failure."""
        if self._closed:
            raise FailCoreError("the session is closed")
        tool = self._tools.get(name)
        call_id = f"c{next(self._ids):06d}"
        with self._lock:
            self._calls += 1
        if tool is None and self._replay is None:
            known = ", ".join(sorted(self._tools)) or "none"
            self._trace.record("call.start", call_id, {"tool": str(name)[:200], "args": {}})
            err = InputValidationError(f"unknown tool {str(name)[:200]!r}; registered tools: {known}")
            self._end(call_id, str(name)[:200], "invalid_input", None, err, time.monotonic())
            raise err
        if self._replay is not None:
            return self._replay.answer(self._trace, call_id, name, tool, kwargs)
        assert tool is not None
        return self._run(tool, call_id, kwargs)

    async def acall(self, name: str, /, **kwargs: Any) -> Any:
        """Async twin of ``call``: runs it on the session's thread pool.

        Cancelling the awaiting task (``asyncio.wait_for`` timing out, a task group
        failing) kills the worker's process tree at once: the tool does not run on
        unobserved. The trace records the call as ``cancelled``.
        """
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        max_workers=self._async_threads, thread_name_prefix="failcore-acall")
        loop = asyncio.get_running_loop()
        handle = _CallHandle()
        # The caller's context (call_context labels) travels into the worker thread.
        ctx = contextvars.copy_context()
        try:
            return await loop.run_in_executor(
                self._executor, ctx.run, self._call_with, handle, name, kwargs)
        except asyncio.CancelledError:
            handle.cancel()
            raise

    def _call_with(self, handle: _CallHandle, name: str, kwargs: dict[str, Any]) -> Any:
        self._local.handle = handle
        try:
            return self.call(name, **kwargs)
        finally:
            self._local.handle = None

    def _end(self, call_id: str, tool: str, status: str, result: Any, err: BaseException | None,
             started: float, trace: Any = None) -> None:
        error: dict[str, Any] | None = None
        if err is not None:
            error = {"type": type(err).__name__, "message": str(err)}
            for key, attr in _ERROR_DETAIL:
                value = getattr(err, attr, None)
                if value:
                    error[key] = value
        (trace or self._trace).record("call.end", call_id, {
            "tool": tool, "status": status, "result": result, "error": error,
            "duration_ms": round((time.monotonic() - started) * 1000, 3)}, plain=True)

    def _run(self, tool: Tool, call_id: str, kwargs: dict[str, Any]) -> Any:
        started = time.monotonic()
        hidden = secret_values(tool, kwargs)
        if not hidden:
            return self._run_traced(tool, call_id, kwargs, self._trace, started)
        trace = ScrubbingTrace(self._trace, hidden)
        try:
            return self._run_traced(tool, call_id, kwargs, trace, started)
        except FailCoreError as err:  # what the caller sees is scrubbed like the trace
            trace.scrubber.error(err)
            raise

    def _run_traced(self, tool: Tool, call_id: str, kwargs: dict[str, Any], trace: Any,
                    started: float) -> Any:
        models = tool.models
        start: dict[str, Any] = {"tool": tool.name, "args": models.redact(kwargs)}
        context = current_context()
        if context:
            start["context"] = context
        trace.record("call.start", call_id, start, plain=True)
        try:
            args = models.validate_input(kwargs)
        except InputValidationError as err:
            trace.record("validate.input", call_id, {"ok": False, "errors": err.errors})
            self._end(call_id, tool.name, "invalid_input", None, err, started, trace)
            raise
        findings = self.policy.precheck(tool.parts.grants, args)
        if findings:
            trace.record("policy.precheck", call_id, {"findings": [
                {"arg": arg, "action": v.action, "rule": v.rule, "reason": v.reason}
                for arg, v in findings]})
            blocked = [(arg, v) for arg, v in findings if v.action == "block"]
            if blocked:
                arg, verdict = blocked[0]
                denied = SecurityError(
                    f"{tool.name}: argument {arg!r} refused before dispatch: {verdict.reason} "
                    f"[rule: {verdict.rule}]", rule=verdict.rule, target=arg, layer="precheck")
                self._end(call_id, tool.name, "blocked", None, denied, started, trace)
                raise denied
        limits = tool.limits
        token, mac = self._minter.mint(call_id, tool.name, tool.parts, limits.timeout_s)
        trace.record("token.mint", call_id, {"grants_sha256": tool.parts.grants_sha256,
                                             "limits": tool.parts.limits, "ttl_s": limits.timeout_s},
                     plain=True)
        # Encode before taking a worker: arguments that cannot cross the boundary are the
        # caller's error, and no worker slot may be held while finding that out.
        try:
            call_frame = protocol.encode("call", {"token": token, "mac": mac, "args": args})
        except (pickle.PicklingError, TypeError, AttributeError, RecursionError, ValueError) as exc:
            unsendable = InputValidationError(
                f"{tool.name}: the arguments cannot be sent to a worker: "
                f"{type(exc).__name__}: {exc}; pass plain data (str, numbers, lists, dicts, models)")
            self._end(call_id, tool.name, "invalid_input", None, unsendable, started, trace)
            raise unsendable from None
        try:
            outcome = self._dispatch(tool, call_id, call_frame)
        except FailCoreError as exc:  # no worker could be had (e.g. the zygote is restarting)
            self._end(call_id, tool.name, "crashed", None, exc, started, trace)
            raise
        for event in outcome.events:
            if self.policy.warn_only and event.get("action") == "allow":
                # Audit mode: the worker enforced only the tool's own grants; say what the
                # policy would have refused.
                verdict = self.policy.rejudge(cast(GuardEvent, event), tool.parts.grants)
                if verdict.action != "allow":
                    event = {**event, "action": "warn", "rule": verdict.rule, "reason": verdict.reason}
            trace.record("guard", call_id, dict(event))
        if outcome.error is not None:
            if isinstance(outcome.error, ToolFailed):
                restore_source(outcome.error, tool.fn)
            self._end(call_id, tool.name, outcome.status, None, outcome.error, started, trace)
            raise outcome.error
        try:
            value = models.validate_output(outcome.value)
        except OutputValidationError as err:
            trace.record("validate.output", call_id, {"ok": False, "errors": err.errors})
            self._end(call_id, tool.name, "invalid_output", None, err, started, trace)
            raise
        result: Any = None
        if self._tracing:
            if outcome.recv_bytes > self._trace_result_bytes:
                # The trace is not a blob store: a huge result would cost the parent
                # several times its size to encode and bloat every copy of the trace.
                result = {"$omitted": "result larger than trace_result_bytes",
                          "reply_bytes": outcome.recv_bytes}
            else:
                result = models.output_to_json(value)
        self._end(call_id, tool.name, "ok", result, None, started, trace)
        return value

    def _dispatch(self, tool: Tool, call_id: str, call_frame: bytes) -> Outcome:
        outcome = self._dispatch_once(tool, call_id, call_frame)
        for _ in range(3):
            if outcome.status != "undelivered":
                return outcome
            # Nothing ran, so another worker may take the request. A dead worker usually
            # means a dead zygote: its other prespawned workers are dead too.
            assert self._pool is not None
            self._pool.replace_dead_zygote()
            outcome = self._dispatch_once(tool, call_id, call_frame)
        if outcome.status == "undelivered":
            outcome.status = "crashed"
        return outcome

    def _dispatch_once(self, tool: Tool, call_id: str, call_frame: bytes) -> Outcome:
        assert self._pool is not None
        worker, needs_init = self._acquire(tool)
        reuse = False
        handle: _CallHandle | None = getattr(self._local, "handle", None)
        try:
            if handle is not None and not handle.attach(worker):
                reuse = True  # cancelled before the request was sent: the worker is untouched
                return Outcome(status="cancelled", error=CallCancelled(
                    f"{tool.name}: the call was cancelled by its caller before it started"))
            frames = [call_frame]
            if needs_init or tool.isolation == "call":
                with self._lock:  # named in call order, so equal runs give equal traces
                    self._workers_named += 1
                    worker.name = f"w{self._workers_named}"
                if needs_init:
                    frames.insert(0, self._init_frame(tool, worker))
                self._trace.record("worker.spawn", call_id, {
                    "worker": worker.name, "isolation": tool.isolation, "pid": worker.pid})
                # The init message (key, grants, environment, the tool) by type and size
                # only. For a worker prepared ahead it was sent then; when is not recorded,
                # so that equal runs give equal traces whatever the pool's timing.
                self._trace.record("ipc.send", call_id, {
                    "type": "init", "worker": worker.name,
                    "bytes": len(frames[0]) if needs_init else worker.extra.get("init_bytes", 0)},
                    plain=True)
            self._trace.record("ipc.send", call_id, {"type": "call", "bytes": len(call_frame),
                                                     "worker": worker.name}, plain=True)
            outcome = _dispatch.exchange(self._pool, worker, tool.name, frames,
                                         tool.limits.timeout_s, tool.limits.output_bytes)
            reuse = outcome.reuse
            if outcome.recv_kind is not None:
                self._trace.record("ipc.recv", call_id, {"type": outcome.recv_kind,
                                                         "bytes": outcome.recv_bytes}, plain=True)
            if worker.kill_reason is not None:
                self._trace.record("worker.kill", call_id, {
                    "worker": worker.name, "reason": worker.kill_reason, "pid": worker.pid})
        finally:
            if handle is not None:
                handle.detach()
            self._release(tool, worker, reuse)
        return outcome

    def _acquire(self, tool: Tool) -> tuple[Worker, bool]:
        assert self._pool is not None
        if tool.isolation == "call":
            ready = self._pool.take_ready(tool.name)
            if ready is not None:
                return ready, False
            # From now on keep workers of this tool initialised ahead of its calls: a
            # fresh call then costs one round trip, not a lock-down and a load.
            self._pool.want_ready(tool.name, functools.partial(self._init_frame, tool))
            return self._pool.take(), True
        with tool.cond:
            while not tool.free:
                if tool.count < self._max_workers:
                    tool.count += 1
                    break
                tool.cond.wait()
            else:
                return tool.free.pop(), False
        try:
            worker = self._pool.take()
        except BaseException:
            with tool.cond:
                tool.count -= 1
                tool.cond.notify()
            raise
        worker.tool = tool.name
        worker.isolation = "tool"
        return worker, True

    def _release(self, tool: Tool, worker: Worker, reuse: bool) -> None:
        assert self._pool is not None
        if tool.isolation == "call":
            self._pool.retire(worker)
            return
        if reuse and tool.may_spawn:
            # A call's processes do not outlive the call, in a warm worker too.
            for pid in descendants(worker.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        with tool.cond:
            if reuse and not worker.dead and not self._closed:
                tool.free.append(worker)
            else:
                tool.count -= 1
                self._pool.retire(worker)
            tool.cond.notify()

    def _init_frame(self, tool: Tool, worker: Worker) -> bytes:
        return protocol.encode("init", self._init_body(tool, worker))

    def _init_body(self, tool: Tool, worker: Worker) -> dict[str, Any]:
        env = dict(MINIMAL_ENV, HOME=worker.base_dir, TMPDIR=worker.base_dir)
        for pattern in tool.env_names:
            if pattern.endswith("*"):
                env.update({k: v for k, v in os.environ.items() if k.startswith(pattern[:-1])})
            elif pattern in os.environ:
                env[pattern] = os.environ[pattern]
        worker.extra["grants"] = tool.parts.grants
        worker.extra["memory_mb"] = tool.limits.memory_mb
        worker.extra["processes"] = tool.limits.processes
        return {
            "key": self._minter.key, "tool": tool.name, "grants_obj": tool.parts.grants,
            "grants_bytes": tool.parts.grants_bytes, "limits": tool.parts.limits, "env": env,
            "base_dir": worker.base_dir, "sys_path": self._worker_sys_path,
            "isolation": tool.isolation, "uid": self.privilege.uid, "gid": self.privilege.gid,
            "implicit_read": self._implicit_read, "tool_blob": tool.blob,
        }

    @staticmethod
    def _implicit_reads() -> list[str]:
        import sysconfig

        # The interpreter's own trees only: other sys.path entries (the script's directory,
        # the cwd under -m, a project checkout) may hold anything, ~/.ssh included.
        trees = {sys.prefix, sys.base_prefix, sys.exec_prefix, *sysconfig.get_paths().values()}
        trees = {os.path.realpath(p) for p in trees if p}
        paths = set(trees)
        paths.update(p for p in map(os.path.realpath, filter(None, sys.path))
                     if any(under(p, t) for t in trees))
        paths.update(_SYSTEM_READ)
        paths.add(os.path.dirname(os.path.abspath(protocol.__file__)))  # the worker package
        return sorted(os.path.realpath(p) for p in paths if os.path.exists(p))


