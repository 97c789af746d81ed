"""What kernel confinement is in force for a session's workers, proven at start, and why not.

Why: a sandbox that quietly degrades is worse than none, because the user believes it.
Each mechanism (Landlock for files and exec, its TCP and scope rules, the empty network
namespace, dropped capabilities, no_new_privs, the uid drop) is detected *and* tested: the
zygote's throwaway child (``failcore_worker._selftest``) tries a forbidden open, connect,
signal, abstract-socket connect and exec under an empty grant set, and the parent watches
its own listeners, so a connect that got through is seen from outside. A layer is "in
force" only when its probe was refused by the kernel.

``Session(confinement=...)``: ``"auto"`` (default) uses what exists and says what is
missing; ``"require"`` refuses to start (``ConfinementUnavailable``) unless every kernel
layer in ``REQUIRED`` is in force; ``"off"`` skips the kernel layers (for measuring their
cost, or where a tool cannot live with them); the rlimits and the guards stay either way.
"""

from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from failcore._metadata import ToolMetadata
from failcore._privilege import PrivilegePlan
from failcore_worker import _landlock
from failcore_worker.rules import Grants

Mode = Literal["auto", "require", "off"]
MODES: tuple[str, ...] = ("auto", "require", "off")
# The kernel layers "require" insists on, in report order.
REQUIRED = ("landlock", "landlock_net", "landlock_scopes", "netns", "capabilities",
            "no_new_privs", "seccomp")


def check_mode(mode: object) -> Mode:
    if mode not in MODES:
        raise ValueError(f"confinement must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
    return mode  # type: ignore[return-value]


def network_mode(metadata: ToolMetadata) -> Literal["none", "host"]:
    """Where a tool's workers run: ``"none"`` (the empty network namespace; TCP and DNS
    through the parent's socket broker) unless ``ToolMetadata(network="host")`` asks for
    the host's network (a second zygote; Landlock limits TCP connects to the granted
    ports; for clients that connect from C)."""
    return "host" if metadata.network == "host" else "none"


@dataclass(frozen=True)
class LayerStatus:
    name: str
    in_force: bool
    reason: str


@dataclass(frozen=True)
class ToolConfinement:
    """How one tool's workers run: ``network`` ("none" or "host") and what their Landlock
    ruleset leaves out and why (``notes``: a grant path that does not exist, a port range
    too wide for per-port rules, files not handled under a permissive default)."""

    name: str
    network: str
    notes: tuple[str, ...] = ()


def tool_plan(grants: Grants, network: str, implicit: tuple[str, ...], report: dict[str, Any],
              mode: str, search_path: str) -> _landlock.Plan | None:
    """The Landlock ruleset of this tool's workers (None: no Landlock, or confinement off),
    made here once per tool and sent with each ``init``: a worker only adds its scratch
    directory and enforces it. ``report`` is the zygote's (ABI, the loader's paths);
    ``search_path`` the worker's PATH, on which bare ``proc:exec`` names are found."""
    abi = int(report.get("landlock_abi", 0))
    if mode == "off" or abi == 0:
        return None
    loader = tuple(report.get("loader_paths", ()))
    return _landlock.plan(grants, (), (*implicit, *loader), abi, host_network=network == "host",
                          search_path=search_path)


@dataclass(frozen=True)
class Confinement:
    """The session's confinement report. ``str()`` is a readable table; ``to_wire()`` is
    what the ``session.start`` trace record carries."""

    mode: str
    layers: tuple[LayerStatus, ...]
    landlock_abi: int = 0
    landlock_rights: tuple[str, ...] = ()
    tools: tuple[ToolConfinement, ...] = field(default=())

    def layer(self, name: str) -> LayerStatus:
        return next(layer for layer in self.layers if layer.name == name)

    @property
    def missing(self) -> tuple[LayerStatus, ...]:
        """Required kernel layers not in force."""
        return tuple(layer for layer in self.layers if layer.name in REQUIRED and not layer.in_force)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def host_network(self) -> tuple[str, ...]:
        """Tools whose workers keep the host's network (``network="host"``)."""
        return tuple(t.name for t in self.tools if t.network == "host")

    def to_wire(self) -> dict[str, Any]:
        return {"mode": self.mode, "landlock_abi": self.landlock_abi,
                "landlock_rights": list(self.landlock_rights),
                "layers": {x.name: {"in_force": x.in_force, "reason": x.reason}
                           for x in self.layers},
                "tools": [{"name": t.name, "network": t.network, "notes": list(t.notes)}
                          for t in self.tools]}

    def __str__(self) -> str:
        head = ("every kernel layer in force" if self.complete
                else f"{len(self.missing)} kernel layer(s) not in force")
        lines = [f"confinement={self.mode!r}: {head}"]
        width = max(len(x.name) for x in self.layers)
        for x in self.layers:
            lines.append(f"  {x.name:<{width}}  {'yes' if x.in_force else 'no '}  {x.reason}")
        hosts = ", ".join(self.host_network) or "none"
        lines.append(f"  tools on the host network (network='host'): {hosts}")
        for tool in self.tools:
            lines.extend(f"  {tool.name}: {note}" for note in tool.notes)
        return "\n".join(lines)

    def with_tools(self, tools: tuple[ToolConfinement, ...]) -> Confinement:
        return replace(self, tools=tools)


class Probe:
    """The parent's half of the self-test: a file outside every grant and two loopback
    listeners (one for the namespace, one for Landlock's TCP rule), watched from here."""

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, "selftest-forbidden")
        with open(self.path, "w") as f:
            f.write("no grant covers this file\n")
        self._listeners = [self._listen(), self._listen()]

    @staticmethod
    def _listen() -> socket.socket:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.bind(("127.0.0.1", 0))
        srv.listen(4)
        srv.setblocking(False)
        return srv

    def options(self) -> dict[str, Any]:
        ports = [s.getsockname()[1] for s in self._listeners]
        return {"path": self.path, "port_netns": ports[0], "port_landlock": ports[1]}

    def arrived(self) -> tuple[int, int]:
        """Connections that reached each listener (the zygote waited for its child)."""
        counts = []
        for srv in self._listeners:
            n = 0
            while n < 8:
                try:
                    conn, _ = srv.accept()
                except (BlockingIOError, OSError):
                    break
                conn.close()
                n += 1
            counts.append(n)
        return counts[0], counts[1]

    def close(self) -> None:
        for srv in self._listeners:
            srv.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _err(code: Any) -> str:
    if not isinstance(code, int):
        return "not tried (the self-test child stopped early)"
    if code == 0:
        return "succeeded"
    return f"failed with {errno.errorcode.get(code, str(code))}"


# The errno each probe must get for its layer to count as in force: any other failure
# (ENOENT: /bin/true missing, ...) proves nothing.
_EXPECTED = {"connect_before": (errno.ENETUNREACH, errno.ECONNREFUSED, errno.EACCES, errno.EPERM),
             "open": (errno.EACCES, errno.EPERM), "exec": (errno.EACCES, errno.EPERM),
             "connect": (errno.EACCES,), "signal": (errno.EPERM,), "abstract": (errno.EPERM,),
             "listen": (errno.EPERM,), "udp": (errno.EPERM,)}


def _refused(test: dict[str, Any], probe: str) -> bool:
    return test.get(probe) in _EXPECTED[probe]


def _uid_layer(privilege: PrivilegePlan | None) -> LayerStatus:
    if os.geteuid() != 0:
        return LayerStatus("uid_drop", True, "the parent is not root: workers run unprivileged")
    if privilege is not None and privilege.uid is not None:
        return LayerStatus("uid_drop", True, privilege.reason)
    reason = privilege.reason if privilege is not None else "workers keep uid 0"
    return LayerStatus("uid_drop", False, f"{reason} (with no capabilities: see 'capabilities')")


_SECCOMP = LayerStatus("seccomp", False, "not installed (confinement off)")


def off(reason: str, privilege: PrivilegePlan | None) -> Confinement:
    layers = tuple(LayerStatus(name, False, reason) for name in (*REQUIRED, "userns"))
    return Confinement("off", (*layers, _uid_layer(privilege), _SECCOMP))


def judge(mode: str, report: dict[str, Any], arrived: tuple[int, int],
          privilege: PrivilegePlan | None) -> Confinement:
    """Turn the zygote's report and what reached the parent's listeners into layers."""
    test: dict[str, Any] = report.get("selftest") or {}
    abi = int(report.get("landlock_abi", 0))
    ns = report.get("netns") or {"in_force": False, "reason": "not attempted"}
    before, after = test.get("connect_before"), test.get("connect")
    if not ns["in_force"]:
        netns = LayerStatus("netns", False, str(ns["reason"]))
    elif arrived[0] or not _refused(test, "connect_before"):
        netns = LayerStatus("netns", False, "the zygote entered a network namespace, but a "
                            f"connect from it reached the parent's loopback listener ({_err(before)})")
    else:
        netns = LayerStatus("netns", True, f"{ns['reason']}; a connect to the parent's "
                            f"loopback listener {_err(before)}")
    userns_report = report.get("userns") or {"in_force": False, "reason": "not attempted"}
    userns = LayerStatus("userns", bool(userns_report["in_force"]), str(userns_report["reason"]))
    caps = test.get("capabilities") or {"in_force": False, "reason": "not tested"}
    bounding = report.get("bounding") or {"in_force": False, "reason": "not attempted"}
    capabilities = LayerStatus("capabilities", bool(caps["in_force"]),
                               f"{caps['reason']}; {bounding['reason']}")
    nnp_report = test.get("no_new_privs") or {"in_force": False, "reason": "not tested"}
    nnp = LayerStatus("no_new_privs", bool(nnp_report["in_force"]), str(nnp_report["reason"]))
    ll = test.get("landlock") or {"in_force": False, "reason": "not tested"}
    rights: tuple[str, ...] = tuple((ll.get("plan") or {}).get("fs", ()))
    if not ll["in_force"]:
        landlock = LayerStatus("landlock", False, str(ll["reason"]))
        net = LayerStatus("landlock_net", False, f"no Landlock: {ll['reason']}")
        scopes = LayerStatus("landlock_scopes", False, f"no Landlock: {ll['reason']}")
    else:
        opened, ran = test.get("open"), test.get("exec")
        landlock = LayerStatus(
            "landlock", _refused(test, "open") and _refused(test, "exec"),
            f"{ll['reason']}, {len(rights)} file rights handled; a forbidden open "
            f"{_err(opened)}, exec of /bin/true {_err(ran)}")
        if abi < 4:
            net = LayerStatus("landlock_net", False, f"Landlock ABI {abi} < 4: no TCP rules "
                              "(kernel 6.7 or later)")
        else:
            net = LayerStatus("landlock_net", _refused(test, "connect") and not arrived[1],
                              f"TCP bind/connect handled; a connect to the parent's listener "
                              f"{_err(after)}"
                              + ("; and it ARRIVED" if arrived[1] else ""))
        if abi < 6:
            scopes = LayerStatus("landlock_scopes", False, f"Landlock ABI {abi} < 6: signals "
                                 "and abstract unix sockets not scoped (kernel 6.12 or later)")
        else:
            sig, uds = test.get("signal"), test.get("abstract")
            scopes = LayerStatus("landlock_scopes",
                                 _refused(test, "signal") and _refused(test, "abstract"),
                                 f"signal to the zygote {_err(sig)}, abstract unix socket "
                                 f"connect {_err(uds)}")
    sc = report.get("seccomp") or {"in_force": False, "reason": "not installed: the "
                                   "zygote has no network namespace of its own"}
    tested = test.get("seccomp") or {"in_force": False, "reason": "not tested"}
    seccomp = LayerStatus("seccomp", bool(sc["in_force"]) and bool(tested["in_force"])
                          and _refused(test, "listen")
                          and _refused(test, "udp"),
                          f"{sc['reason']}; listen(2) {_err(test.get('listen'))}, a UDP socket "
                          f"{_err(test.get('udp'))}")
    if mode == "off":
        return off("off: Session(confinement='off')", privilege)
    return Confinement(mode, (landlock, net, scopes, netns, capabilities, nnp, userns,
                              _uid_layer(privilege), seccomp), abi, rights)
