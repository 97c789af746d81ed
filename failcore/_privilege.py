"""Whether a root parent can drop its workers to an unprivileged uid.

A worker that drops to ``nobody`` must still be able to import the standard library
and the project's modules lazily. When the interpreter lives somewhere ``nobody``
cannot read (pyenv under ``/root`` is mode 700), dropping would break legitimate tools,
so ``worker_user="auto"`` keeps the uid and says why; ``worker_user="nobody"`` forces it.
"""

from __future__ import annotations

import os
import pwd
import stat
import sys
import sysconfig
from dataclasses import dataclass


@dataclass(frozen=True)
class PrivilegePlan:
    uid: int | None
    gid: int | None
    reason: str


def _other_can_read(path: str) -> bool:
    path = os.path.realpath(path)
    parts = path.split(os.sep)
    for i in range(1, len(parts) + 1):
        current = os.sep + os.path.join(*parts[1:i]) if i > 1 else os.sep
        try:
            mode = os.stat(current).st_mode
        except OSError:
            return False
        need = stat.S_IXOTH | (stat.S_IROTH if current == path else 0)
        if stat.S_ISDIR(mode) and mode & need != need:
            return False
        if not stat.S_ISDIR(mode) and not mode & stat.S_IROTH:
            return False
    return True


def plan(worker_user: str | int | None) -> PrivilegePlan:
    if worker_user is None:
        return PrivilegePlan(None, None, "worker_user=None: workers keep the parent's uid")
    if os.geteuid() != 0:
        if worker_user == "auto":
            return PrivilegePlan(None, None, "parent is not root: workers run as the parent's uid")
        raise PermissionError(f"worker_user={worker_user!r} needs a root parent")
    name = "nobody" if worker_user == "auto" else worker_user
    try:
        entry = pwd.getpwuid(name) if isinstance(name, int) else pwd.getpwnam(name)
    except KeyError as exc:
        raise ValueError(f"worker_user={worker_user!r}: no such user") from exc
    if worker_user == "auto":
        needed = {sysconfig.get_paths()["stdlib"], sys.prefix}
        needed.update(p for p in sys.path if p and os.path.isdir(p))
        unreadable = sorted(p for p in needed if not _other_can_read(p))
        if unreadable:
            return PrivilegePlan(
                None, None,
                f"parent is root but {entry.pw_name} cannot read {unreadable[0]} (needed for "
                "imports): workers keep uid 0; install Python in a world-readable prefix or "
                "pass worker_user='nobody' to force the drop",
            )
    return PrivilegePlan(entry.pw_uid, entry.pw_gid, f"workers drop to {entry.pw_name} ({entry.pw_uid})")
