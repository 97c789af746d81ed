"""The schema of trace records: one pydantic model per ``kind``, discriminated on ``kind``.

A record is ``{"seq", "t", "call_id", "kind", "body", "prev"}`` (SPEC section 7). The
bodies below are exactly what the session writes; unknown keys are refused so that a
typo in the writer, or a field slipped into a trace by hand, fails ``failcore verify``
instead of going unnoticed. The few places that accept more are said so: ``ipc.send`` /
``ipc.recv`` bodies (the message summary may grow), ``token.mint`` grants (the shape of
``failcore_worker.rules.Grants.to_wire()`` belongs to that module) and ``call.start`` args /
``call.end`` result (user data).

Validation is strict (no ``"5"`` for an int, no ``true`` for a number): a trace is
machine-written, so anything a lax parse would have to coerce is a sign of tampering.

``python -m failcore._trace_schema > failcore/trace_schema.json`` regenerates the
shipped JSON Schema; a test asserts the shipped file equals the generated one.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, create_model
from pydantic import ValidationError as PydanticValidationError

from failcore._errors import TraceError
from failcore_worker.protocol import GuardEvent

FORMAT_VERSION = 1

Action = Literal["allow", "warn", "block"]
Isolation = Literal["tool", "call"]
CallStatus = Literal[
    "ok", "blocked", "invalid_input", "invalid_output", "timeout", "crashed", "resource",
    "failed", "replayed", "cancelled", "budget",
]
ScanAction = Literal["off", "warn", "redact", "block"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


# --- pieces shared by several bodies -------------------------------------------------


class LimitsBody(_Strict):
    """``failcore._metadata.Limits.to_wire()``."""

    timeout_s: float
    memory_mb: int | float  # Limits accepts floats for these too
    cpu_s: int | None
    file_size_mb: int | float
    open_files: int | float
    output_bytes: int | float
    processes: int | None = None


class ErrorItem(_Strict):
    """One validation problem: where (``loc``, dotted) and what."""

    loc: str
    msg: str
    type: str | None = None


class PrecheckFinding(_Strict):
    arg: str
    action: Action
    rule: str
    reason: str


class RefusedCapability(_Strict):
    """A declared capability the session refused ("block") or narrowed ("warn")."""

    capability: str
    rule: str
    reason: str
    action: Literal["block", "warn"] = "block"


class CallError(_Strict):
    """The error a failed call raised. Optional keys carry SecurityError / ToolFailed detail."""

    type: str
    message: str
    traceback: str | None = None
    rule: str | None = None
    target: str | None = None
    layer: str | None = None
    remote_type: str | None = None
    budget: str | None = None  # BudgetExceeded: which budget ("session.calls")


# --- bodies, one per kind ------------------------------------------------------------


class ConfinementTool(_Strict):
    name: str
    network: Literal["none", "host"]
    notes: list[str]


class ConfinementBody(_Strict):
    """``failcore._confinement.Confinement.to_wire()``: what kernel confinement the session's
    workers run under, per layer, and why not."""

    mode: Literal["auto", "require", "off"]
    landlock_abi: int = Field(ge=0)
    landlock_rights: list[str]
    layers: dict[str, ConfinementLayer]
    tools: list[ConfinementTool]


class SessionStartBody(_Strict):
    failcore_version: str
    policy: str | None
    format: Literal[1]
    confinement: ConfinementBody | None = None


class ToolRegisterBody(_Strict):
    tool: str
    risk_level: Literal["LOW", "MEDIUM", "HIGH", "CRITICAL"]
    side_effects: list[Literal["NONE", "FILESYSTEM", "NETWORK", "PROCESS", "ENVIRONMENT"]]
    default_policy: Literal["BLOCK", "WARN", "ALLOW"]
    capabilities: list[str]
    limits: LimitsBody
    isolation: Isolation
    network: Literal["none", "host"] | None = None
    kernel_notes: list[str] | None = None  # what its Landlock ruleset leaves out, and why
    # Side effects' defaults (SPEC section 3): "net:connect:public" (also in capabilities)
    # for NETWORK with no net capability, "fs:scratch" for FILESYSTEM with no fs one.
    defaults: list[str] | None = None


class CallStartBody(_Strict):
    tool: str
    args: dict[str, Any]
    context: dict[str, str] | None = None  # failcore.call_context labels (an MCP request id)


class ValidateBody(_Strict):
    ok: bool
    errors: list[ErrorItem]


class PrecheckBody(_Strict):
    findings: list[PrecheckFinding]


class GrantsBody(_Strict):
    """What the session policy granted of a tool's capabilities (at registration: ``tool``);
    ``grants`` is exactly what its tokens carry, ``grants_sha256`` its canonical digest."""

    granted: list[str]
    refused: list[RefusedCapability]
    tool: str | None = None
    grants: dict[str, Any] | None = None
    grants_sha256: str | None = None


class TokenMintBody(_Strict):
    """A minted token without its key or MAC. ``grants_sha256`` names the grants recorded
    in full (``grants``) by the tool's ``policy.grants`` record; ``grants`` inline when the
    token's grants differ from the tool's."""

    grants: dict[str, Any] | None = None
    grants_sha256: str | None = None
    limits: LimitsBody
    ttl_s: float


class IpcBody(_Open):
    """A message that crossed the pipe: its type and size; more summary keys allowed."""

    type: str
    bytes: int = Field(ge=0)


def _from_typeddict(name: str, source: type, doc: str) -> type[_Strict]:
    """A strict body model with exactly the keys of a protocol TypedDict: the writer's
    type is the reader's, so mypy and the trace check the same shape."""
    hints = get_type_hints(source)
    fields: dict[str, Any] = {
        key: (hint, ...) if key in source.__required_keys__ else (hint | None, None)  # type: ignore[attr-defined]
        for key, hint in hints.items()}
    model: type[_Strict] = create_model(name, __base__=_Strict, __doc__=doc, **fields)
    return model


if TYPE_CHECKING:
    GuardBody = _Strict
else:
    GuardBody = _from_typeddict(
        "GuardBody", GuardEvent,
        "A guarded operation and its verdict (``failcore_worker.protocol.GuardEvent``).")


class CallEndBody(_Strict):
    tool: str
    status: CallStatus
    result: Any
    error: CallError | None
    duration_ms: float


class WorkerSpawnBody(_Strict):
    worker: str
    isolation: Isolation
    pid: int


class WorkerKillBody(_Strict):
    worker: str
    reason: str
    pid: int | None


class ScanFinding(_Strict):
    """One scanner finding: its kind, where (an argument or result path), the action taken
    and an HMAC of the matched text under the session's salt; never the text itself."""

    kind: str
    where: str
    action: ScanAction
    digest: str | None = Field(pattern=r"^[0-9a-f]{16}$")
    encoding: Literal["split", "base64"] | None = None


class ScanBody(_Strict):
    direction: Literal["arguments", "result"]
    findings: list[ScanFinding]


class BudgetCounter(_Strict):
    """One counter of one scope ("session" or "tool:NAME"): its use and its limit."""

    scope: str
    budget: str  # calls | calls_per_minute | cpu_s | wall_s | sum:FIELD.PATH
    used: int | float = Field(ge=0)
    limit: int | float = Field(gt=0)


class BudgetCheckBody(_Strict):
    """Budgets before a call: ``ok`` false when one was spent (``exceeded`` names it)."""

    ok: bool
    counters: list[BudgetCounter]
    exceeded: str | None


class BudgetChargeBody(_Strict):
    """What a dispatched call used, and the counters after charging it."""

    cpu_s: float = Field(ge=0)
    wall_s: float = Field(ge=0)
    sums: dict[str, float]
    counters: list[BudgetCounter]


class ApprovalBody(_Strict):
    """The approver's decision on a call, who made it, why it was asked, how long it took."""

    decision: Literal["approved", "denied", "timeout", "error"]
    by: str | None
    reason: str | None
    required_by: list[str]
    waited_ms: float = Field(ge=0)


class SessionEndBody(_Strict):
    calls: int = Field(ge=0)


class ConfinementLayer(_Strict):
    in_force: bool
    reason: str


class LandlockRule(_Strict):
    path: str
    rights: list[str]
    why: list[str]


class GuardLimitsBody(_Strict):
    """A guarded MCP server's limits (``[server]`` of the guard policy)."""

    timeout_s: float
    memory_mb: int
    processes: int
    open_files: int
    file_size_mb: int


class McpServerStartBody(_Strict):
    """``failcore mcp guard`` started a third-party server confined: the command, what the
    kernel enforces (per layer, and why not), every Landlock rule and why it is there."""

    command: list[str]
    pid: int
    confinement: dict[str, ConfinementLayer]
    landlock_abi: int
    landlock: list[LandlockRule]
    notes: list[str]
    proxy: bool
    limits: GuardLimitsBody
    server: dict[str, str] | None


class McpTool(_Strict):
    name: str
    served: bool
    reason: str
    input_schema_sha256: str


class McpToolsBody(_Strict):
    """The server's tool listing and which tools the guard serves."""

    tools: list[McpTool]


class McpRequestBody(_Strict):
    """A request from the agent (``tools/call`` carries the tool and its arguments)."""

    method: str
    request_id: str | int | None
    tool: str | None = None
    arguments: dict[str, Any] | None = None


class McpRefuseBody(_Strict):
    """The guard answered a ``tools/call`` itself, without forwarding it."""

    tool: str
    stage: Literal["unknown", "disabled", "validate", "precheck"]
    rule: str
    reason: str


class McpResponseBody(_Strict):
    """What the agent got back: the server's result (text truncated past a bound, with the
    digest of the whole), or the guard's refusal, or a protocol error."""

    method: str
    request_id: str | int | None
    tool: str | None = None
    is_error: bool
    forwarded: bool
    content: Any
    truncated: bool
    result_sha256: str
    duration_ms: float
    error: str | None = None


class McpServerStopBody(_Strict):
    reason: str
    calls: int = Field(ge=0)
    refused: int = Field(ge=0)
    proxy_connections: int = Field(ge=0)


# --- records ---------------------------------------------------------------------------


class _Record(_Strict):
    seq: int = Field(ge=0)
    t: float = Field(ge=0)
    call_id: str | None = Field(min_length=1)
    prev: str = Field(pattern=r"^[0-9a-f]{64}$")


class SessionStart(_Record):
    kind: Literal["session.start"]
    body: SessionStartBody


class ToolRegister(_Record):
    kind: Literal["tool.register"]
    body: ToolRegisterBody


class CallStart(_Record):
    kind: Literal["call.start"]
    body: CallStartBody


class ValidateInput(_Record):
    kind: Literal["validate.input"]
    body: ValidateBody


class PolicyPrecheck(_Record):
    kind: Literal["policy.precheck"]
    body: PrecheckBody


class PolicyGrants(_Record):
    kind: Literal["policy.grants"]
    body: GrantsBody


class TokenMint(_Record):
    kind: Literal["token.mint"]
    body: TokenMintBody


class IpcSend(_Record):
    kind: Literal["ipc.send"]
    body: IpcBody


class IpcRecv(_Record):
    kind: Literal["ipc.recv"]
    body: IpcBody


class Guard(_Record):
    kind: Literal["guard"]
    body: GuardBody


class ValidateOutput(_Record):
    kind: Literal["validate.output"]
    body: ValidateBody


class CallEnd(_Record):
    kind: Literal["call.end"]
    body: CallEndBody


class WorkerSpawn(_Record):
    kind: Literal["worker.spawn"]
    body: WorkerSpawnBody


class WorkerKill(_Record):
    kind: Literal["worker.kill"]
    body: WorkerKillBody


class Scan(_Record):
    kind: Literal["scan"]
    body: ScanBody


class BudgetCheck(_Record):
    kind: Literal["budget.check"]
    body: BudgetCheckBody


class BudgetCharge(_Record):
    kind: Literal["budget.charge"]
    body: BudgetChargeBody


class Approval(_Record):
    kind: Literal["approval"]
    body: ApprovalBody


class SessionEnd(_Record):
    kind: Literal["session.end"]
    body: SessionEndBody


class McpServerStart(_Record):
    kind: Literal["mcp.server.start"]
    body: McpServerStartBody


class McpTools(_Record):
    kind: Literal["mcp.tools"]
    body: McpToolsBody


class McpRequest(_Record):
    kind: Literal["mcp.request"]
    body: McpRequestBody


class McpRefuse(_Record):
    kind: Literal["mcp.refuse"]
    body: McpRefuseBody


class McpResponse(_Record):
    kind: Literal["mcp.response"]
    body: McpResponseBody


class McpServerStop(_Record):
    kind: Literal["mcp.server.stop"]
    body: McpServerStopBody


_MODELS: tuple[type[_Record], ...] = (
    SessionStart, ToolRegister, CallStart, ValidateInput, PolicyPrecheck, PolicyGrants,
    TokenMint, IpcSend, IpcRecv, Guard, ValidateOutput, CallEnd, WorkerSpawn, WorkerKill,
    Scan, BudgetCheck, BudgetCharge, Approval, SessionEnd,
    McpServerStart, McpTools, McpRequest, McpRefuse, McpResponse, McpServerStop,
)

KINDS: frozenset[str] = frozenset(
    get_args(m.model_fields["kind"].annotation)[0] for m in _MODELS
)

TraceRecord = Annotated[
    SessionStart | ToolRegister | CallStart | ValidateInput | PolicyPrecheck | PolicyGrants
    | TokenMint | IpcSend | IpcRecv | Guard | ValidateOutput | CallEnd | WorkerSpawn
    | WorkerKill | Scan | BudgetCheck | BudgetCharge | Approval
    | SessionEnd | McpServerStart | McpTools | McpRequest | McpRefuse
    | McpResponse | McpServerStop,
    Field(discriminator="kind"),
]

_ADAPTER: TypeAdapter[Any] = TypeAdapter(TraceRecord)


def _describe(exc: PydanticValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def validate_record(rec: Mapping[str, Any]) -> _Record:
    """Validate one decoded record; return its model or raise TraceError saying what is wrong."""
    if not isinstance(rec, Mapping):
        raise TraceError(f"a record must be a JSON object, got {type(rec).__name__}")
    kind = rec.get("kind")
    if kind not in KINDS:
        raise TraceError(f"unknown kind {kind!r} (known kinds: {', '.join(sorted(KINDS))})")
    try:
        model: _Record = _ADAPTER.validate_python(dict(rec))
    except PydanticValidationError as exc:
        # The first loc element is the discriminator tag; drop it, the kind is named once.
        raise TraceError(f"{kind}: {_describe(exc).replace(f'{kind}.', '')}") from None
    return model


def json_schema() -> dict[str, Any]:
    """The JSON Schema of one trace line (draft 2020-12), as shipped in trace_schema.json."""
    schema: dict[str, Any] = _ADAPTER.json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "FailCore trace record"
    schema["description"] = (
        f"One line of a FailCore trace (format {FORMAT_VERSION}): canonical JSON, sorted keys, "
        "hash-chained through prev. Generated by `python -m failcore._trace_schema`."
    )
    return schema


def json_schema_text() -> str:
    """The exact text of the shipped trace_schema.json."""
    return json.dumps(json_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(json_schema_text())
