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
  ("result", {"value": data, "events": [GuardEvent], "retire": bool, "call_id": str})
  ("error",  {"kind": str, "type": str, "message": str, "traceback": str (text),
              "events": [...], "call_id": str | None})

The capability token is ``header \\n grants \\n limits`` (three canonical JSON documents)
with an HMAC-SHA256 under the per-session key; the grants and limits parts are the same
bytes for every call of a tool, which lets both sides cache their encoding and parsing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

HEADER = struct.Struct("!I")
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
    value is a short str, an int below 2**62 or None, without events. The same text the
    encoder writes, for a fraction of its cost. None: use ``encode_data``."""
    if len(body) != 4:
        return None
    value, call_id = body.get("value", _MISSING), body.get("call_id")
    events, retire = body.get("events"), body.get("retire")
    if type(call_id) is not str or type(events) is not list or events or type(retire) is not bool:
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
                + ("true" if retire else "false") + ',"call_id":' + _quote(call_id) + "}]"
                ).encode()
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
