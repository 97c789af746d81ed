"""Run a program FailCore did not write, confined by the kernel: ``python -I -m
failcore_worker.confined_exec CONTROL_SOCKET``.

Why a launcher process: confinement must be in place before the program's first
instruction, and it acts on the calling thread only, so it is done by a fresh,
single-threaded Python process that then ``execve``s the program (the parent, with its
event loop and threads, cannot safely do it between fork and exec). The parent plans
everything (``failcore.mcp_guard._runtime``) and sends the plan over a unix socket; the
launcher only applies it, in this order:

1. die with the parent (``PR_SET_PDEATHSIG``); the parent started it in its own session,
   so the program and its children share one process group the parent kills on exit;
2. an empty network namespace; with ``proxy``, ``lo`` is brought up and a TCP listener
   on 127.0.0.1 is created *inside* it and handed to the parent (SCM_RIGHTS): a socket
   keeps the namespace it was made in, so the parent, outside, accepts the program's
   connections on it and serves the egress proxy; nothing else in the namespace leads out;
3. rlimits with soft == hard (data segment, processes, open files, file size, no core);
4. capabilities: bounding and ambient sets emptied, the uid dropped when planned,
   no_new_privs, Landlock (the planned paths; TCP connect only to the proxy's port;
   no bind; signals and abstract unix sockets scoped), effective/permitted emptied;
5. report per layer to the parent; refuse to exec (``exec.failed``) when a required
   layer is not in force; else ``execve``. The control socket is close-on-exec.

Standard library only, like the rest of ``failcore_worker``; it never imports ``failcore``.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import sys
from typing import Any

from failcore_worker import _exec_kernel as kernel
from failcore_worker import protocol
from failcore_worker.protocol import ExecLayer, ExecPlan

_RLIMITS = {"data_bytes": resource.RLIMIT_DATA, "processes": resource.RLIMIT_NPROC,
            "open_files": resource.RLIMIT_NOFILE, "file_size_bytes": resource.RLIMIT_FSIZE}


class _Refused(Exception):
    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


def _send(ctl: socket.socket, kind: str, body: dict[str, Any], fds: list[int] | None = None) -> None:
    frame = protocol.encode_data(kind, body)
    if fds:
        socket.send_fds(ctl, [frame], fds)
    else:
        ctl.sendall(frame)


def _rlimits(plan: ExecPlan) -> ExecLayer:
    set_ = []
    limits: dict[str, int | None] = dict(plan["rlimits"])  # type: ignore[arg-type]
    for key, which in _RLIMITS.items():
        value = limits.get(key)
        if value is None:
            continue
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))
        set_.append(f"{key}={value}")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return {"in_force": True, "reason": ", ".join([*set_, "core=0"])}


def _network(plan: ExecPlan, ctl: socket.socket) -> tuple[ExecLayer, int | None]:
    if not plan["netns"]:
        return {"in_force": False, "reason": "not asked for (netns = false)"}, None
    try:
        how = kernel.enter_netns()
    except (kernel.KernelError, OSError) as exc:
        return {"in_force": False, "reason": str(exc)}, None
    if not plan["proxy"]:
        return {"in_force": True, "reason": f"empty network namespace ({how}), lo down"}, None
    kernel.loopback_up()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    _send(ctl, protocol.EXEC_LISTENER, {"port": port}, [listener.fileno()])
    listener.close()  # the parent holds it now; here only connect() to it remains
    return {"in_force": True, "reason": f"empty network namespace ({how}); lo up with one "
                                        f"listener, 127.0.0.1:{port}, served by the parent's "
                                        "proxy"}, port


def confine(plan: ExecPlan,
            ctl: socket.socket) -> tuple[dict[str, ExecLayer], int, int, int | None]:
    """Apply ``plan`` to this process; returns (layers, Landlock ABI, rules added, the
    proxy listener's port or None)."""
    layers: dict[str, ExecLayer] = {}
    kernel.set_pdeathsig(signal.SIGKILL)
    layers["netns"], proxy_port = _network(plan, ctl)
    layers["rlimits"] = _rlimits(plan)
    ok, why = kernel.drop_bounding_set()
    uid, gid = plan["uid"], plan["gid"]
    if uid is not None and gid is not None and os.geteuid() == 0:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        layers["uid"] = {"in_force": True, "reason": f"uid {uid}, gid {gid}, no groups"}
    else:
        layers["uid"] = {"in_force": False, "reason": f"runs as uid {os.geteuid()}"}
    layers["no_new_privs"] = dict(zip(("in_force", "reason"), kernel.set_no_new_privs(),
                                      strict=True))  # type: ignore[assignment]
    abi = kernel.landlock_abi()
    rules = 0
    ports = sorted({*plan["connect_ports"], *([proxy_port] if proxy_port else [])})
    if abi == 0:
        layers["landlock"] = {"in_force": False, "reason": "Landlock unavailable (kernel too "
                                                           "old or disabled at boot)"}
    else:
        try:
            rules = kernel.landlock_restrict(abi, plan["landlock_paths"], ports)
            layers["landlock"] = {"in_force": True,
                                  "reason": f"ABI {abi}: {rules} path rules, all file rights "
                                            "handled"}
        except kernel.KernelError as exc:
            layers["landlock"] = {"in_force": False, "reason": str(exc)}
    landlocked = layers["landlock"]["in_force"]
    layers["landlock_net"] = (
        {"in_force": True, "reason": "TCP bind denied; connect only to port(s) "
                                     + (", ".join(map(str, ports)) or "none")}
        if landlocked and abi >= 4 else
        {"in_force": False, "reason": f"Landlock ABI {abi} < 4: no TCP rules"})
    layers["landlock_scopes"] = (
        {"in_force": True, "reason": "signals and abstract unix sockets scoped to the domain"}
        if landlocked and abi >= 6 else
        {"in_force": False, "reason": f"Landlock ABI {abi} < 6: no scopes"})
    cleared, cleared_why = kernel.clear_capabilities()
    layers["capabilities"] = {"in_force": ok and cleared,
                              "reason": f"{why}; {cleared_why}" if ok else why}
    return layers, abi, rules, proxy_port


def _run(plan: ExecPlan, ctl: socket.socket) -> None:
    try:
        layers, abi, rules, port = confine(plan, ctl)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _Refused("confine", f"{type(exc).__name__}: {exc}") from None
    missing = [f"{name}: {layers[name]['reason']}" for name in plan["require"]
               if not layers.get(name, {"in_force": False})["in_force"]]
    if missing:
        raise _Refused("require", "required confinement not in force: " + "; ".join(missing))
    env = dict(plan["env"])
    if port is not None:
        # Clients that honour the usual variables use the proxy; nothing else leads out.
        for name in ("NO_PROXY", "no_proxy"):
            env.pop(name, None)
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env[name] = f"http://127.0.0.1:{port}"
    try:
        os.chdir(plan["cwd"])
    except OSError as exc:
        raise _Refused("cwd", f"cannot enter {plan['cwd']}: {exc}") from None
    _send(ctl, protocol.EXEC_READY, {"pid": os.getpid(), "layers": layers,
                                     "landlock_abi": abi, "rules": rules})
    try:
        os.execve(plan["argv"][0], plan["argv"], env)
    except OSError as exc:
        raise _Refused("exec", f"{plan['argv'][0]}: {exc}") from None


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -I -m failcore_worker.confined_exec CONTROL_SOCKET", file=sys.stderr)
        return 2
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl.connect(argv[1])
    try:
        kind, body = protocol.decode_data(protocol.recv_frame(ctl, protocol.MAX_EXEC_FRAME))
        if kind != protocol.EXEC_PLAN:
            raise _Refused("plan", f"expected {protocol.EXEC_PLAN}, got {kind!r}")
        _run(body, ctl)  # type: ignore[arg-type]
    except _Refused as exc:
        _send(ctl, protocol.EXEC_FAILED, {"stage": exc.stage, "message": str(exc)})
        return 126
    except (protocol.PeerClosed, protocol.BadFrame, protocol.FrameTooLarge) as exc:
        print(f"failcore confined_exec: no plan from the parent: {exc}", file=sys.stderr)
        return 126
    return 127  # not reached: execve does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv))
