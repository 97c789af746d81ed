"""The hash-chained JSON Lines trace: writing, reading and verifying it (SPEC section 7).

Every line is one record ``{"body", "call_id", "kind", "prev", "seq", "t"}`` in canonical
JSON (sorted keys, compact separators, UTF-8, no NaN) followed by ``\\n``. ``prev`` is
the hex SHA-256 of the previous line's bytes (without its newline); the first record's
``prev`` is 64 zeros. ``seq`` counts from 0 without gaps. Editing, removing, inserting or
reordering any line but the last breaks the chain at the next line, which
``verify_trace`` names. The last line has no successor to vouch for it: keep the head
hash ``verify_trace`` reports if you need to pin a finished trace.

Durability: each record is written with one ``write`` call and flushed to the OS at
once, so a killed process leaves a valid prefix (at worst a partial last line, which
readers ignore and ``verify_trace`` reports as a truncated final line, not tampering).
``fsync`` runs on ``close()`` and every ``FSYNC_EVERY_RECORDS`` records or
``FSYNC_EVERY_S`` seconds, whichever comes first, so a power loss costs at most that
much and the hot path stays a few microseconds per record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from failcore._errors import TraceError
from failcore._trace_encoding import (
    ENCODER,
    VOLATILE_BODY_KEYS,
    VOLATILE_FIELDS,
    canonical_line,
    clean_str,
    encode_body,
    strip_volatile,
    to_jsonable,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "GENESIS", "VOLATILE_BODY_KEYS", "VOLATILE_FIELDS", "TraceWriter", "VerifyReport",
    "canonical_line", "read_trace", "strip_volatile", "to_jsonable", "verify_trace",
]

GENESIS = "0" * 64
FSYNC_EVERY_RECORDS = 1024
FSYNC_EVERY_S = 1.0
MAX_REPORTED_ERRORS = 100
_KIND_BYTES: dict[str, bytes] = {}  # kinds are few: cache their encoding
_fsync = getattr(os, "fdatasync", os.fsync)
_os_write = os.write  # module-level so a test can simulate a full disk


# --- reading ---------------------------------------------------------------------------


def _open_for_read(path: str | os.PathLike[str]) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise TraceError(f"{os.fspath(path)}: no such file") from None
    except IsADirectoryError:
        raise TraceError(f"{os.fspath(path)}: is a directory, not a trace file") from None
    except OSError as exc:
        raise TraceError(f"{os.fspath(path)}: cannot read: {exc.strerror or exc}") from None


def _lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes, bool]]:
    """Yield (line number from 1, bytes without newline, complete?) for each line."""
    with _open_for_read(path) as f:
        try:
            for n, raw in enumerate(f, start=1):
                if raw.endswith(b"\n"):
                    yield n, raw[:-1], True
                else:
                    yield n, raw, False
        except OSError as exc:
            raise TraceError(f"{os.fspath(path)}: cannot read: {exc.strerror or exc}") from None


def _decode(raw: bytes) -> dict[str, Any]:
    """Decode one line; ValueError with a short reason when it is not a JSON object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not valid UTF-8") from None
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"not a JSON object (a JSON {type(rec).__name__})")
    return rec


def read_trace(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every complete record of the trace at ``path``, in order.

    A partial final line (a writer killed mid-write) is ignored. Does not check the
    chain or the schema (``verify_trace`` does); raises TraceError when the file cannot
    be read or a complete line is not a JSON object.
    """
    records = []
    for n, raw, complete in _lines(path):
        if not complete:
            break
        try:
            records.append(_decode(raw))
        except ValueError as exc:
            raise TraceError(f"{os.fspath(path)}: line {n}: {exc}") from None
    return records


@dataclasses.dataclass
class VerifyReport:
    """What ``verify_trace`` found. ``ok`` is False when any error was found.

    ``errors`` name the line and what broke (chain, seq, encoding, schema); ``warnings``
    are not tampering (a truncated final line, a session that did not end); ``head`` is
    the SHA-256 of the last complete line, to pin the trace.
    """

    ok: bool
    records: int
    errors: list[str]
    warnings: list[str] = dataclasses.field(default_factory=list)
    head: str = GENESIS


def _check_chain(
    path: str | os.PathLike[str], *, schema: bool
) -> tuple[VerifyReport, list[tuple[int, dict[str, Any]]], int]:
    """Walk the file once; return the report, the decoded records and the byte length
    of the complete lines (where a partial final line starts)."""
    from failcore._trace_schema import validate_record

    errors: list[str] = []
    warnings: list[str] = []
    records: list[tuple[int, dict[str, Any]]] = []
    prev_hash, expected_seq, good_bytes, count = GENESIS, 0, 0, 0
    last_kind: Any = None
    for n, raw, complete in _lines(path):
        if not complete:
            warnings.append(
                f"truncated final line: {len(raw)} bytes without a newline after line {n - 1} "
                "(a writer was interrupted mid-write); ignored"
            )
            break
        count += 1
        good_bytes += len(raw) + 1
        line_hash = hashlib.sha256(raw).hexdigest()
        try:
            rec = _decode(raw)
        except ValueError as exc:
            if count == 1:
                raise TraceError(f"{os.fspath(path)}: not a FailCore trace: line 1 is {exc}") from None
            errors.append(f"line {n}: {exc} (the line was altered)")
            prev_hash, last_kind = line_hash, None
            continue
        if count == 1 and not {"seq", "prev", "kind"} <= rec.keys():
            raise TraceError(
                f"{os.fspath(path)}: not a FailCore trace: line 1 has no seq/prev/kind fields"
            )
        records.append((n, rec))
        last_kind = rec.get("kind")
        try:
            canonical = canonical_line(rec) == raw
        except (ValueError, TypeError):
            canonical = False
        if not canonical:
            errors.append(
                f"line {n}: not in canonical encoding (re-encoding it gives different bytes: "
                "the line was edited)"
            )
        seq = rec.get("seq")
        if type(seq) is not int:
            errors.append(f"line {n}: seq is not an integer")
        elif seq != expected_seq:
            if seq > expected_seq:
                missing = seq - expected_seq
                errors.append(
                    f"line {n}: seq is {seq}, expected {expected_seq} "
                    f"({missing} record{'s' if missing > 1 else ''} missing before it)"
                )
            else:
                errors.append(
                    f"line {n}: seq is {seq}, expected {expected_seq} "
                    "(records reordered or duplicated)"
                )
        if rec.get("prev") != prev_hash:
            if n == 1:
                errors.append("line 1: prev must be 64 zeros for the first record")
            else:
                errors.append(
                    f"line {n}: prev is not the SHA-256 of line {n - 1} (line {n - 1} was altered, "
                    "or lines were removed, inserted or reordered here)"
                )
        if schema:
            try:
                validate_record(rec)
            except TraceError as exc:
                errors.append(f"line {n}: schema: {exc}")
        expected_seq = (seq if type(seq) is int else expected_seq) + 1
        prev_hash = line_hash
    if count == 0:
        raise TraceError(f"{os.fspath(path)}: empty trace: no complete record")
    if last_kind != "session.end":
        warnings.append(
            "no session.end after the last record: the session did not close cleanly "
            "(it crashed, was killed, or is still running)"
        )
    if len(errors) > MAX_REPORTED_ERRORS:
        errors = errors[:MAX_REPORTED_ERRORS] + [
            f"... and {len(errors) - MAX_REPORTED_ERRORS} more errors"
        ]
    report = VerifyReport(not errors, count, errors, warnings, prev_hash)
    return report, records, good_bytes


def verify_trace(path: str | os.PathLike[str]) -> VerifyReport:
    """Check the hash chain, seq continuity, canonical encoding and schema of every line.

    Raises TraceError when the file is not a trace at all (missing, a directory,
    unreadable, empty, or its first line is not a record); everything else is reported
    in the VerifyReport.
    """
    return _check_chain(path, schema=True)[0]


# --- writing ---------------------------------------------------------------------------


class TraceWriter:
    """Appends records to a trace file, thread-safely, one flushed line at a time.

    Opening an existing trace continues its chain (seq and prev from its last line) if
    that chain verifies; a file whose chain is broken is refused with TraceError rather
    than extended, so a tampered prefix is never vouched for by new records. A partial
    final line left by a killed writer is cut off before appending (it never was a
    record). The file is locked (``flock``) while open: a second writer is refused.
    ``t`` is seconds since this writer opened, from ``clock``.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = os.fspath(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._seq = 0
        self._prev = GENESIS
        parent = os.path.dirname(self.path)
        try:
            if parent:
                os.makedirs(parent, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except IsADirectoryError:
            raise TraceError(f"{self.path}: is a directory, not a trace file") from None
        except OSError as exc:
            raise TraceError(f"{self.path}: cannot open for writing: {exc.strerror or exc}") from None
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise TraceError(
                        f"{self.path}: another writer has this trace open; use another path"
                    ) from None
            if os.fstat(fd).st_size > 0:
                self._resume(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = os.fstat(fd).st_size
        self._closed = False
        self._unsynced = 0
        self._t0 = clock()
        self._last_sync = self._t0

    def _resume(self, fd: int) -> None:
        try:
            report, records, good_bytes = _check_chain(self.path, schema=False)
        except TraceError as exc:
            raise TraceError(f"refusing to append: {exc}") from None
        if not report.ok:
            raise TraceError(
                f"{self.path}: refusing to append to a trace whose chain does not verify "
                f"({report.errors[0]}); write to a new file"
            )
        if good_bytes < os.fstat(fd).st_size:
            os.ftruncate(fd, good_bytes)
        self._seq = records[-1][1]["seq"] + 1
        self._prev = report.head

    def record(self, kind: str, call_id: str | None, body: Any, *,
               plain: bool = False) -> dict[str, Any]:
        """Append one record and return it as written (``body`` converted to JSON if needed).

        Never raises for the body's content: values that are not JSON-native are
        converted (see ``to_jsonable``). Raises TraceError if the writer is closed or
        the disk write fails. ``plain=True``: the caller guarantees the body is already
        JSON-native with str keys only (the session's own records), skipping a check.
        """
        body_bytes, body = encode_body(body, plain)
        if call_id is not None:
            call_id = clean_str(call_id if type(call_id) is str else str(to_jsonable(call_id)))
        if type(kind) is not str:
            kind = str(to_jsonable(kind))
        kind_bytes = _KIND_BYTES.get(kind)
        if kind_bytes is None:
            kind = clean_str(kind)
            kind_bytes = ENCODER.encode(kind).encode("utf-8")
            if len(_KIND_BYTES) < 64:
                _KIND_BYTES[kind] = kind_bytes
        head = ENCODER.encode(call_id).encode("utf-8") + b',"kind":' + kind_bytes
        with self._lock:
            if self._closed:
                raise TraceError(f"{self.path}: trace writer is closed")
            now = self._clock()
            t = round(now - self._t0, 6)
            seq, prev = self._seq, self._prev
            # Keys in sorted order: body, call_id, kind, prev, seq, t (== canonical_line).
            line = b"".join((
                b'{"body":', body_bytes, b',"call_id":', head, b',"prev":"', prev.encode("ascii"),
                b'","seq":', str(seq).encode("ascii"), b',"t":', repr(t).encode("ascii"), b"}",
            ))
            self._write(line + b"\n")
            self._unsynced += 1
            if self._unsynced >= FSYNC_EVERY_RECORDS or now - self._last_sync >= FSYNC_EVERY_S:
                self._unsynced, self._last_sync = 0, now
                try:
                    _fsync(self._fd)
                except OSError as exc:
                    raise TraceError(f"{self.path}: fsync failed: {exc.strerror or exc}") from None
            self._prev = hashlib.sha256(line).hexdigest()
            self._seq = seq + 1
        return {"seq": seq, "t": t, "call_id": call_id, "kind": kind, "body": body, "prev": prev}

    def _write(self, data: bytes) -> None:
        """Write one whole line, or none of it: a failed write (disk full) is cut back off
        so the chain stays intact and the next record can still be appended."""
        view = memoryview(data)
        try:
            while view:
                view = view[_os_write(self._fd, view):]
        except OSError as exc:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            raise TraceError(f"{self.path}: write failed: {exc.strerror or exc}") from None
        self._size += len(data)

    @property
    def seq(self) -> int:
        """The seq the next record will get."""
        return self._seq

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """fsync and close; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                _fsync(self._fd)
            except OSError:
                pass
            os.close(self._fd)  # closing the fd releases the flock

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
