"""The wire protocol between the parent and a worker: the only definition of messages.

Framing: every message is ``HEADER`` (payload length, 4 bytes, network order) followed
by the payload. The reader checks the length against its limit *before* reading the
payload, so a worker cannot make the parent buffer more than ``reply_limit(output_bytes)``.

Parent -> worker payloads are pickled ``(kind, body)`` tuples (the trusted direction):
  ("init", {...})   lock down and load the tool (see failcore_worker.main.lock_down)
  ("call", {"token": bytes, "mac": str, "args": dict})
  ("exit", {})
Worker -> parent payloads are data, never a pickle (:func:`encode_data`): UTF-8 JSON
``[kind, body]``, then, when the value holds bytes, a NUL and their raw bytes (JSON text
never contains a raw NUL). Values are tagged data (``failcore_worker._values``):
  ("result", {"value": data, "events": [GuardEvent], "retire": bool, "call_id": str,
              "cpu_s": "00000.000123", "blocks": int (when any operation was refused)})
  ("error",  {"kind": str, "type": str, "message": str, "traceback": str (text),
              "events": [...], "call_id": str | None, "cpu_s": str, "blocks": int})
``cpu_s`` is a fixed-width decimal string, so equal calls give equal reply sizes.

The socket broker (issue 16): a confined worker has no network, so while a call runs its
socket factory asks the parent. Worker -> parent, as JSON data frames (``encode_data``):
  ("broker.resolve", BrokerResolve)   a name lookup: getaddrinfo, gethostbyaddr, getnameinfo
  ("broker.connect", BrokerConnect)   a TCP connect from the tool's socket
Parent -> worker, a pickle frame (``encode``) whose first bytes carry the descriptor:
  ("broker.reply", BrokerReply)       with ``fd`` True, one descriptor rides ``SCM_RIGHTS``

The capability token is ``header \\n grants \\n limits`` (three canonical JSON documents)
with an HMAC-SHA256 under the per-session key; the grants and limits parts are the same
bytes for every call of a tool, which lets both sides cache their encoding and parsing.
"""

import array
import hashlib
import hmac
import json
import os
import pickle
import socket
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict

if TYPE_CHECKING:
    from failcore_worker._landlock import Plan
    from failcore_worker.rules import Grants

HEADER = struct.Struct("!I")
_FD = array.array("i")
PICKLE_PROTOCOL = 5
MAX_CONTROL_FRAME = 64 * 1024 * 1024
# Room for the reply envelope and guard events on top of the tool's own output limit.
REPLY_ENVELOPE_BYTES = 256 * 1024


def reply_limit(output_bytes: int) -> int:
    """The largest reply payload the parent reads for a tool with this ``output_bytes``."""
    return output_bytes + REPLY_ENVELOPE_BYTES

# Error kinds a worker reports; the parent maps each to one FailCore error.
ERR_TOOL = "tool"  # the tool raised
ERR_DENIED = "denied"  # a guard blocked an operation during the call
ERR_TOKEN = "token"  # the token did not verify or exceeds the locked-down grants
ERR_MEMORY = "memory"  # MemoryError / RLIMIT_AS
ERR_RESOURCE = "resource"  # another rlimit (file size, open files, CPU)
ERR_OUTPUT = "output"  # the result holds a type that cannot cross as data
ERR_TOO_LARGE = "too_large"  # the result exceeds output_bytes (found while encoding it)
ERR_INIT = "init"  # lock-down or loading the tool failed

BROKER_RESOLVE = "broker.resolve"
BROKER_CONNECT = "broker.connect"
BROKER_REPLY = "broker.reply"
# A broker request is a few short fields; anything longer is not one (the parent refuses it
# unread). Reply frames are bounded by the parent (a capped address list).
MAX_BROKER_REQUEST = 4096
MAX_BROKER_REPLY = 64 * 1024
# What a well-formed request may hold. The worker's factory never sends anything else
# (it raises what libc would, locally); the parent reports anything else as a violation.
BROKER_FAMILIES = (int(socket.AF_INET), int(socket.AF_INET6))
BROKER_SOCKTYPES = (0, int(socket.SOCK_STREAM), int(socket.SOCK_DGRAM), int(socket.SOCK_RAW))
BROKER_MAX_HOST = 255  # longer than any DNS name can be, in any spelling that resolves
BROKER_MAX_SERVICE = 32
# Plain ints: ``~`` of an IntFlag keeps only the flag's own bits, hiding unknown ones.
BROKER_AI_FLAGS = int(socket.AI_PASSIVE | socket.AI_CANONNAME | socket.AI_NUMERICHOST
                      | socket.AI_V4MAPPED | socket.AI_ALL | socket.AI_ADDRCONFIG
                      | socket.AI_NUMERICSERV)
BROKER_NI_FLAGS = int(socket.NI_NOFQDN | socket.NI_NUMERICHOST | socket.NI_NAMEREQD
                      | socket.NI_NUMERICSERV | socket.NI_DGRAM)


class BrokerResolve(TypedDict):
    """``broker.resolve``: a lookup the tool asked for, judged and done by the parent.

    ``op`` "getaddrinfo": ``host``, ``port`` (number, service name or None), ``family``,
    ``type``, ``proto``, ``flags`` as the tool passed them. "gethostbyaddr": ``host`` (an
    address, or a name resolved first). "getnameinfo": ``host`` (an address), ``port``,
    ``flags`` (NI_*). Fields an op does not use are 0 / None.
    """

    id: int
    op: Literal["getaddrinfo", "gethostbyaddr", "getnameinfo"]
    host: str
    port: int | str | None
    family: int
    type: int
    proto: int
    flags: int


class BrokerConnect(TypedDict):
    """``broker.connect``: the tool's AF_INET/AF_INET6 stream socket connects to ``host``
    (an address, or a name the parent resolves itself), ``port``; IPv6 extras as given."""

    id: int
    family: int
    proto: int
    host: str
    port: int
    flowinfo: int
    scope_id: int


class BrokerReply(TypedDict, total=False):
    """``broker.reply``, answering the request with the same ``id``.

    Exactly one outcome: ``denied`` (a policy refusal: ``rule``, ``reason``, ``message``),
    ``gai`` / ``herror`` (a resolver error code and ``message``), ``errno`` (the connect
    failed at once), or success: ``addrinfo`` (getaddrinfo tuples), ``hostent``
    (gethostbyaddr), ``nameinfo`` (getnameinfo) or, for a connect, ``fd`` True: a
    descriptor rides this frame; ``in_progress`` says the connect is still under way (the
    worker waits for it at most ``wait_s``, the call's remaining time). ``exhausted``: the
    call used up its broker budget; the worker stops asking until the next call.
    """

    id: int
    denied: bool
    rule: str
    reason: str
    message: str
    gai: int
    herror: int
    errno: int
    addrinfo: list[tuple[int, int, int, str, tuple[Any, ...]]]
    hostent: tuple[str, list[str], list[str]]
    nameinfo: tuple[str, str]
    fd: bool
    in_progress: bool
    wait_s: float
    exhausted: bool


Action = Literal["allow", "warn", "block"]


class GuardSubject(TypedDict):
    """What a guarded operation acts on: ``op`` ("net.connect", "net.resolve", "net.bind",
    "fs.open", "fs.modify", "proc.exec", "proc.kill", "ctypes", ...) and its target."""

    op: str
    target: NotRequired[str]
    host: NotRequired[str]
    port: NotRequired[int]
    names: NotRequired[list[str]]
    path: NotRequired[str]
    write: NotRequired[bool]
    program: NotRequired[str]


class GuardEvent(GuardSubject):
    """A guarded operation and its verdict, reported to the parent and written to the trace
    (the trace's ``guard`` body and the re-judge keys are derived from this class).

    ``observed``: "worker" (reported by the worker: a hostile tool can lie in it) or
    "parent" (seen by the parent itself); absent means "worker".
    """

    action: Action
    rule: str
    reason: str
    observed: NotRequired[Literal["worker", "parent"]]


class LimitsWire(TypedDict):
    """``failcore.Limits`` as it travels: in the init message and signed into each token."""

    timeout_s: float
    memory_mb: int
    cpu_s: int
    file_size_mb: int
    open_files: int
    output_bytes: int
    processes: int


class InitBody(TypedDict):
    """parent -> worker ``init``: lock down to these grants, then load the tool.

    ``grants_obj`` is the Grants object itself (parsing ``grants_bytes`` costs ~100 us);
    ``grants_bytes`` is the token's grants part, byte for byte. ``uid``/``gid``: drop to them
    when the worker is root. ``implicit_read``: directories every worker may read.
    ``confinement``: "auto", "require" or "off" (the kernel layers); ``network``: "none" or
    "host"; ``landlock``: the tool's Landlock plan (``_landlock.Plan``, None without
    Landlock), to which the worker adds its scratch directory.
    """

    key: bytes
    tool: str
    grants_obj: "Grants"
    grants_bytes: bytes
    limits: LimitsWire
    env: dict[str, str]
    base_dir: str
    sys_path: list[str]
    isolation: str
    uid: int | None
    gid: int | None
    implicit_read: list[str]
    tool_blob: bytes
    confinement: str
    network: str
    landlock: "Plan | None"


class CallBody(TypedDict):
    """parent -> worker ``call``: the signed token and the validated arguments."""

    token: bytes
    mac: str
    args: dict[str, Any]


class FrameTooLarge(Exception):
    """The peer announced a frame larger than the reader's limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class PeerClosed(Exception):
    """The peer closed the channel (or died) before a whole frame arrived."""


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def encode(kind: str, body: dict[str, Any]) -> bytes:
    payload = pickle.dumps((kind, body), protocol=PICKLE_PROTOCOL)
    return HEADER.pack(len(payload)) + payload


def send(sock: socket.socket, kind: str, body: dict[str, Any]) -> int:
    data = encode(kind, body)
    sock.sendall(data)
    return len(data)


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise PeerClosed(f"channel closed after {got} of {n} bytes")
        got += k
    return buf


def recv_frame(sock: socket.socket, limit: int = MAX_CONTROL_FRAME) -> bytes | bytearray:
    """Read one frame's payload; raise FrameTooLarge without reading it when over ``limit``."""
    head = sock.recv(HEADER.size, socket.MSG_WAITALL)
    if len(head) < HEADER.size:
        raise PeerClosed("channel closed before a frame header")
    (size,) = HEADER.unpack(head)
    if size > limit:
        raise FrameTooLarge(size, limit)
    return _recv_exact(sock, size)


def decode(payload: bytes | bytearray) -> tuple[str, dict[str, Any]]:
    kind, body = pickle.loads(payload)
    return kind, body


# Worker -> parent frames are data, never a pickle: the parent must not run pickle's VM on
# bytes a tool may have written. The C encoder is made once (json.dumps with non-default
# options builds a new one per call, ~1-2 us of the warm call's budget).
def _not_data(obj: object) -> object:
    raise TypeError(f"{type(obj).__name__} is not JSON data")


_c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
if _c_make_encoder is not None:
    _C_ENCODER = _c_make_encoder(None, _not_data, json.encoder.encode_basestring, None,
                                 ":", ",", False, False, False)

    def _encode(obj: object) -> str:
        return "".join(_C_ENCODER(obj, 0))
else:  # an interpreter without the C accelerator
    _ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False,
                                check_circular=False, default=_not_data)

    def _encode(obj: object) -> str:
        return _ENCODER.encode(obj)


def encode_data(kind: str, body: dict[str, Any],
                blobs: Sequence[bytes | bytearray] = ()) -> bytes:
    """A worker -> parent frame: header + JSON ``[kind, body]`` (+ NUL + ``blobs``).

    NaN is refused (tag it); lone surrogates (file names) cross as themselves.
    ``body`` must hold no cycles (the encoder does not look for them).
    """
    return frame_data(data_text(kind, body), blobs)


def data_text(kind: str, body: dict[str, Any]) -> bytes:
    """The JSON text of a worker -> parent frame (what ``decode_data`` parses)."""
    return _encode([kind, body]).encode("utf-8", "surrogatepass")


_quote = json.encoder.encode_basestring  # the C version when available
_MISSING = object()


def small_result_frame(body: dict[str, Any]) -> bytes | None:
    """The whole frame of the warm path's common reply, written directly: a result whose
    value is a short str, an int below 2**62 or None, without events, with its CPU time.
    The same data the encoder writes, for a fraction of its cost. None: use ``encode_data``."""
    if len(body) != 5:
        return None
    value, call_id = body.get("value", _MISSING), body.get("call_id")
    events, retire, cpu_s = body.get("events"), body.get("retire"), body.get("cpu_s")
    if type(call_id) is not str or type(events) is not list or events or type(retire) is not bool \
            or type(cpu_s) is not str or len(cpu_s) != 12:
        return None
    if type(value) is int and -(1 << 62) < value < (1 << 62):
        shown = str(value)
    elif type(value) is str and len(value) <= 4096:
        shown = _quote(value)
    elif value is None:
        shown = "null"
    else:
        return None
    try:
        text = ('["result",{"value":' + shown + ',"events":[],"retire":'
                + ("true" if retire else "false") + ',"call_id":' + _quote(call_id)
                + ',"cpu_s":"' + cpu_s + '"}]').encode()
    except UnicodeEncodeError:  # a lone surrogate: the general path carries it
        return None
    return HEADER.pack(len(text)) + text


def frame_data(text: bytes, blobs: Sequence[bytes | bytearray] = ()) -> bytes:
    """Header + ``text`` (+ NUL + ``blobs``, the raw bytes a result's ``$bytes`` tags name)."""
    if not blobs:
        return HEADER.pack(len(text)) + text
    size = len(text) + 1 + sum(len(b) for b in blobs)
    return b"".join([HEADER.pack(size), text, b"\0", *blobs])


class BadFrame(ValueError):
    """A worker -> parent frame that is not ``[kind: str, body: object]`` JSON."""


def _no_constant(name: str) -> Any:
    raise BadFrame(f"not JSON data: the constant {name} (a worker tags NaN and infinities)")


# Made once: json.loads with any non-default option builds a new decoder per call (~3 us).
_DECODER = json.JSONDecoder(parse_constant=_no_constant)
# The C scanner itself: (value, end) from a start index, StopIteration when no value starts
# there. A frame has no whitespace around its text (what decode() strips with two regex
# calls), so anything after the value is an error.
_Scan = Callable[[str, int], tuple[Any, int]]
_SCAN: _Scan = _DECODER.scan_once  # type: ignore[attr-defined]


def decode_data(text: str | bytes | bytearray,
                object_hook: Callable[[dict[str, Any]], Any] | None = None
                ) -> tuple[str, dict[str, Any]]:
    """Parse a worker -> parent frame's JSON text; linear in its size, raises BadFrame when
    malformed (``NaN``/``Infinity`` included). ``object_hook`` as for ``json.loads``;
    whatever it raises propagates."""
    if type(text) is not str:
        try:
            text = text.decode("utf-8", "surrogatepass")  # type: ignore[union-attr]
        except UnicodeDecodeError as exc:
            raise BadFrame(f"not UTF-8: {exc}") from None
    scan: _Scan = _SCAN if object_hook is None else json.JSONDecoder(  # type: ignore[attr-defined]
        object_hook=object_hook, parse_constant=_no_constant).scan_once
    try:
        value, end = scan(text, 0)
    except StopIteration:
        raise BadFrame("not JSON: no value at the start") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise BadFrame(f"not JSON: {exc}") from None
    if end != len(text):
        raise BadFrame(f"not JSON: extra data at character {end}")
    if not (type(value) is list and len(value) == 2 and type(value[0]) is str
            and type(value[1]) is dict):
        raise BadFrame("expected [kind, body]")
    return value[0], value[1]


def recv(sock: socket.socket, limit: int = MAX_CONTROL_FRAME) -> tuple[str, dict[str, Any]]:
    return decode(recv_frame(sock, limit))


def send_with_fd(sock: socket.socket, frame: bytes, fd: int | None) -> None:
    """Send ``frame`` whole; ``fd`` (if any) rides its first bytes as ``SCM_RIGHTS``."""
    if fd is None:
        sock.sendall(frame)
        return
    sent = socket.send_fds(sock, [frame], [fd])
    if sent < len(frame):
        sock.sendall(memoryview(frame)[sent:])


def recv_frame_fds(sock: socket.socket, limit: int = MAX_CONTROL_FRAME,
                   max_fds: int = 1) -> tuple[bytes | bytearray, list[int]]:
    """``recv_frame`` that also takes the descriptors riding the header, close-on-exec.

    ``recvmsg`` with MSG_CMSG_CLOEXEC, not ``socket.recv_fds``: before 3.12 that helper
    drops its ``flags``, leaving received descriptors inheritable by a tool's children.
    More than ``max_fds`` are never kept (the kernel closes what does not fit). Raises like
    ``recv_frame``; descriptors already received are closed first.
    """
    head = b""
    fds: list[int] = []
    room = socket.CMSG_LEN(max_fds * _FD.itemsize)
    try:
        while len(head) < HEADER.size:
            data, ancillary, _, _ = sock.recvmsg(HEADER.size - len(head), room,
                                                 socket.MSG_CMSG_CLOEXEC)
            for level, kind, blob in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(blob[: len(blob) - len(blob) % got.itemsize])
                    fds.extend(got)
            if not data:
                raise PeerClosed("channel closed before a frame header")
            head += data
        (size,) = HEADER.unpack(head)
        if size > limit:
            raise FrameTooLarge(size, limit)
        return _recv_exact(sock, size), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def sign(key: bytes, token: bytes) -> str:
    return hmac.new(key, token, hashlib.sha256).hexdigest()


def verify(key: bytes, token: bytes, mac: str) -> bool:
    return hmac.compare_digest(sign(key, token), mac)


def split_token(token: bytes) -> tuple[dict[str, Any], bytes, bytes]:
    """(header, grants bytes, limits bytes) of a token; raises ValueError when malformed."""
    parts = token.split(b"\n")
    if len(parts) != 3:
        raise ValueError("malformed token: expected header, grants and limits")
    header = json.loads(parts[0])
    if not isinstance(header, dict):
        raise ValueError("malformed token header")
    return header, parts[1], parts[2]


# --- confined exec (``failcore mcp guard``): parent <-> launcher, JSON frames both ways ---
#
# The launcher (``failcore_worker.confined_exec``) runs a third-party program confined.
# parent -> launcher: ("exec.plan", ExecPlan)
# launcher -> parent: ("exec.listener", {"port": int}) with the listening socket's
#   descriptor (SCM_RIGHTS), only when ``proxy`` was asked for; then ("exec.ready",
#   ExecReport) just before execve, or ("exec.failed", ExecFailure) instead. The channel is
#   close-on-exec: end of file after "exec.ready" means the program is running.

EXEC_PLAN = "exec.plan"
EXEC_LISTENER = "exec.listener"
EXEC_READY = "exec.ready"
EXEC_FAILED = "exec.failed"
MAX_EXEC_FRAME = 4 * 1024 * 1024


class ExecRlimits(TypedDict):
    """Limits set with soft == hard (so the program cannot raise them back); None: leave."""

    data_bytes: int | None
    processes: int | None
    open_files: int | None
    file_size_bytes: int | None


class ExecPlan(TypedDict):
    """parent -> launcher: how to confine, then what to exec.

    ``argv[0]`` is the resolved executable. ``landlock_paths``: (path, Landlock rights)
    pairs, nothing else is reachable. ``connect_ports``: TCP ports connect may reach (the
    proxy's is added by the launcher). ``require``: layers that must be in force, or the
    launcher refuses to exec. ``uid``/``gid``: drop to them (root only), or None.
    """

    argv: list[str]
    env: dict[str, str]
    cwd: str
    netns: bool
    proxy: bool
    landlock_paths: list[tuple[str, int]]
    connect_ports: list[int]
    rlimits: ExecRlimits
    uid: int | None
    gid: int | None
    require: list[str]


class ExecLayer(TypedDict):
    in_force: bool
    reason: str


class ExecReport(TypedDict):
    """launcher -> parent ``exec.ready``: per layer, in force or not and why; the pid that
    will become the program; the Landlock ABI and how many path rules were added."""

    pid: int
    layers: dict[str, ExecLayer]
    landlock_abi: int
    rules: int


class ExecFailure(TypedDict):
    """launcher -> parent ``exec.failed``: which stage failed and why (nothing was run)."""

    stage: str
    message: str


# --- the zygote's control channel ----------------------------------------------------------
# SOCK_SEQPACKET, one message per packet, each a JSON array ``[kind, field...]``: data in
# both directions (a root worker with native code could reach the zygote's socket; the
# parent must not unpickle what it might write).
#   parent -> zygote: ["fork", worker_id, warm_up]  (the worker's channel fd via SCM_RIGHTS)
#   zygote -> parent: ["ready", zygote_pid, report] | ["forked", worker_id, pid, chan_fd]
#                     | ["exited", pid, wait_status]
CONTROL_FIELDS: dict[str, tuple[type, ...]] = {
    "fork": (int, bool), "ready": (int, dict), "forked": (int, int, int), "exited": (int, int),
}


def encode_control(kind: str, *fields: Any) -> bytes:
    return json.dumps([kind, *fields], separators=(",", ":"), allow_nan=False).encode()


def decode_control(data: bytes) -> list[Any]:
    """A control message, its kind and field types checked; raises BadFrame otherwise."""
    try:
        msg = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise BadFrame(f"control message is not JSON: {exc}") from None
    if not isinstance(msg, list) or not msg or msg[0] not in CONTROL_FIELDS:
        raise BadFrame(f"unknown control message {str(msg)[:80]}")
    types = CONTROL_FIELDS[msg[0]]
    if len(msg) != 1 + len(types) or not all(
            isinstance(v, t) and (t is bool or not isinstance(v, bool))
            for v, t in zip(msg[1:], types, strict=True)):
        raise BadFrame(f"malformed control message {str(msg)[:80]}")
    return msg
