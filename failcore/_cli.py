"""The ``failcore`` command line: inspect, verify, re-judge and report on traces; serve
a session's tools over MCP; guard a third-party MCP server.

Exit codes (every subcommand):

  0  success: the trace verifies / nothing would be blocked / the policy file is fine
  1  the check failed: ``verify`` found a broken chain, seq, encoding or schema;
     ``replay --policy`` found something the policy would block; ``policy check``
     found problems in the file; ``policy explain``'s verdict is block
  2  usage error, or an input file that is missing, unreadable, empty or not a
     trace / policy file at all

Bad input never prints a traceback: one line on stderr says what is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, TextIO

from failcore._errors import FailCoreError, TraceError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

EXPLAIN_EPILOG = """example:
  failcore policy explain policies/strict.toml --tool http_get \\
      --cap net:connect:api.github.com:443 --arg url=http://169.254.169.254/ --json

"""

EPILOG = """exit codes:
  0  success (trace verifies, nothing would be blocked, policy file fine)
  1  the check failed (verify: chain/seq/encoding/schema broken; replay: the policy
     would block something; policy check: problems found; policy explain: the call
     would be blocked)
  2  usage error, or a missing, unreadable, empty or malformed input file
"""


class _UsageError(Exception):
    """Bad input: reported on stderr with exit code 2."""


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("failcore")
    except PackageNotFoundError:
        try:
            import failcore

            return str(getattr(failcore, "__version__", "unknown"))
        except Exception:
            return "unknown"


def _load(path: str) -> list[dict[str, Any]]:
    from failcore._trace import read_trace

    try:
        records = read_trace(path)
    except TraceError as exc:
        raise _UsageError(str(exc)) from None
    if not records:
        raise _UsageError(f"{path}: empty trace: no complete record")
    first = records[0]
    if not {"seq", "kind", "prev"} <= first.keys():
        raise _UsageError(f"{path}: not a FailCore trace: line 1 has no seq/kind/prev fields")
    return records


def _verify(path: str) -> Any:
    from failcore._trace import verify_trace

    try:
        return verify_trace(path)
    except TraceError as exc:
        raise _UsageError(str(exc)) from None


def _dump(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=repr) + "\n")


# --- subcommands -------------------------------------------------------------------------


def _cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    from failcore._report import summarize

    records = _load(args.trace)
    report = _verify(args.trace)
    summary = summarize(records)
    counts = summary.counts()
    if args.json:
        data = summary.to_json()
        data["trace"] = args.trace
        data["verify"] = {"ok": report.ok, "errors": report.errors, "warnings": report.warnings}
        _dump(data, out)
        return EXIT_OK
    verdict = "ok" if report.ok else f"FAILED ({len(report.errors)} problems; run failcore verify)"
    out.write(f"trace {args.trace}: {counts['records']} records, verify {verdict}\n")
    policies = ", ".join(sorted({str(p) for p in summary.policies})) or "none recorded"
    out.write(_one_line(f"failcore {summary.failcore_version or '?'}, policy {policies}", 400) + "\n")
    for t in summary.tools:
        caps = ", ".join(t.capabilities) or "no capabilities"
        out.write(_one_line(f"tool {t.tool}: {t.risk_level}, default {t.default_policy}, "
                            f"isolation {t.isolation}, {caps}", 400) + "\n")
    width = max((len(c.tool) for c in summary.calls), default=4)
    for c in summary.calls:
        duration = "" if c.duration_ms is None else f"{c.duration_ms:9.1f} ms"
        out.write(f"{_one_line(c.call_id)}  {_one_line(c.tool):<{width}}  "
                  f"{_one_line(c.status):<14} {duration}\n")
        if c.error and c.status != "ok":
            out.write(f"    error {_one_line(c.error.get('type'))}: {_one_line(c.error.get('message'))}\n")
        for a in c.attempts:
            out.write(f"    {_one_line(a.action):<5} [{a.layer}] {_one_line(a.what)}  rule: {_one_line(a.rule)}\n")
        if c.approval is not None and c.approval.get("decision") == "approved":
            by = f" by {_one_line(c.approval['by'])}" if c.approval.get("by") else ""
            asked = _one_line(", ".join(str(r) for r in c.approval.get("required_by") or []))
            out.write(f"    approved [approval]{by} ({asked})\n")
    status = _one_line(", ".join(f"{n} {s}" for s, n in counts["status"].items()) or "none", 400)
    proxy = f", {counts['blocked_proxy']} at the guard's proxy" if counts["blocked_proxy"] else ""
    out.write(f"{counts['calls']} calls ({status}); {counts['blocked']} blocked attempts "
              f"({counts['blocked_precheck']} before dispatch, {counts['blocked_worker']} in the "
              f"worker{proxy}); {counts['warnings']} warnings\n")
    guard = summary.guardrails()
    if any(guard.values()):
        out.write(f"guardrails: {guard['scan_findings']} scan findings ({guard['scan_blocked']} "
                  f"blocked, {guard['scan_redacted']} redacted); {guard['approvals']} approvals "
                  f"({guard['approvals_refused']} refused); {guard['budget_stops']} budget stops\n")
    for w in report.warnings:
        out.write(f"warning: {_one_line(w, 1000)}\n")
    return EXIT_OK


def _one_line(value: Any, limit: int = 160) -> str:
    """One printable line: trace strings are attacker-controlled, so control characters
    (terminal escape sequences) are shown escaped instead of reaching the terminal."""
    text = " ".join(str(value).split())
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    report = _verify(args.trace)
    if args.json:
        _dump({"trace": args.trace, "ok": report.ok, "records": report.records,
               "errors": report.errors, "warnings": report.warnings, "head": report.head}, out)
    else:
        for e in report.errors:
            out.write(f"error: {_one_line(e, 1000)}\n")
        for w in report.warnings:
            out.write(f"warning: {_one_line(w, 1000)}\n")
        if report.ok:
            out.write(f"OK: {args.trace}: {report.records} records, chain and schema valid; "
                      f"head sha256 {report.head}\n")
        else:
            out.write(f"FAILED: {args.trace}: {len(report.errors)} problem(s) in "
                      f"{report.records} records\n")
    return EXIT_OK if report.ok else EXIT_FAILED


def _load_policy(path: str) -> Any:
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "no such file"
        raise _UsageError(f"{path}: {what}")
    try:
        from failcore._policy import load_policy
    except ImportError as exc:
        raise _UsageError(f"policy files are not supported by this build: {exc}") from None
    try:
        return load_policy(path)
    except (FailCoreError, OSError, UnicodeDecodeError) as exc:
        raise _UsageError(f"{path}: {exc}") from None


def _cmd_replay(args: argparse.Namespace, out: TextIO) -> int:
    from failcore._rejudge import rejudge
    from failcore._report import summarize

    records = _load(args.trace)
    if args.policy is None:
        # Nothing to re-judge against: list the decisions the recorded run made.
        attempts = summarize(records).attempts
        if args.json:
            _dump({"trace": args.trace, "policy": None,
                   "recorded": [vars(a) for a in attempts]}, out)
            return EXIT_OK
        for a in attempts:
            out.write(f"{_one_line(a.call_id)}  {_one_line(a.tool)}  {a.layer:<8} {_one_line(a.action):<5} "
                      f"{_one_line(a.what)}  rule: {_one_line(a.rule)}\n")
        out.write(f"{len(attempts)} recorded decisions that were not 'allow'; pass --policy FILE "
                  "to re-judge the trace under another policy\n")
        return EXIT_OK
    policy = _load_policy(args.policy)
    try:
        findings = rejudge(records, policy)
    except FailCoreError as exc:
        raise _UsageError(f"cannot re-judge {args.trace}: {exc}") from None
    blocked = [f for f in findings if f.verdict.action == "block"]
    newly_blocked = [f for f in findings if f.newly_blocked]
    newly_allowed = [f for f in findings if f.newly_allowed]
    name = getattr(policy, "name", args.policy)
    from failcore._grant_warnings import trace_grant_warnings

    warnings = trace_grant_warnings(records, policy)
    if args.json:
        _dump({"trace": args.trace, "policy": str(name), "policy_file": args.policy,
               "would_block": len(blocked), "newly_blocked": len(newly_blocked),
               "newly_allowed": len(newly_allowed), "warnings": warnings,
               "findings": [f.to_json() for f in findings]}, out)
    else:
        out.write(f"re-judging {args.trace} under policy {_one_line(name)} ({args.policy})\n")
        for w in warnings:
            out.write(f"warning: {_one_line(w, 1000)}\n")
        tool_w = max((len(_one_line(f.tool)) for f in findings), default=4)
        for f in findings:
            tag = "NEW" if f.newly_blocked else ("ALLOWED NOW" if f.newly_allowed else "")
            out.write(f"{_one_line(f.call_id)}  {_one_line(f.tool):<{tool_w}}  {f.layer:<8}  "
                      f"{f.verdict.action:<5} {'(was ' + _one_line(f.original) + ')':<12} {tag:<11}  "
                      f"{_one_line(f.what)}  rule: {_one_line(f.verdict.rule)}\n")
        out.write(f"would block {len(blocked)} ({len(newly_blocked)} not blocked originally); "
                  f"{len(newly_allowed)} originally blocked would be allowed\n")
    return EXIT_FAILED if blocked else EXIT_OK


def _cmd_report(args: argparse.Namespace, out: TextIO) -> int:
    from failcore._report import render_report

    records = _load(args.trace)
    report = _verify(args.trace)
    text = render_report(records, trace_path=args.trace, verify=report)
    try:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise _UsageError(f"{args.output}: cannot write: {exc.strerror or exc}") from None
    out.write(f"wrote {args.output} ({len(records)} records, verify "
              f"{'ok' if report.ok else 'FAILED'})\n")
    return EXIT_OK


def _cmd_mcp_serve(args: argparse.Namespace, out: TextIO) -> int:
    from failcore import mcp

    try:
        if args.transport == "http":
            mcp.check_host(args.host, args.allow_remote)
        session = mcp.load_session(args.session)
    except FailCoreError as exc:  # MissingExtra included
        raise _UsageError(str(exc)) from None
    try:
        mcp.serve(session, transport=args.transport, host=args.host, port=args.port,
                  allow_remote=args.allow_remote)
    except FailCoreError as exc:
        raise _UsageError(str(exc)) from None
    except OSError as exc:  # the port is taken, the address is not ours
        raise _UsageError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    finally:
        session.close()
    return EXIT_OK


def _cmd_mcp_guard(args: argparse.Namespace, out: TextIO) -> int:
    command = list(args.server_command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise _UsageError("no server command: failcore mcp guard --policy FILE -- COMMAND ARGS...")
    try:
        from failcore import mcp_guard

        policy = mcp_guard.load_guard_policy(args.policy) if args.policy else mcp_guard.GuardPolicy()
        policy = policy.with_capabilities(args.cap or [])
    except (FailCoreError, ValueError) as exc:  # PolicyError, CapabilityError, MissingExtra
        raise _UsageError(str(exc)) from None
    try:
        why = mcp_guard.guard(command, policy, trace=args.trace)
    except FileNotFoundError as exc:
        raise _UsageError(str(exc)) from None
    except mcp_guard.ConfinementRefused as exc:
        print(f"failcore mcp guard: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except TraceError as exc:
        raise _UsageError(str(exc)) from None
    if why.startswith("watchdog"):
        print(f"failcore mcp guard: stopped the server: {why}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _cmd_policy_check(args: argparse.Namespace, out: TextIO) -> int:
    path = args.file
    if not os.path.isfile(path):
        what = "is a directory" if os.path.isdir(path) else "no such file"
        raise _UsageError(f"{path}: {what}")
    try:
        from failcore._policy import check_policy_file
    except ImportError as exc:
        raise _UsageError(f"policy files are not supported by this build: {exc}") from None
    try:
        problems = check_policy_file(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise _UsageError(f"{path}: cannot read: {exc}") from None
    for p in problems:
        out.write(f"problem: {_one_line(p, 1000)}\n")
    if problems:
        out.write(f"FAILED: {path}: {len(problems)} problem(s)\n")
        return EXIT_FAILED
    warnings = _policy_warnings(path)
    for w in warnings:
        out.write(f"warning: {_one_line(w, 1000)}\n")
    out.write(f"OK: {path}" + (f" ({len(warnings)} warning(s))" if warnings else "") + "\n")
    return EXIT_OK


def _parse_arg(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise _UsageError(f"--arg {text!r}: expected KEY=VALUE, e.g. --arg url=https://example.com")
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def _cmd_policy_explain(args: argparse.Namespace, out: TextIO) -> int:
    policy = _load_policy(args.file)
    call_args = dict(_parse_arg(a) for a in args.arg or [])
    approver = {"yes": True, "no": False, None: None}[args.approver]
    try:
        explanation = policy.explain(
            args.tool, call_args, args.cap or [], risk_level=args.risk,
            default_policy=args.default_policy, secret=args.secret or [], approver=approver)
    except (FailCoreError, ValueError) as exc:
        raise _UsageError(str(exc)) from None
    if args.json:
        _dump(explanation.to_json(), out)
    else:
        for line in explanation.render().splitlines():
            indent = line[: len(line) - len(line.lstrip(" "))]
            out.write(indent + _one_line(line, 2000) + "\n")
    return EXIT_FAILED if explanation.verdict == "block" else EXIT_OK


def _policy_warnings(path: str) -> list[str]:
    """Things worth a second look in a policy file that loads (they do not fail it)."""
    from failcore._grant_warnings import policy_warnings
    from failcore._policy import load_policy

    try:
        return policy_warnings(load_policy(path), path)
    except (FailCoreError, OSError, UnicodeDecodeError):
        return []


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="failcore", formatter_class=fmt, epilog=EPILOG,
        description=textwrap.fill("FailCore: an execution-time safety runtime for the tools AI agents call. "
        "These commands inspect the hash-chained JSONL traces a Session writes: show a "
        "timeline, verify the chain and schema, re-judge a trace under another policy, "
        "render an HTML audit report, check policy files, and serve a session's tools over "
        "MCP.", 88),
    )
    parser.add_argument("--version", action="version", version=f"failcore {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=textwrap.fill(description, 88),
                              epilog=EPILOG, formatter_class=fmt)

    p = add("show", "print a readable timeline of a trace",
            "Print one line per call (tool, status, duration) with the attempts a policy "
            "blocked or warned about listed under it, then the totals. The trace is verified "
            "too and its status printed, but a failed verification does not change the exit "
            "code (use 'failcore verify' for that). --json prints the same summary as JSON.")
    p.add_argument("trace", metavar="TRACE", help="the trace file (JSONL)")
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=_cmd_show)

    p = add("verify", "check a trace's hash chain, sequence and schema",
            "Check that every line of TRACE is canonical JSON matching the record schema, "
            "that seq counts up without gaps and that each line's prev is the SHA-256 of the "
            "line before, so that editing, removing, inserting or reordering lines is "
            "detected. A partial last line left by a killed writer is a warning, not a failure. "
            "Prints the head hash (SHA-256 of the last line) for pinning a finished trace.")
    p.add_argument("trace", metavar="TRACE", help="the trace file (JSONL)")
    p.add_argument("--json", action="store_true", help="machine-readable result")
    p.set_defaults(func=_cmd_verify)

    p = add("replay", "re-judge a trace under another policy",
            "Recompute the recorded decisions under the policy in FILE without running "
            "anything: every argument pre-check and every operation the workers reported. "
            "Lists everything the policy would block (marking what the original run let "
            "through) and what the original run blocked that the policy would allow. Exit "
            "code 1 when the policy would block anything. Warns about recorded grants that "
            "contain ranges net_safe blocks (e.g. net:connect:0.0.0.0/0, which under net_safe "
            "reaches only its public part). Without --policy, lists the decisions the "
            "recorded run made.")
    p.add_argument("trace", metavar="TRACE", help="the trace file (JSONL)")
    p.add_argument("--policy", metavar="FILE", help="policy file (TOML) to re-judge under")
    p.add_argument("--json", action="store_true", help="machine-readable findings")
    p.set_defaults(func=_cmd_replay)

    p = add("report", "write a self-contained HTML audit report",
            "Render TRACE as one HTML file with inline styles and no scripts or external "
            "resources: verification status, policy, counts, every call with its status, "
            "duration and grants, every blocked attempt and warning with the rule that "
            "decided, and the registered tools with their capabilities and limits.")
    p.add_argument("trace", metavar="TRACE", help="the trace file (JSONL)")
    p.add_argument("-o", "--output", metavar="REPORT.html", required=True,
                   help="where to write the report")
    p.set_defaults(func=_cmd_report)

    p = add("policy", "work with policy files",
            "Commands for session policy files (TOML): the ones shipped in policies/ and the "
            "copies you edit. 'failcore policy check FILE' reports every problem in a file "
            "before a Session or 'failcore replay --policy' loads it.")
    psub = p.add_subparsers(dest="policy_command", metavar="COMMAND")
    pc = psub.add_parser(
        "check", help="check a policy file for problems", formatter_class=fmt, epilog=EPILOG,
        description=textwrap.fill("Parse the policy file FILE (and the files it includes) and report every "
        "problem: unknown keys, wrong types, capability strings that do not parse, roots that "
        "cannot compose. Exit code 1 when problems are found. Also warns (exit code 0) about "
        "allow entries that contain ranges net_safe blocks, such as net:connect:0.0.0.0/0: "
        "under net_safe such a grant reaches only its public part.", 88))
    pc.add_argument("file", metavar="FILE", help="the policy file (TOML)")
    pc.set_defaults(func=_cmd_policy_check)
    pe = psub.add_parser(
        "explain", help="say what a policy would do to one call, without running it",
        formatter_class=fmt, epilog=EXPLAIN_EPILOG + EPILOG,
        description=textwrap.fill(
            "For a prospective call of tool NAME with the given arguments, list every rule "
            "of the policy in FILE that would apply, layer by layer (registration, "
            "capabilities, argument pre-check, the worker's rules, secret/PII scan, budgets, "
            "approval), and the verdict. Nothing runs: no worker, no name lookup, no tool "
            "code. The tool's capabilities, risk level and default policy are given with "
            "--cap, --risk and --default-policy, since there is no session to read them "
            "from. Exit code 1 when the verdict is block.", 88))
    pe.add_argument("file", metavar="FILE", help="the policy file (TOML)")
    pe.add_argument("--tool", required=True, metavar="NAME", help="the tool's name")
    pe.add_argument("--arg", action="append", metavar="KEY=VALUE",
                    help="an argument of the call; VALUE is read as JSON when it parses "
                         "(5, true, [1,2], {\"a\": 1}), else as a string (repeatable)")
    pe.add_argument("--cap", action="append", metavar="CAP",
                    help="a capability the tool declares, e.g. net:connect:api.github.com:443 "
                         "(repeatable)")
    pe.add_argument("--risk", default="LOW", choices=("LOW", "MEDIUM", "HIGH", "CRITICAL"),
                    type=str.upper, help="the tool's risk level (default LOW)")
    pe.add_argument("--default-policy", default="BLOCK", choices=("BLOCK", "WARN", "ALLOW"),
                    type=str.upper, help="the tool's default policy (default BLOCK)")
    pe.add_argument("--secret", action="append", metavar="ARG",
                    help="an argument declared secret: not scanned, never shown (repeatable)")
    pe.add_argument("--approver", choices=("yes", "no"),
                    help="whether the session has an approve callback (default: not known)")
    pe.add_argument("--json", action="store_true", help="machine-readable explanation")
    pe.set_defaults(func=_cmd_policy_explain)
    p.set_defaults(func=None, subparser=p)

    p = add("mcp", "serve a session's tools over MCP",
            "Model Context Protocol commands (needs pip install 'failcore[mcp]'). 'failcore mcp "
            "serve MODULE:SESSION' serves the tools of a Session defined in your code.")
    msub = p.add_subparsers(dest="mcp_command", metavar="COMMAND")
    ms = msub.add_parser(
        "serve", help="serve a session's tools over MCP", formatter_class=fmt, epilog=EPILOG,
        description=textwrap.fill(
            "Import MODULE (the current directory is searched first) and serve the tools of "
            "its Session SESSION (or of the Session a function of that name returns) over "
            "stdio or streamable HTTP. Every tools/call runs through the session: validated, "
            "pre-checked, in a locked-down worker, traced with the MCP request id. A refused "
            "call is a tool result with isError and the rule in its text. HTTP binds to "
            "loopback only unless --allow-remote. Exit code 0 when the client disconnects "
            "(stdio) or the server is stopped (HTTP).", 88))
    ms.add_argument("session", metavar="MODULE:SESSION", help="e.g. myapp.tools:session")
    ms.add_argument("--transport", choices=("stdio", "http"), default="stdio",
                    help="stdio (default: an MCP host starts this command) or streamable HTTP")
    ms.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    ms.add_argument("--port", type=int, default=8000,
                    help="HTTP port (default 8000; 0 picks a free one, printed on stderr)")
    ms.add_argument("--allow-remote", action="store_true",
                    help="allow a non-loopback --host (the server has no authentication: "
                    "put your own in front of it)")
    ms.set_defaults(func=_cmd_mcp_serve)
    mg = msub.add_parser(
        "guard", help="run a third-party MCP server confined, its tools under a policy",
        formatter_class=fmt, epilog=EPILOG,
        usage="failcore mcp guard [--policy FILE] [--cap CAP ...] [--trace FILE] -- COMMAND "
              "[ARGS...]",
        description=textwrap.fill(
            "Start the stdio MCP server COMMAND confined by the kernel (an empty network "
            "namespace, Landlock limited to its capabilities plus what it needs to run, no "
            "capabilities, no_new_privs, rlimits, its own process group) and serve its tools "
            "over this process's stdio. Every tools/call is validated against the server's "
            "input schema, pre-checked and judged by the policy before it is forwarded; a "
            "refusal is a tool result with isError naming the rule. With net:connect "
            "capabilities the server reaches the network only through an HTTP proxy that "
            "judges each connection on the resolved address. Needs pip install "
            "'failcore[mcp]' and Linux. Exit code 0 when the agent disconnects, 1 when the "
            "server could not be confined as required or the watchdog stopped it.", 88))
    mg.add_argument("--policy", metavar="FILE",
                    help="guard policy (TOML: [policy], [server], [tools.NAME]; see the README)")
    mg.add_argument("--cap", action="append", metavar="CAP",
                    help="add a server capability, e.g. fs:read:/srv/docs (repeatable)")
    mg.add_argument("--trace", metavar="FILE", help="write the hash-chained trace here")
    mg.add_argument("server_command", nargs=argparse.REMAINDER, metavar="-- COMMAND ARGS",
                    help="the server to run, after --")
    mg.set_defaults(func=_cmd_mcp_guard)
    p.set_defaults(func=None, subparser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or argparse's own usage error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if getattr(args, "func", None) is None:
        (getattr(args, "subparser", None) or parser).print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args, sys.stdout))
    except _UsageError as exc:
        print(f"failcore {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `failcore show ... | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return EXIT_OK
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
