"""Capability tokens: what one call may do, signed with the session's key.

A token is ``header \\n grants \\n limits``: three canonical JSON documents. The grants
and limits of a tool do not change between calls, so their bytes are encoded once at
registration; per call only the small header (call id, tool, expiry) is encoded and the
whole is MAC'd with HMAC-SHA256. The key is random per session and travels to workers
only over their private channel (never the environment, never the trace).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass

from failcore_worker import protocol
from failcore_worker.rules import Grants

# Delivery grace: the worker checks expiry when the request arrives, after the parent
# minted it; the parent's own deadline (the timeout) is what bounds the call.
_GRACE_S = 1.0


@dataclass(frozen=True)
class ToolGrants:
    """A tool's grants and limits, encoded once."""

    grants: Grants
    limits: protocol.LimitsWire
    grants_bytes: bytes
    tail: bytes
    grants_wire: dict[str, object]
    grants_sha256: str

    @classmethod
    def build(cls, grants: Grants, limits: protocol.LimitsWire) -> ToolGrants:
        wire = grants.to_wire()
        grants_bytes = protocol.canonical_json(wire)
        tail = b"\n" + grants_bytes + b"\n" + protocol.canonical_json(limits)
        return cls(grants=grants, limits=limits, grants_bytes=grants_bytes, tail=tail,
                   grants_wire=wire, grants_sha256=hashlib.sha256(grants_bytes).hexdigest())


class TokenMinter:
    def __init__(self) -> None:
        self.key = secrets.token_bytes(32)

    def mint(self, call_id: str, tool: str, parts: ToolGrants, ttl_s: float) -> tuple[bytes, str]:
        # Canonical JSON (sorted keys, no spaces) written out by hand: this runs on every
        # call. Integer milliseconds keep the width fixed, so equal calls give equal frames.
        expires_ms = int((time.time() + ttl_s + _GRACE_S) * 1000)
        header = (f'{{"call_id":{json.dumps(call_id)},"expires_ms":{expires_ms},'
                  f'"tool":{json.dumps(tool)}}}').encode()
        token = header + parts.tail
        return token, protocol.sign(self.key, token)
