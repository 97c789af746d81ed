"""Process trees from the kernel's per-task children lists (stdlib only).

Reading ``/proc/PID/task/TID/children`` costs microseconds; scanning all of /proc for
parent links (psutil's way) costs milliseconds, which matters when every fresh call
retires a worker. Shared by the zygote and the parent.
"""

from __future__ import annotations

import os


class NoChildrenFile(OSError):
    """The kernel does not provide /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN)."""


def descendants(pid: int) -> list[int]:
    """Every descendant of ``pid`` (children before grandchildren); raises NoChildrenFile."""
    found: list[int] = []
    stack = [pid]
    while stack:
        current = stack.pop()
        try:
            tids = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue  # exited meanwhile
        for tid in tids:
            try:
                with open(f"/proc/{current}/task/{tid}/children", "rb") as f:
                    kids = [int(k) for k in f.read().split()]
            except FileNotFoundError:
                if os.path.exists(f"/proc/{current}/task/{tid}"):
                    raise NoChildrenFile(f"/proc/{current}/task/{tid}/children") from None
                continue
            except OSError:
                continue
            found.extend(kids)
            stack.extend(kids)
    return found
