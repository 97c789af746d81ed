"""A private network lab for tests that must attempt non-loopback connections.

``run_lab(...)`` starts ``unshare -n -m <python> netns_lab.py`` (this file) as its own
process group and waits for it, bounded in time. Inside the fresh network and mount
namespaces this file, as ``__main__``:

1. refuses to go on unless ``lo`` is the only interface (nothing can leave the machine,
   even if the guard under test is broken), brings ``lo`` up and adds the lab's
   addresses to it: "public" hosts (140.82.112.3) and the targets a tool must never
   reach (169.254.169.254, 10.0.0.5 and their IPv6 forms);
2. bind-mounts a private hosts file over /etc/hosts, so names resolve offline to those
   addresses (``api.github.com`` -> 140.82.112.3), and makes /root traversable with a
   tmpfs (the interpreter lives under /root's pyenv) so a payload can run as ``nobody``;
3. starts an HTTP server on each "public" address and a tripwire listener on each
   forbidden one, counting what they receive;
4. runs the payload script (as root, or as uid/gid 65534 through setpriv) with a
   timeout, stops every listener, and prints one JSON document: the payload's exit
   code and output, and the counts.

Every listener and the payload live inside the namespace and stop with it; request
loops are bounded by the payload's timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

NOBODY = 65534
OUTER_TIMEOUT_S = 240


@dataclass
class LabResult:
    rc: int
    stdout: str
    stderr: str
    http: dict[str, int]  # "addr:port" -> GET requests served
    tripwires: dict[str, int]  # "addr:port" -> connections accepted (must stay 0)


def lab_unavailable() -> str | None:
    """Why the lab cannot run here (then tests skip, never run in the open), or None."""
    if os.geteuid() != 0:
        return "needs root to create network and mount namespaces (unshare -n -m)"
    for tool in ("unshare", "ip", "setpriv", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare -n -m is refused here: {probe.stderr.decode(errors='replace').strip()}"
    return None


def run_lab(script: str, *, hosts: dict[str, str], http: list[str], tripwires: list[str],
            user: str = "root", timeout_s: float = 180) -> LabResult:
    """Run ``script`` in a fresh lab. ``http``/``tripwires``: "addr:port" or "[v6]:port"."""
    # The work directory is made and removed out here: inside, the lab bind-mounts the
    # interpreter's tree below it, and those mounts exist only in the lab's namespace.
    work = tempfile.mkdtemp(prefix="failcore-lab-")
    os.chmod(work, 0o755)
    config = {"script": script, "hosts": hosts, "http": http, "tripwires": tripwires,
              "user": user, "timeout_s": timeout_s, "python": sys.executable, "work": work}
    proc = subprocess.Popen(
        ["unshare", "-n", "-m", sys.executable, str(Path(__file__).resolve())],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        out, err = proc.communicate(json.dumps(config).encode(), timeout=OUTER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this call created
        proc.communicate()
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the lab failed ({proc.returncode}): {err.decode(errors='replace')}")
    data = json.loads(out)
    return LabResult(data["rc"], data["stdout"], data["stderr"], data["http"], data["tripwires"])


# --- inside the namespaces ----------------------------------------------------------------


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


class _Counting(BaseHTTPRequestHandler):
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        host, port = self.server.server_address[:2]
        key = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + 1
        body = b'{"current_user_url": "https://api.github.com/user"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _V6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _set_up_network(endpoints: list[str]) -> None:
    if {name for _, name in socket.if_nameindex()} != {"lo"}:
        raise SystemExit("refusing to run: not in a fresh network namespace (only lo allowed)")
    _sh("ip", "link", "set", "lo", "up")
    for host in sorted({_split(e)[0] for e in endpoints}):
        if ":" in host:
            _sh("ip", "-6", "addr", "add", f"{host}/128", "dev", "lo", "nodad")
        elif not host.startswith("127."):
            _sh("ip", "addr", "add", f"{host}/32", "dev", "lo")


def _set_up_files(work: Path, hosts: dict[str, str]) -> None:
    _sh("mount", "--make-rprivate", "/")
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
    lines += [f"{addr} {name}" for name, addr in hosts.items()]
    hosts_file = work / "hosts"
    hosts_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    hosts_file.chmod(0o644)
    _sh("mount", "--bind", str(hosts_file), "/etc/hosts")
    # /root is mode 700 and holds the interpreter (pyenv): show only .pyenv, read-only.
    keep = work / "pyenv"
    keep.mkdir()
    if Path("/root/.pyenv").is_dir():
        _sh("mount", "--bind", "/root/.pyenv", str(keep))
        _sh("mount", "-t", "tmpfs", "-o", "mode=0755,size=1m", "tmpfs", "/root")
        os.mkdir("/root/.pyenv")
        _sh("mount", "--bind", "-o", "ro", str(keep), "/root/.pyenv")


def _tripwire(endpoint: str, counts: dict[str, int], stop: threading.Event) -> threading.Thread:
    host, port = _split(endpoint)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(16)
    sock.settimeout(0.1)
    counts[endpoint] = 0

    def accept() -> None:
        with sock:
            while not stop.is_set():
                try:
                    conn, _ = sock.accept()
                except OSError:
                    continue
                counts[endpoint] += 1
                conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return thread


def _main() -> None:
    config: dict[str, Any] = json.loads(sys.stdin.read())
    _set_up_network(config["http"] + config["tripwires"])
    work = Path(config["work"])
    _set_up_files(work, config["hosts"])
    stop = threading.Event()
    tripwires: dict[str, int] = {}
    threads = [_tripwire(e, tripwires, stop) for e in config["tripwires"]]
    servers = []
    for endpoint in config["http"]:
        host, port = _split(endpoint)
        server_class = _V6Server if ":" in host else ThreadingHTTPServer
        server = server_class((host, port), _Counting)
        servers.append(server)
        threads.append(threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True))
        threads[-1].start()
    script = work / "payload.py"
    script.write_text(config["script"], encoding="utf-8")
    script.chmod(0o644)
    argv = [config["python"], str(script)]
    if config["user"] == "nobody":
        argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(work),
           "PYTHONDONTWRITEBYTECODE": "1"}
    payload = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = payload.communicate(timeout=float(config["timeout_s"]))
        rc = payload.returncode
    except subprocess.TimeoutExpired:
        os.killpg(payload.pid, signal.SIGKILL)  # the payload's own group
        out, err = payload.communicate()
        rc = -9
    stop.set()
    for server in servers:
        server.shutdown()
        server.server_close()
    for thread in threads:
        thread.join(2)
    print(json.dumps({"rc": rc, "stdout": out.decode(errors="replace"),
                      "stderr": err.decode(errors="replace"), "http": dict(_Counting.counts),
                      "tripwires": tripwires}))


if __name__ == "__main__":
    _main()
