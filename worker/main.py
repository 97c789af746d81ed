"""The worker: lock-down, then a request/response loop over one channel.

A worker is forked from the zygote (a clean, spawned interpreter that never saw the
parent's memory) and waits for ``init``. Lock-down happens before the tool's code is
unpickled: working directory, environment, rlimits with hard limits lowered, the kernel
layers (capability bounding set emptied while still privileged, optional uid drop, no
capabilities, no_new_privs, a Landlock domain for its grants), then the layer-3 guards.
Only then is the tool loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import resource
import shutil
import socket
import sys
import time
import traceback
from typing import Any

import cloudpickle

from failcore_worker import _broker, _data_cost, _kernel, _landlock, _values, guards, protocol
from failcore_worker._kernel import Layer
from failcore_worker.rules import Grants

_MB = 1024 * 1024
# A warm worker's CPU rlimit covers this many calls at cpu_s each; it asks to be retired
# before the remaining budget drops below one call's worth.
_WARM_CPU_CALLS = 64
# Guard events reported per call (a tool opening 100k files must not flood the reply).
_MAX_EVENTS = 1000
# An error's message and traceback are cut to this many characters each (they travel in
# the reply's envelope, which the parent bounds).
_MAX_ERROR_TEXT = 16 * 1024


class _State:
    def __init__(self) -> None:
        self.fn: Any = None
        self.tool = ""
        self.key = b""
        self.grants: Grants | None = None
        self.grants_bytes = b""
        self.grant_cache: dict[bytes, Grants] = {}
        self.limits: dict[str, Any] = {}
        self.limits_bytes = b""
        self.base_dir = ""
        self.init_error: dict[str, Any] | None = None
        self.seen_calls: set[str] = set()
        self.call_id: str | None = None  # the current request's, as its token names it
        self.calls = 0
        self.cpu_hard = 0.0
        self.cpu_s = 0
        self.dirs = 0
        self.next_dir: str | None = None
        self.used_dir: str | None = None
        self.kernel: dict[str, Layer] = {}
        self.real_base = ""
        self.host_network = False
        self.stacked = False
        self.chan: socket.socket | None = None
        self.brokered = False


def _cpu_used() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _vm_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        pages = int(f.read().split()[0])
    return pages * resource.getpagesize()


def _set_limits(state: _State, limits: dict[str, Any], warm: bool) -> None:
    def lower(which: int, value: int) -> None:
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))

    # Address space: the limit is headroom above what the interpreter already maps.
    lower(resource.RLIMIT_AS, _vm_bytes() + int(limits["memory_mb"]) * _MB)
    lower(resource.RLIMIT_FSIZE, int(limits["file_size_mb"]) * _MB)
    lower(resource.RLIMIT_CORE, 0)
    highest_fd = max((int(n) for n in os.listdir("/proc/self/fd")), default=2)
    lower(resource.RLIMIT_NOFILE, max(int(limits["open_files"]), highest_fd + 8))
    state.cpu_s = int(limits["cpu_s"])
    budget = state.cpu_s * (_WARM_CPU_CALLS if warm else 1)
    cpu = int(_cpu_used()) + budget + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    state.cpu_hard = float(cpu)


def lock_down(state: _State, body: dict[str, Any]) -> None:
    """Reduce this process to what the tool's grants allow, then load the tool."""
    state.key = body["key"]
    state.tool = body["tool"]
    state.grants_bytes = body["grants_bytes"]
    state.grants = body["grants_obj"]  # the Grants object itself: from_wire costs ~100 us
    state.grant_cache = {state.grants_bytes: state.grants}
    state.limits = body["limits"]
    state.limits_bytes = protocol.canonical_json(state.limits)
    state.base_dir = body["base_dir"]
    os.chdir(state.base_dir)
    state.real_base = os.getcwd()  # resolved by the kernel: the scratch rule's path
    os.environ.clear()
    os.environ.update(body["env"])
    for entry in body.get("sys_path", ()):
        if entry not in sys.path:
            sys.path.append(entry)
    _set_limits(state, state.limits, warm=body.get("isolation") == "tool")
    mode = body.get("confinement", "auto")
    state.host_network = body.get("network") == "host"
    kernel = state.kernel  # the bounding set was emptied once, in the zygote
    uid = body.get("uid")
    if uid is not None and os.getuid() == 0:
        kernel["uid"] = _kernel.drop_uid(int(uid), int(body["gid"]))
        if not kernel["uid"].in_force:
            raise PermissionError(kernel["uid"].reason)
    if os.getuid() != 0:
        # Per uid, so it also counts the uid's other processes: a bound, not an exact count.
        # Root ignores it; the parent's watchdog enforces `processes` for root workers.
        nproc = len(os.listdir("/proc")) + int(state.limits.get("processes", 32))
        soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
        if hard == resource.RLIM_INFINITY or nproc < hard:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    grants = state.grants
    implicit = tuple(body.get("implicit_read", ()))
    if implicit:
        grants = dataclasses.replace(grants, implicit_read=implicit)
        state.grants = grants
        state.grant_cache = {state.grants_bytes: grants}
    if mode != "off":
        kernel["capabilities"] = _kernel.clear_capabilities()
        kernel["no_new_privs"] = _kernel.set_no_new_privs()
        kernel["landlock"] = _confine_files(state, body.get("landlock"))
        missing = [f"{name}: {layer.reason}" for name, layer in kernel.items()
                   if not layer.in_force]
        if mode == "require" and missing:
            raise PermissionError("confinement='require' but not in force in this worker: "
                                  + "; ".join(missing))
    guards.install(grants, state.base_dir)
    if mode != "off" and not state.host_network and state.chan is not None:
        # After the guards, so the broker's socket functions are the ones in place: a
        # confined worker's TCP connects and name lookups go through the parent (issue 16).
        _broker.install(_broker.channel_ask(state.chan))
        state.brokered = True
    state.fn = cloudpickle.loads(body["tool_blob"])


def _confine_files(state: _State, plan: _landlock.Plan | None) -> Layer:
    """Enter the Landlock domain the parent planned for this tool (files, ports, signals),
    plus this worker's scratch directory."""
    if plan is None:
        return Layer(False, "the kernel has no Landlock (or it is disabled)")
    if not _kernel.single_threaded():
        return Layer(False, "the worker has several threads (Landlock binds one thread)")
    plan = plan.with_scratch(state.real_base)
    try:
        _landlock.restrict(plan)
    except OSError as exc:
        return Layer(False, str(exc))
    return Layer(True, f"Landlock ABI {plan.abi}, {len(plan.paths) + len(plan.ports)} rules")


def _stack_narrower(state: _State, grants: Grants) -> None:
    """Rights only shrink, in the kernel too: a token narrower than what this worker locked
    down to stacks a narrower Landlock domain (the kernel intersects them). The worker is
    retired after the call: a later, wider token could not be honoured any more."""
    landlock = state.kernel.get("landlock")
    if landlock is None or not landlock.in_force:
        return
    guards.runtime_begin()  # the guards refuse ctypes calls; this one is the run loop's
    try:
        plan = _landlock.plan(grants, (state.real_base,),
                              (*grants.implicit_read, *_landlock.loader_paths()),
                              _landlock.cached_abi(), host_network=state.host_network)
        _landlock.restrict(plan)
    finally:
        guards.runtime_end()
    state.stacked = True


def format_traceback(exc: BaseException) -> str:
    """A traceback *without source lines*: file, line number and function per frame.

    Formatting source lines would read files in the worker: blocked by the guards, or,
    worse, a way to copy any file into the trace (a code object can name any file as its
    co_filename). The parent adds lines back for files it trusts (the tool's own source,
    the interpreter's trees).
    """
    parts: list[str] = []

    def emit(te: traceback.TracebackException) -> None:
        if te.__cause__ is not None:
            emit(te.__cause__)
            parts.append("\nThe above exception was the direct cause of the following "
                         "exception:\n\n")
        elif te.__context__ is not None and not te.__suppress_context__:
            emit(te.__context__)
            parts.append("\nDuring handling of the above exception, another exception "
                         "occurred:\n\n")
        if te.stack:
            parts.append("Traceback (most recent call last):\n")
            parts.extend(f'  File "{f.filename}", line {f.lineno}, in {f.name}\n'
                         for f in te.stack)
        parts.extend(te.format_exception_only())

    emit(traceback.TracebackException(type(exc), exc, exc.__traceback__, lookup_lines=False,
                                      limit=64))
    return "".join(parts)


def _text(make: Any, what: str, limit: int = _MAX_ERROR_TEXT) -> str:
    """``make()`` as bounded text; a failing ``__str__`` or formatter never loses the reply."""
    try:
        text = str(make())
    except Exception as exc:  # noqa: BLE001 - the tool's own __str__ may raise anything
        return f"<{what} could not be formatted: {type(exc).__name__}>"
    if len(text) > limit:
        text = f"{text[:limit]}... [{len(text) - limit} more characters not sent]"
    return text


def _error(kind: str, exc: BaseException | None, message: str = "", **extra: Any) -> dict[str, Any]:
    """An error reply's body: plain text fields only (tracebacks cross as text)."""
    body: dict[str, Any] = {
        "kind": kind,
        "type": type(exc).__name__ if exc is not None else kind,
        "message": message or (_text(lambda: exc, "the message") if exc is not None else ""),
        "traceback": _text(lambda: format_traceback(exc), "the traceback", 4 * _MAX_ERROR_TEXT)
                     if exc is not None else "",
        "events": [],
    }
    body.update(extra)
    return body


def _call_id(body: dict[str, Any]) -> str | None:
    """The call id the request's token names, read without verifying it (error replies)."""
    try:
        header, _grants, _limits = protocol.split_token(body["token"])
    except (KeyError, ValueError, TypeError, AttributeError):
        return None
    call_id = header.get("call_id")
    return call_id if isinstance(call_id, str) else None


def _check_token(state: _State, body: dict[str, Any]) -> Grants | dict[str, Any]:
    token: bytes = body["token"]
    if not protocol.verify(state.key, token, body["mac"]):
        return _error(protocol.ERR_TOKEN, None, "capability token does not verify (bad MAC)")
    try:
        header, grants_bytes, limits_bytes = protocol.split_token(token)
    except ValueError as exc:
        return _error(protocol.ERR_TOKEN, None, f"capability token is malformed: {exc}")
    call_id = header.get("call_id")
    state.call_id = call_id if isinstance(call_id, str) else None
    if header.get("tool") != state.tool:
        return _error(protocol.ERR_TOKEN, None,
                      f"token is for tool {header.get('tool')!r}, this worker runs {state.tool!r}")
    if not isinstance(call_id, str) or call_id in state.seen_calls:
        return _error(protocol.ERR_TOKEN, None, f"token call id {call_id!r} was already used")
    if int(header.get("expires_ms", 0)) < time.time() * 1000:
        return _error(protocol.ERR_TOKEN, None, "capability token has expired")
    if limits_bytes != state.limits_bytes:
        # The limits are signed into the token and applied at lock-down: one route, checked.
        return _error(protocol.ERR_TOKEN, None,
                      "token limits differ from the limits this worker locked down with")
    grants = state.grant_cache.get(grants_bytes)
    if grants is None:
        assert state.grants is not None
        wire = json.loads(grants_bytes)
        wire["implicit_read"] = list(state.grants.implicit_read)
        grants = Grants.from_wire(wire)
        if not grants.is_subset_of(state.grants):
            return _error(protocol.ERR_TOKEN, None,
                          "token grants exceed what this worker locked down to (rights only shrink)")
        try:
            _stack_narrower(state, grants)
        except OSError as exc:
            return _error(protocol.ERR_TOKEN, None,
                          f"could not narrow the worker's Landlock domain to the token: {exc}",
                          retire=True)
        state.grant_cache[grants_bytes] = grants
    state.seen_calls.add(call_id)
    return grants


def _run_call(state: _State, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Run one request; every reply names the call id its token carries (verified or not:
    the parent matches replies to the calls it sent)."""
    state.call_id = None
    if state.init_error is not None:
        return "error", dict(state.init_error, call_id=_call_id(body))
    checked = _check_token(state, body)
    if isinstance(checked, dict):
        checked["call_id"] = state.call_id if state.call_id is not None else _call_id(body)
        return "error", checked
    state.calls += 1
    guards.runtime_begin()
    try:
        cwd = state.next_dir or _make_call_dir(state)
        state.next_dir = None
        os.chdir(cwd)
    finally:
        guards.runtime_end()
    state.used_dir = cwd
    guards.set_call(checked, cwd)
    cpu_before = _cpu_used()
    if state.brokered:
        _broker.begin_call()
    try:
        value = state.fn(**body["args"])
        reply: tuple[str, dict[str, Any]] = ("result", {"value": value})
    except MemoryError as exc:
        reply = "error", _error(protocol.ERR_MEMORY, exc, "the tool ran out of memory (memory_mb limit)")
    except guards.GuardDenied as exc:
        reply = "error", _error(protocol.ERR_DENIED, exc)
    except BaseException as exc:  # noqa: BLE001 - everything the tool raises goes back to the parent
        kind = protocol.ERR_RESOURCE if isinstance(exc, OSError) and exc.errno == 27 else protocol.ERR_TOOL
        reply = "error", _error(kind, exc)
    finally:
        if state.brokered:
            _broker.end_call()  # waits for a request in flight: the channel is ours again
        guards.runtime_begin()
        try:
            os.chdir(state.base_dir)  # removing the directory waits until after the reply
        finally:
            guards.runtime_end()
    events = guards.take_events()
    blocks = guards.take_blocks()
    if blocks and reply[1].get("kind") != protocol.ERR_DENIED:
        # A blocked operation fails the call even when the tool caught the PermissionError
        # or wrapped it (urllib turns it into URLError): the attempt is what matters.
        blocked: dict[str, Any] = next((dict(e) for e in events if e.get("action") == "block"), {})
        reply = "error", _error(protocol.ERR_DENIED, None, str(blocked.get("reason", "")))
    if len(events) > _MAX_EVENTS:
        # The reply carries the first events, then every refusal the guards kept: no
        # refusal is lost to the cap (``blocks`` counts them all).
        late = [e for e in events[_MAX_EVENTS:] if e.get("action") == "block"]
        dropped = len(events) - _MAX_EVENTS - len(late)
        events = events[:_MAX_EVENTS] + late + [{
            "op": "events.dropped", "action": "warn", "rule": "event cap",
            "reason": f"{dropped} further events not reported"}]
    if blocks:
        reply[1]["blocks"] = blocks
    reply[1]["events"] = events
    # CPU this process used for the call (threads included, subprocesses not): the
    # parent charges it to the tool's CPU budget.
    # Fixed width (a decimal string), so equal calls give equal reply sizes in the trace.
    cpu_after = _cpu_used()
    reply[1]["cpu_s"] = f"{min(max(0.0, cpu_after - cpu_before), 99999.0):012.6f}"
    reply[1]["call_id"] = state.call_id
    if reply[0] == "result":
        reply[1]["retire"] = state.stacked or state.cpu_hard - cpu_after < state.cpu_s + 1
    elif state.stacked:
        reply[1]["retire"] = True
    return reply


def _make_call_dir(state: _State) -> str:
    state.dirs += 1
    path = os.path.join(state.base_dir, f"call-{state.dirs}")
    os.mkdir(path, 0o700)
    return path


def _between_calls(state: _State) -> None:
    """After the reply is sent: remove the last call's directory, make the next one.

    Off the caller's clock; the next request waits in the channel meanwhile. The run
    loop's own file work, so not judged by the guards.
    """
    guards.runtime_begin()
    try:
        if state.used_dir is not None:
            try:
                os.rmdir(state.used_dir)  # the common case: the tool left nothing behind
            except OSError:
                shutil.rmtree(state.used_dir, ignore_errors=True)
            state.used_dir = None
        if state.next_dir is None and state.fn is not None:
            state.next_dir = _make_call_dir(state)
    except OSError:
        state.next_dir = None  # made on demand by the next call instead
    finally:
        guards.runtime_end()


def encode_reply(kind: str, body: dict[str, Any], output_bytes: int) -> bytes:
    """The reply frame: a result's value as data (``_values``), checked against the limits
    the parent applies, so an honest tool gets a clear error and keeps its worker."""
    if kind == "result" and output_bytes > _data_cost.SMALL:
        frame = protocol.small_result_frame(body)  # within every limit and budget
        if frame is not None:
            return frame
    try:
        blobs: list[bytes | bytearray] = []
        expansion = 0
        if kind == "result":
            encoded = _values.to_data(body["value"], output_bytes)
            body["value"], blobs, expansion = encoded.data, encoded.blobs, encoded.expansion
        text = protocol.data_text(kind, body)
        limit = protocol.reply_limit(output_bytes)
        size = len(text) + sum(len(b) + 1 for b in blobs) if blobs else len(text)
        if size > limit:
            raise _values.TooLarge(size - protocol.REPLY_ENVELOPE_BYTES, output_bytes)
        # The parent's own check, on the same text (see failcore._values.decode_reply).
        cost = _data_cost.decode_cost(text, len(text) if blobs else None) + expansion
        if cost > _data_cost.decode_budget(limit):
            return _refusal(body, protocol.ERR_TOO_LARGE, None, (
                f"result would cost the parent about {cost} bytes to decode, more than "
                f"{_data_cost.DECODE_MULTIPLE} x (output_bytes={output_bytes} + the envelope): "
                "it holds too many small objects; return fewer, larger items (e.g. text or "
                "bytes) or raise Limits(output_bytes=...)"))
        return protocol.frame_data(text, blobs)
    except _values.TooLarge as exc:
        return _refusal(body, protocol.ERR_TOO_LARGE, None, (
            f"result of at least {exc.at_least} bytes exceeds output_bytes={exc.limit} "
            "(not sent); return less or raise Limits(output_bytes=...)"))
    except _values.NotData as exc:
        return _refusal(body, protocol.ERR_OUTPUT, None, (
            f"returned {exc.describe()} that cannot cross the process boundary; return plain "
            f"data or one of: {_values.SUPPORTED}"))
    except MemoryError as exc:
        return _refusal(body, protocol.ERR_MEMORY, exc,
                        "the result was too large to encode (memory_mb limit)")
    except Exception as exc:  # noqa: BLE001 - a value's own methods may raise anything
        return _refusal(body, protocol.ERR_OUTPUT, exc, (
            f"the result could not be encoded as data: {type(exc).__name__}: "
            f"{_text(lambda e=exc: e, 'the message', 1000)}"))


def _refusal(body: dict[str, Any], kind: str, exc: BaseException | None, message: str) -> bytes:
    return protocol.encode_data("error", _error(kind, exc, message, events=body.get("events", []),
                                                call_id=body.get("call_id")))


def _send_reply(chan: socket.socket, state: _State, kind: str, body: dict[str, Any]) -> None:
    output_bytes = int(state.limits.get("output_bytes", protocol.MAX_CONTROL_FRAME))
    try:
        frame = encode_reply(kind, body, output_bytes)
    except BaseException as exc:  # noqa: BLE001 - the reply must still go out, as data
        frame = protocol.encode_data("error", _error(
            protocol.ERR_OUTPUT, None, f"the reply could not be encoded: {type(exc).__name__}",
            call_id=state.call_id))
    chan.sendall(frame)


def _warm_up() -> None:
    """Touch, while idle, what lock-down and the first call touch.

    A freshly forked worker pays copy-on-write page faults the first time it runs any
    code path; doing that before ``init`` arrives takes ~1 ms off a fresh call.
    """
    key = b"k" * 32
    token = protocol.canonical_json({"call_id": "c0", "expires_ms": 0, "tool": "t"}) + b"\n{}\n{}"
    protocol.verify(key, token, protocol.sign(key, token))
    protocol.split_token(token)
    grants = Grants()
    dataclasses.replace(grants, implicit_read=("/",))
    grants.is_subset_of(grants)
    _vm_bytes()
    os.listdir("/proc/self/fd")
    _cpu_used()
    resource.getrlimit(resource.RLIMIT_AS)
    pickle.loads(pickle.dumps(({"a": [1, "b", 2.0]}, token), protocol=protocol.PICKLE_PROTOCOL))
    encode_reply("result", {"value": {"a": [1, "b", 2.0, (3,)]}, "events": [], "call_id": "c0"},
                 1 << 20)
    dict(os.environ)


def _rehearse(state: _State) -> None:
    """Walk the call path once without the tool, right after lock-down.

    The first call in a forked process pays copy-on-write faults on every page it
    touches (~0.5 ms). A worker initialised ahead of its call does that now, while it
    waits, instead of on the caller's clock. Nothing is recorded or sent.
    """
    assert state.grants is not None
    token = protocol.canonical_json(
        {"call_id": "rehearsal", "expires_ms": 0, "tool": state.tool}) + b"\n{}\n{}"
    protocol.verify(state.key, token, protocol.sign(state.key, token))
    protocol.split_token(token)
    cwd = os.path.join(state.base_dir, "rehearsal")
    guards.runtime_begin()
    try:
        os.mkdir(cwd, 0o700)
        os.chdir(cwd)
        os.chdir(state.base_dir)
        os.rmdir(cwd)
    finally:
        guards.runtime_end()
    guards.set_call(state.grants, cwd)
    guards.take_events()
    _cpu_used()
    encode_reply("result", {"value": None, "events": [], "retire": False, "call_id": "c0"},
                 int(state.limits.get("output_bytes", 1 << 20)))


def serve(chan: socket.socket, warm_up: bool = True) -> None:
    """Answer requests until the parent closes the channel or says exit.

    ``warm_up``: touch the call path while idle; pointless (CPU only) for a worker whose
    ``init`` follows at once, since it rehearses after lock-down anyway.
    """
    state = _State()
    state.chan = chan
    if warm_up:
        _warm_up()
    while True:
        try:
            kind, body = protocol.decode(protocol.recv_frame(chan))
        except (protocol.PeerClosed, OSError, pickle.UnpicklingError, EOFError):
            os._exit(0)
        if kind == "init":
            try:
                lock_down(state, body)
                _rehearse(state)
            except BaseException as exc:  # noqa: BLE001
                state.init_error = _error(protocol.ERR_INIT, exc,
                                          f"worker lock-down failed: {type(exc).__name__}: {exc}")
        elif kind == "call":
            try:
                reply_kind, reply = _run_call(state, body)
            except BaseException as exc:  # noqa: BLE001
                reply_kind, reply = "error", _error(protocol.ERR_TOOL, exc, call_id=_call_id(body))
            _send_reply(chan, state, reply_kind, reply)
            _between_calls(state)
        else:
            os._exit(0)
