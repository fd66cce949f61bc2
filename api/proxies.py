"""Who the client is: the direct peer, unless that peer is a proxy we were told to trust.

X-Forwarded-For is written by whoever sends the request, so it is believed only when the TCP
peer is listed in CHAINLOOM_TRUSTED_PROXIES (IPs and CIDRs, none by default), and then only up
to the rightmost hop that is not itself a trusted proxy: every proxy appends the address it
saw, so everything left of that hop may be the client's own invention. uvicorn's
ProxyHeadersMiddleware, which trusts loopback out of the box, must be off (`chainloom api`
starts uvicorn with proxy_headers=False); otherwise the peer is rewritten before we see it.

Rate limits on failed authentication and login count per address (api/deps.py), so an
address that can be chosen at will would be no limit at all.
"""

import ipaddress
from collections.abc import MutableMapping
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SCHEMES = {"http", "https"}
# An X-Forwarded-For entry that is not an IP is kept as text, capped: it ends up in counter
# keys and the request log.
_MAX_TEXT = 64


def _address(text: str) -> IPAddress | None:
    """An IP from a peer or an X-Forwarded-For entry ("1.2.3.4", "1.2.3.4:80", "[::1]:80")."""
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack socket's IPv4 peer
    return ip


class TrustedProxies:
    def __init__(self, networks: list[IPNetwork]) -> None:
        self.networks = networks

    @classmethod
    def parse(cls, text: str, setting: str = "CHAINLOOM_TRUSTED_PROXIES") -> "TrustedProxies":
        networks: list[IPNetwork] = []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError as err:
                raise ValueError(
                    f"{setting}: {item!r} is not an IP address or CIDR (host names are not "
                    "accepted: name the proxies' addresses)"
                ) from err
        return cls(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, ip: IPAddress | None) -> bool:
        return ip is not None and any(ip in net for net in self.networks)

    def client(self, peer: str, forwarded_for: list[str]) -> str:
        """The client's address: `peer`, or the rightmost untrusted X-Forwarded-For hop when
        `peer` is a trusted proxy."""
        peer_ip = _address(peer)
        if not forwarded_for or not self.trusts(peer_ip):
            return str(peer_ip) if peer_ip is not None else peer
        hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
        for hop in reversed(hops):
            ip = _address(hop)
            if not self.trusts(ip):
                return str(ip) if ip is not None else hop[:_MAX_TEXT]
        # Every hop is a trusted proxy: the leftmost is where the request came from.
        if hops:
            first = _address(hops[0])
            return str(first) if first is not None else hops[0][:_MAX_TEXT]
        return str(peer_ip)


def apply(scope: MutableMapping[str, Any], proxies: TrustedProxies) -> None:
    """Puts the client's address in scope["client"] (the peer stays in scope["chainloom.peer"])
    and, from a trusted proxy, its X-Forwarded-Proto in scope["scheme"]."""
    peer = scope.get("client")
    scope["chainloom.peer"] = peer
    if not peer or not proxies:
        return
    forwarded: list[str] = []
    proto: str | None = None
    for name, value in scope.get("headers") or ():
        if name == b"x-forwarded-for":
            forwarded.append(value.decode("latin-1"))
        elif name == b"x-forwarded-proto":
            proto = value.decode("latin-1").strip().lower()
    if not proxies.trusts(_address(str(peer[0]))):
        return
    if forwarded:
        host = proxies.client(str(peer[0]), forwarded)
        if host != peer[0]:
            scope["client"] = (host, 0)
    if proto in _SCHEMES:
        scope["scheme"] = proto


def rate_key(host: str) -> str:
    """The address a per-client counter is kept for: an IPv6 client is its /64, since one
    subscriber commonly holds a whole /64 and could otherwise rotate through it."""
    ip = _address(host)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip) if ip is not None else host
