"""Guard a third-party MCP server: ``failcore mcp guard --policy FILE -- COMMAND ARGS...``.

A stdio MCP server someone else wrote (``npx ...``, ``uvx ...``, a binary) runs confined by
the kernel (an empty network namespace, Landlock limited to its grants plus what it needs
to run, no capabilities, no_new_privs, rlimits, its own process group), and FailCore
serves its tools to the agent: every ``tools/call`` is validated against the server's
input schema, pre-checked and judged by the policy before it is forwarded, every request
and response is a record in the hash-chained trace, and the server's only way out is an
HTTP proxy in the parent that judges each connection on the resolved address.

Modules: ``_guard_policy`` (the policy file), ``_runtime`` (what the program needs to
run, as Landlock rules), ``_launch`` (plan, launcher, handshake; the child side is
``failcore_worker.confined_exec``), ``_proxy`` (egress), ``_gate`` (per-call decision),
``_relay`` (the two MCP sessions and the trace). Needs ``pip install 'failcore[mcp]'``.
"""

from failcore._errors import ConfinementRefused
from failcore.mcp_guard._gate import Decision, Gate
from failcore.mcp_guard._guard_policy import GuardPolicy, ServerRules, ToolRules, load_guard_policy
from failcore.mcp_guard._relay import guard, serve_guarded

__all__ = ["ConfinementRefused", "Decision", "Gate", "GuardPolicy", "ServerRules", "ToolRules",
           "guard", "load_guard_policy", "serve_guarded"]
