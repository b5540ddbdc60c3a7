"""Which peer addresses the side channel talks to: `kv_connector_extra_config.allowed_peers`.

Entries are IP addresses, networks ("10.0.0.0/24", "fd00::/64") or host names (matched as written,
never resolved: a name is only as good as the resolver). Unset: every address (the shared secret is
what keeps strangers out). A source refuses messages from other addresses before reading them; a
sink and the decode scheduler refuse a `remote_host` outside the list before connecting to it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


class AllowList:
    def __init__(self, entries: Iterable[str] | None):
        self.entries: tuple[str, ...] | None = None if entries is None else tuple(entries)
        self._nets, self._names = [], set()
        for e in self.entries or ():
            try:
                self._nets.append(ipaddress.ip_network(e, strict=False))
            except ValueError:
                self._names.add(e.lower())

    @property
    def restricted(self) -> bool:
        return self.entries is not None

    def allows(self, host: str) -> bool:
        if self.entries is None:
            return True
        ip = parse_ip(host)
        if ip is None:
            return host.lower() in self._names
        return any(ip.version == n.version and ip in n for n in self._nets)

    def __repr__(self) -> str:
        return "any address" if self.entries is None else ", ".join(self.entries) or "no address"


def parse_ip(host: str):
    """The address of an IP literal (an IPv4-mapped IPv6 address as its IPv4 one); None for a name."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    return ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip
