"""Which host names resolved to which addresses in this worker (private to the guards).

``socket.connect`` only sees an address. To let ``net:connect:api.example.com`` cover a
connect, the guards wrap the resolver functions and remember, per address, the names
that produced it. An address nobody resolved has no names, so name capabilities cannot
cover it: a tool that hard-codes an IP needs a capability naming the IP.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from failcore_worker._addresses import parse_ip

_MAX_ADDRESSES = 4096
_MAX_NAMES = 16


class NameBook:
    """Address -> names, bounded: when full, new addresses get no names (fails closed)."""

    def __init__(self) -> None:
        self._names: dict[str, tuple[str, ...]] = {}

    def get(self, ip: str) -> tuple[str, ...]:
        return self._names.get(ip, ())

    def remember(self, name: Any, addresses: Iterable[Any]) -> None:
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        if not isinstance(name, str) or parse_ip(name) is not None:
            return
        clean = name.lower().rstrip(".")
        for address in addresses:
            ip = parse_ip(str(address))
            if ip is None:
                continue
            key = str(ip)
            known = self._names.get(key, ())
            if clean in known or len(known) >= _MAX_NAMES:
                continue
            if not known and len(self._names) >= _MAX_ADDRESSES:
                continue
            self._names[key] = (*known, clean)

    def wrap(self, module: ModuleType) -> None:
        """Replace ``module``'s resolver functions with recording ones (``socket``)."""
        gai: Callable[..., Any] = getattr(module, "getaddrinfo")  # noqa: B009
        byname: Callable[..., Any] = getattr(module, "gethostbyname")  # noqa: B009
        byname_ex: Callable[..., Any] = getattr(module, "gethostbyname_ex")  # noqa: B009

        @functools.wraps(gai)
        def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
            result = gai(host, *args, **kwargs)
            self.remember(host, (entry[4][0] for entry in result))
            return result

        @functools.wraps(byname)
        def gethostbyname(host: Any) -> Any:
            result = byname(host)
            self.remember(host, (result,))
            return result

        @functools.wraps(byname_ex)
        def gethostbyname_ex(host: Any) -> Any:
            result = byname_ex(host)
            self.remember(host, result[2])
            return result

        module.getaddrinfo = getaddrinfo  # type: ignore[attr-defined]
        module.gethostbyname = gethostbyname  # type: ignore[attr-defined]
        module.gethostbyname_ex = gethostbyname_ex  # type: ignore[attr-defined]
