"""What the parent accepts in a worker's broker request: every field checked, nothing trusted.

Private to ``failcore._broker``. A request that ends early (a bad field, a refusal, a
resolver error) raises ``Refused`` with the reply to send and, when the worker broke the
protocol (something ``failcore_worker._broker`` never sends), a violation to report. The
bounds are ``failcore_worker.protocol``'s, shared with the worker that builds requests.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping
from typing import Any

from failcore_worker import protocol
from failcore_worker.rules import Verdict


class Refused(Exception):
    """A request ends here with ``reply`` (and, when the worker broke the protocol, a
    ``violation`` to report)."""

    def __init__(self, reply: dict[str, Any], violation: str | None = None) -> None:
        super().__init__(violation or "refused")
        self.reply = reply
        self.violation = violation


def field(body: Mapping[str, Any], name: str, kind: type) -> Any:
    """``body[name]`` if it is a ``kind`` (a bool is not an int here), else a violation."""
    value = body.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise Refused(error(errno.EINVAL, f"bad field {name}"), f"broker request field "
                      f"{name!r} is {type(value).__name__}, not {kind.__name__}")
    return value


def host(body: Mapping[str, Any]) -> str:
    """The request's host: a name or an address no longer than a DNS name, no NUL."""
    value: str = field(body, "host", str)
    if len(value) > protocol.BROKER_MAX_HOST or "\0" in value:
        what = (f"of {len(value)} characters" if len(value) > protocol.BROKER_MAX_HOST
                else "with a NUL byte")
        raise Refused({"gai": socket.EAI_NONAME, "message": "Name or service not known"},
                      f"broker request host {what}")
    return value


def port(body: Mapping[str, Any]) -> int:
    """A connect's port, 0-65535."""
    value: int = field(body, "port", int)
    if not 0 <= value <= 65535:
        raise Refused(error(errno.EINVAL, "bad port"), f"broker.connect port {value}")
    return value


def service(body: Mapping[str, Any]) -> int | str | None:
    """A lookup's port: None, a number 0-65535 or a short ASCII service name."""
    value = body.get("port")
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535:
        return value
    if isinstance(value, str) and 0 < len(value) <= protocol.BROKER_MAX_SERVICE \
            and value.isascii() and "\0" not in value:
        return value
    raise Refused({"gai": socket.EAI_SERVICE, "message": "Servname not supported for ai_socktype"},
                  f"broker.resolve port {value!r}")


def is_inet(text: str) -> bool:
    """An IPv4 or IPv6 address in the form inet_pton reads (an IPv6 zone allowed)."""
    for family in protocol.BROKER_FAMILIES:
        try:
            socket.inet_pton(family, text.split("%", 1)[0])
            return True
        except (OSError, ValueError):
            pass
    return False


def strerror(code: int) -> str:
    try:
        return os.strerror(code)
    except ValueError:
        return f"error {code}"


def error(code: int, what: str) -> dict[str, Any]:
    """A reply the worker raises as ``OSError(code)``, saying what the broker refused."""
    return {"errno": code, "message": f"{strerror(code)} (FailCore broker: {what})"}


def denied(verdict: Verdict, what: str) -> dict[str, Any]:
    """A policy refusal: the worker raises EACCES with this message, naming the rule."""
    return {"denied": True, "rule": verdict.rule, "reason": verdict.reason,
            "message": f"FailCore blocked {what}: {verdict.rule}: {verdict.reason}"}
