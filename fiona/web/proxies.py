"""Which peers are our reverse proxies (`WEB.trusted_proxies`), and the client address.

Headers a proxy sets (`REMOTE_USER`, `X-Forwarded-For`) can be typed by anyone who reaches the
port directly, so they are believed only when the TCP peer is one of the configured proxy
addresses or networks.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> list[Network]:
    """IP addresses or CIDR networks; ValueError names the first bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network (e.g. 127.0.0.1, "
                             "10.1.2.0/24, ::1)") from None
    return networks


class TrustedProxies:
    def __init__(self, values: Iterable[str]):
        self.networks = parse_networks(values)

    def trusted(self, host: str | None) -> bool:
        try:
            address = ipaddress.ip_address(host or "")
        except ValueError:
            return False
        return any(address in net for net in self.networks)

    def client_address(self, peer: str, forwarded_for: str) -> str:
        """The client: the peer itself, or, when the peer is a trusted proxy, the right-most
        `X-Forwarded-For` entry that is not one of our proxies (entries further left were
        written by the client and prove nothing)."""
        if not forwarded_for or not self.trusted(peer):
            return peer
        hops = [h.strip() for h in forwarded_for.split(",")]
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return peer
            if not self.trusted(hop):
                return hop
        return hops[0]
