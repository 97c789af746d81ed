"""The Session: registry, validation, policy, tokens, the trace; workers via a backend.

Layers, top to bottom: ``Session`` (API, registration invariants, validation, policy
pre-check, token, trace) -> ``Backend`` (``failcore._backend``: lease a worker, exchange
one call within its deadline, release or retire) -> the worker. The Session is the single
trace writer: backends report, it records.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextvars
import itertools
import os
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from failcore import _confinement
from failcore._approval import ApprovalRequest, caller_loop
from failcore._backend import Backend, Lease, Outcome, ToolSpec
from failcore._budgets import Budget
from failcore._capabilities import parse_capabilities
from failcore._confinement import Confinement, ToolConfinement
from failcore._errors import (
    BudgetExceeded,
    CallCancelled,
    ConfinementUnavailable,
    FailCoreError,
    InputValidationError,
    OutputValidationError,
    RegistrationError,
    SecurityError,
    ToolFailed,
)
from failcore._guardrails import Guardrails, status_of
from failcore._metadata import DefaultPolicy, ToolMetadata
from failcore._policy import Policy
from failcore._privilege import PrivilegePlan
from failcore._recording import NoTrace, ObservedTrace, Observer, ScrubbingTrace, current_context
from failcore._replay import Replayer
from failcore._scan import Scan
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
from failcore_worker import protocol
from failcore_worker.rules import GuardEvent

# Detail kept in call.end so replay can re-raise the same error: (record key, attribute).
_ERROR_DETAIL = (("rule", "rule"), ("target", "target"), ("layer", "layer"),
                 ("remote_type", "remote_type"), ("traceback", "remote_traceback"),
                 ("budget", "budget"))


def _start_body(tool: str, args: dict[str, Any]) -> dict[str, Any]:
    """A ``call.start`` body, with the caller's ``call_context`` labels when there are any."""
    start: dict[str, Any] = {"tool": tool, "args": args}
    context = current_context()
    if context:
        start["context"] = context
    return start


class _CallHandle:
    """Links an ``acall`` to the lease serving it, so cancelling can kill that worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lease: tuple[Backend, Lease] | None = None
        self._cancelled = False

    def attach(self, backend: Backend, lease: Lease) -> bool:
        with self._lock:
            self._lease = (backend, lease)
            return not self._cancelled

    def detach(self) -> None:
        with self._lock:
            self._lease = None

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            held = self._lease
        if held is not None:
            held[0].abort(held[1], "cancelled")


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
    ``confinement``: the kernel layers (Landlock, empty network namespace, no
    capabilities, no_new_privs): ``"auto"`` uses what the kernel has, ``"require"`` raises
    ``ConfinementUnavailable`` unless every one is in force, ``"off"`` skips them (to
    measure their cost; see SECURITY.md). ``session.confinement`` says what is in force.

    Guardrails (see ``failcore._guardrails``): ``budgets``, a ``Budget`` for the whole
    session (with the policy's ``[budget]``, the tighter of both); ``scan``, a ``Scan``
    (composed with the policy's ``[scan]``), ``None`` for the policy's or the default
    (every kind ``warn``), ``False`` for none; ``approve``, a callable (sync or async)
    asked before each call of a HIGH/CRITICAL tool or a tool the policy marks
    ``approve = true``, refused after ``approval_timeout_s``.
    """

    def __init__(self, validator: Policy | None = None, trace: str | os.PathLike[str] | None = None,
                 *, replay: str | os.PathLike[str] | None = None, prespawn: int = 2,
                 max_workers_per_tool: int = 2, worker_user: str | int | None = "auto",
                 watchdog_interval_s: float = 0.05,
                 trace_result_bytes: int = 1024 * 1024, async_threads: int = 16,
                 backend: Backend | None = None, budgets: Budget | None = None,
                 scan: Scan | bool | None = None,
                 approve: Callable[[ApprovalRequest], Any] | None = None,
                 approval_timeout_s: float = 300.0, confinement: str = "auto") -> None:
        from failcore import __version__, presets
        from failcore._local import LocalBackend
        from failcore._trace import TraceWriter

        if prespawn < 0 or max_workers_per_tool < 1 or async_threads < 1:
            raise ValueError("prespawn must be >= 0, max_workers_per_tool and async_threads >= 1")
        self._async_threads = async_threads
        mode = _confinement.check_mode(confinement)
        self.policy: Policy = validator if validator is not None else presets.allow_all()
        self._guardrails = Guardrails(self.policy, budgets, scan, approve, approval_timeout_s)
        self._tools: dict[str, Tool] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._calls = 0
        self._workers_named = 0
        self._closed = False
        self._local = threading.local()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._replay = Replayer(os.fspath(replay)) if replay is not None else None
        self._trace: Any = TraceWriter(os.fspath(trace)) if trace is not None else NoTrace()
        self._observers: list[Observer] = []
        self._tracing = trace is not None
        self._recording = self._tracing  # a trace file or an observer reads record bodies
        self._trace_result_bytes = trace_result_bytes
        self._minter = TokenMinter()
        start = {"failcore_version": __version__, "policy": getattr(self.policy, "name", None),
                 "format": 1}
        self._backend: Backend | None = None
        self._confinement = _confinement.off("replay session: no worker runs", None)
        if self._replay is not None:
            self._trace.record("session.start", None,
                               dict(start, confinement=self._confinement.to_wire()))
            return
        if backend is None:
            backend = LocalBackend(prespawn=prespawn, max_workers_per_tool=max_workers_per_tool,
                                   worker_user=worker_user, watchdog_interval_s=watchdog_interval_s,
                                   confinement=mode)
        try:
            backend.start(self._minter.key)
        except BaseException:
            backend.close()
            self._trace.record("session.start", None, start)
            self._trace.close()
            raise
        self._backend = backend
        atexit.register(backend.close)  # workers never outlive the interpreter
        # Recorded once the backend has started: it carries what confinement is in force.
        self._confinement = backend.confinement
        self._trace.record("session.start", None,
                           dict(start, confinement=self._confinement.to_wire()))
        if mode == "require" and not self._confinement.complete:
            self.close()
            raise ConfinementUnavailable(
                "confinement='require' but these kernel layers are not in force: "
                + "; ".join(f"{x.name}: {x.reason}" for x in self._confinement.missing)
                + ". Use confinement='auto' to run with what this kernel offers.")

    @property
    def confinement(self) -> Confinement:
        """What kernel confinement is in force for this session's workers, and why not."""
        return self._confinement.with_tools(tuple(t.confinement for t in self._tools.values()))

    @property
    def privilege(self) -> PrivilegePlan | None:
        """Whether workers drop to an unprivileged uid, and why (local backend only)."""
        return getattr(self._backend, "privilege", None)

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Stop every worker (killing their trees), remove scratch space, close the trace."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._guardrails.close()
        if self._backend is not None:
            self._backend.close()
            atexit.unregister(self._backend.close)
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
        declared = parse_capabilities(metadata.capabilities)
        added, defaults = check_invariants(name, metadata, declared)
        caps = declared + added
        models = build_models(name, fn, input_model=metadata.input_model,
                              output_model=metadata.output_model, secret=metadata.secret,
                              description=metadata.description)
        grants = self.policy.grants(caps, metadata.default_policy, added)
        granted, refused = self.policy.intersect(caps)
        parts = ToolGrants.build(grants, metadata.limits.to_wire())
        try:
            blob = ship(fn)
        except Exception as exc:
            raise RegistrationError(f"{name}: the tool cannot be serialised for a worker: {exc}") from exc
        env_names = tuple(str(c).split(":", 1)[1] for c in granted if str(c).startswith("env:"))
        network = _confinement.network_mode(metadata)
        spec = ToolSpec(name=name, isolation=metadata.effective_isolation, grants=grants,
                        grants_bytes=parts.grants_bytes, limits=metadata.limits.to_wire(),
                        blob=blob, env_names=env_names, network=network)
        if self._closed:
            raise RegistrationError(f"{name}: the session is closed")
        # The backend plans the tool's kernel confinement (and starts what it needs).
        kernel = (self._backend.prepare(spec) if self._backend is not None
                  else ToolConfinement(name, network))
        with self._lock:
            if self._closed:
                raise RegistrationError(f"{name}: the session is closed")
            if name in self._tools:
                raise RegistrationError(f"tool {name!r} is already registered")
            self._guardrails.register(name, metadata, tuple(str(c) for c in granted),
                                      models.secret_fields)
            self._tools[name] = Tool(name, fn, metadata, caps, models, parts, spec, kernel)
        self._trace.record("tool.register", None, {
            "tool": name, "risk_level": metadata.risk_level.value,
            "side_effects": sorted(e.value for e in metadata.side_effects),
            "default_policy": DefaultPolicy(metadata.default_policy).value,
            "capabilities": [str(c) for c in caps], "limits": metadata.limits.to_wire(),
            "isolation": metadata.effective_isolation, "network": network,
            "kernel_notes": list(kernel.notes),
            **({"defaults": list(defaults)} if defaults else {}),
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
            self._recording = True

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
            self._trace.record("call.start", call_id, _start_body(str(name)[:200], {}))
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
        ctx.run(caller_loop.set, loop)  # an async approver runs on the caller's loop
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
        # Guardrail: scan the outgoing arguments before anything is recorded.
        arg_scan = self._guardrails.scan_arguments(tool.name, kwargs)
        masks = arg_scan.masks if arg_scan is not None else {}
        if not hidden and not masks:
            return self._run_traced(tool, call_id, kwargs, self._trace, started, arg_scan, hidden,
                                    masks)
        trace = ScrubbingTrace(self._trace, hidden, masks)
        try:
            return self._run_traced(tool, call_id, kwargs, trace, started, arg_scan, hidden, masks)
        except FailCoreError as err:  # what the caller sees is scrubbed like the trace
            trace.scrubber.error(err)
            raise

    def _run_traced(self, tool: Tool, call_id: str, kwargs: dict[str, Any], trace: Any,
                    started: float, arg_scan: Any, hidden: list[str],
                    masks: dict[str, str]) -> Any:
        models = tool.models
        guardrails = self._guardrails
        # The arguments as the record shows them; with no trace file and no observer
        # nothing reads the body, so the warm path does not build it.
        shown = models.redact(kwargs) if self._recording else {}
        trace.record("call.start", call_id, _start_body(tool.name, shown), plain=True)
        if arg_scan is not None:
            try:
                kwargs = guardrails.check_scan(trace, call_id, tool.name, "arguments", arg_scan)
            except SecurityError as err:
                self._end(call_id, tool.name, "blocked", None, err, started, trace)
                raise
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
        # Guardrail: budgets are reserved and the approver asked, before a token exists.
        try:
            admission = guardrails.admit(tool.name, call_id, lambda: models.redact(kwargs),
                                         masks, trace)
        except (SecurityError, BudgetExceeded) as err:
            self._end(call_id, tool.name, status_of(err), None, err, started, trace)
            raise
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
            guardrails.release(admission)
            self._end(call_id, tool.name, "invalid_input", None, unsendable, started, trace)
            raise unsendable from None
        dispatched = time.monotonic()
        try:
            outcome = self._dispatch(tool, call_id, call_frame)
        except FailCoreError as exc:  # no worker could be had (e.g. the zygote is restarting)
            guardrails.release(admission)
            self._end(call_id, tool.name, "crashed", None, exc, started, trace)
            raise
        wall_s = time.monotonic() - dispatched
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
            guardrails.settle(admission, call_id, outcome.cpu_s, wall_s, None, trace)
            self._end(call_id, tool.name, outcome.status, None, outcome.error, started, trace)
            raise outcome.error
        try:
            value = models.validate_output(outcome.value)
        except OutputValidationError as err:
            guardrails.settle(admission, call_id, outcome.cpu_s, wall_s, None, trace)
            trace.record("validate.output", call_id, {"ok": False, "errors": err.errors})
            self._end(call_id, tool.name, "invalid_output", None, err, started, trace)
            raise
        guardrails.settle(admission, call_id, outcome.cpu_s, wall_s, value, trace)
        # Guardrail: scan the result; its findings are masked in the call.end record.
        result_scan = guardrails.scan_result(value)
        returned = value
        if result_scan is not None:
            trace = ScrubbingTrace(self._trace, hidden, {**masks, **result_scan.masks})
            try:
                returned = guardrails.check_scan(trace, call_id, tool.name, "result", result_scan)
            except SecurityError as err:
                self._end(call_id, tool.name, "blocked", None, err, started, trace)
                raise
        result: Any = None
        if self._tracing:
            if outcome.recv_bytes > self._trace_result_bytes:
                # The trace is not a blob store: a huge result would cost the parent
                # several times its size to encode and bloat every copy of the trace.
                result = {"$omitted": "result larger than trace_result_bytes",
                          "reply_bytes": outcome.recv_bytes}
            else:
                result = models.output_to_json(value)  # the scrubbing trace masks findings
        self._end(call_id, tool.name, "ok", result, None, started, trace)
        return returned

    def _dispatch(self, tool: Tool, call_id: str, call_frame: bytes) -> Outcome:
        outcome = self._dispatch_once(tool, call_id, call_frame)
        for _ in range(3):
            if outcome.status != "undelivered":
                return outcome
            # Nothing ran, so another worker may take the request.
            outcome = self._dispatch_once(tool, call_id, call_frame)
        if outcome.status == "undelivered":
            outcome.status = "crashed"
        return outcome

    def _dispatch_once(self, tool: Tool, call_id: str, call_frame: bytes) -> Outcome:
        backend = self._backend
        assert backend is not None
        lease = backend.lease(tool.spec)
        worker = lease.worker
        reuse = False
        handle: _CallHandle | None = getattr(self._local, "handle", None)
        try:
            if handle is not None and not handle.attach(backend, lease):
                reuse = True  # cancelled before the request was sent: the worker is untouched
                return Outcome(status="cancelled", error=CallCancelled(
                    f"{tool.name}: the call was cancelled by its caller before it started"))
            if lease.fresh:
                with self._lock:  # named in call order, so equal runs give equal traces
                    self._workers_named += 1
                    worker.name = f"w{self._workers_named}"
                self._trace.record("worker.spawn", call_id, {
                    "worker": worker.name, "isolation": tool.isolation, "pid": worker.pid})
                # The init message (key, grants, environment, the tool) by type and size
                # only. For a worker prepared ahead it was sent then; when is not recorded,
                # so that equal runs give equal traces whatever the pool's timing.
                self._trace.record("ipc.send", call_id, {
                    "type": "init", "worker": worker.name, "bytes": lease.init_bytes}, plain=True)
            self._trace.record("ipc.send", call_id, {"type": "call", "bytes": len(call_frame),
                                                     "worker": worker.name}, plain=True)
            outcome = backend.exchange(lease, call_id, call_frame)
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
            backend.release(lease, reuse)
        return outcome
