"""``python -m failcore.demo``: block an SSRF and a path traversal, then print the trace.

Everything stays on this machine: the only server is a loopback HTTP server the demo
starts itself, and the cloud-metadata address is refused before any packet is sent.
"""

from __future__ import annotations

import argparse
import http.server
import os
import tempfile
import threading
import urllib.request
from pathlib import Path

from failcore import (
    FailCoreError,
    Limits,
    RiskLevel,
    SecurityError,
    Session,
    SideEffect,
    ToolMetadata,
    presets,
)


def http_get(url: str) -> str:
    """Fetch a URL and return the first 200 characters of the body."""
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read(200)
        return body.decode("utf-8", "replace")


def read_file(path: str) -> str:
    """Read a text file."""
    with open(path, encoding="utf-8") as f:
        return f.read(200)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.end_headers()
            return
        body = b"hello from a granted loopback server"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _attempt(label: str, session: Session, tool: str, **kwargs: str) -> None:
    try:
        result = session.call(tool, **kwargs)
        print(f"  ALLOWED  {label}: {result!r}")
    except SecurityError as exc:
        print(f"  BLOCKED  {label}\n           {exc}")
    except FailCoreError as exc:
        print(f"  FAILED   {label}: {type(exc).__name__}: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m failcore.demo", description=__doc__)
    parser.add_argument("--trace", help="where to write the trace (default: a temporary file)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="failcore-demo-") as tmp:
        data = Path(tmp, "data")
        data.mkdir()
        (data / "notes.txt").write_text("meeting at noon\n")
        Path(tmp, "secret.txt").write_text("AWS_SECRET_ACCESS_KEY=not-for-agents\n")
        os.symlink("/etc/passwd", data / "innocent.txt")
        trace = args.trace or str(Path(tmp, "trace.jsonl"))

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        try:
            policy = presets.net_safe(strict=True) | presets.fs_safe(root=str(data))
            with Session(validator=policy, trace=trace) as session:
                session.register("http_get", http_get, ToolMetadata(
                    risk_level=RiskLevel.HIGH, side_effect=SideEffect.NETWORK,
                    capabilities=[f"net:connect:127.0.0.1:{port}"],
                    limits=Limits(timeout_s=10, memory_mb=256)))
                session.register("read_file", read_file, ToolMetadata(
                    risk_level=RiskLevel.MEDIUM, side_effect=SideEffect.FILESYSTEM,
                    capabilities=[f"fs:read:{data}"], limits=Limits(timeout_s=5)))

                print("SSRF")
                _attempt("cloud metadata", session, "http_get",
                         url="http://169.254.169.254/latest/meta-data/")
                _attempt("metadata as a decimal integer", session, "http_get",
                         url="http://2852039166/latest/meta-data/")
                _attempt("redirect to metadata (caught at connect, in the worker)", session,
                         "http_get", url=f"http://127.0.0.1:{port}/redirect")
                _attempt("granted loopback server", session, "http_get",
                         url=f"http://127.0.0.1:{port}/")
                print("Path traversal")
                _attempt("../ out of the data root", session, "read_file",
                         path=f"{data}/../secret.txt")
                _attempt("symlink to /etc/passwd", session, "read_file",
                         path=str(data / "innocent.txt"))
                _attempt("granted file", session, "read_file", path=str(data / "notes.txt"))
        finally:
            server.shutdown()
            server.server_close()

        print(f"\nTrace ({trace}):")
        from failcore._cli import main as cli

        cli(["show", trace])
        return cli(["verify", trace])


if __name__ == "__main__":
    raise SystemExit(main())
