"""The wire protocol between the parent and a worker: the only definition of messages.

Framing: every message is ``HEADER`` (payload length, 4 bytes, network order) followed
by a pickled ``(kind, body)`` tuple. The reader checks the length against its limit
*before* reading the payload, so a worker cannot make the parent buffer more than
``Limits.output_bytes``.

Messages, parent -> worker:
  ("init", {...})   lock down and load the tool (see failcore_worker.main.lock_down)
  ("call", {"token": bytes, "mac": str, "args": dict})
  ("exit", {})
Worker -> parent:
  ("result", {"value": obj, "events": [GuardEvent], "retire": bool})
  ("error",  {"kind": str, "type": str, "message": str, "traceback": str, "events": [...]})

The capability token is ``header \\n grants \\n limits`` (three canonical JSON documents)
with an HMAC-SHA256 under the per-session key; the grants and limits parts are the same
bytes for every call of a tool, which lets both sides cache their encoding and parsing.
"""

import hashlib
import hmac
import json
import pickle
import socket
import struct
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict

if TYPE_CHECKING:
    from failcore_worker.rules import Grants

HEADER = struct.Struct("!I")
PICKLE_PROTOCOL = 5
MAX_CONTROL_FRAME = 64 * 1024 * 1024

# Error kinds a worker reports; the parent maps each to one FailCore error.
ERR_TOOL = "tool"  # the tool raised
ERR_DENIED = "denied"  # a guard blocked an operation during the call
ERR_TOKEN = "token"  # the token did not verify or exceeds the locked-down grants
ERR_MEMORY = "memory"  # MemoryError / RLIMIT_AS
ERR_RESOURCE = "resource"  # another rlimit (file size, open files, CPU)
ERR_UNPICKLABLE = "unpicklable"  # the result (or arguments) could not be pickled
ERR_INIT = "init"  # lock-down or loading the tool failed


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
# bytes a tool may have written. The payload is the UTF-8 JSON array ``[kind, body]``.

def encode_data(kind: str, body: dict[str, Any]) -> bytes:
    """A worker -> parent frame: header + JSON ``[kind, body]`` (NaN refused)."""
    payload = json.dumps([kind, body], separators=(",", ":"), allow_nan=False,
                         ensure_ascii=False).encode()
    return HEADER.pack(len(payload)) + payload


class BadFrame(ValueError):
    """A worker -> parent frame that is not ``[kind: str, body: object]`` JSON."""


def decode_data(payload: bytes | bytearray) -> tuple[str, dict[str, Any]]:
    """Parse a worker -> parent frame; linear in its size, raises BadFrame when malformed."""
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise BadFrame(f"not JSON: {exc}") from None
    if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], dict)):
        raise BadFrame("expected [kind, body]")
    return value[0], value[1]


def recv(sock: socket.socket, limit: int = MAX_CONTROL_FRAME) -> tuple[str, dict[str, Any]]:
    return decode(recv_frame(sock, limit))


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
