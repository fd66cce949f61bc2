"""The one way chainloom calls a URL that a user supplied (hooks, webhooks, httpFetch, crawls).

A user-supplied URL is a server-side request forgery risk: it can point at the worker's own
loopback services, the cluster's private network or the cloud metadata endpoint. Every such
request therefore goes through `fetch`, which:

- resolves the host once and refuses loopback, private, link-local, shared (CGNAT), metadata,
  multicast and reserved addresses, IPv4-mapped/6to4/NAT64 forms of them, and numeric hosts
  such as "2130706433" or "0177.0.0.1" (read the way the C resolver reads them);
- connects only to an address it checked, sending the original Host header and TLS SNI (and
  verifying the certificate against the original name), so a DNS answer that changes between
  the check and the connection (DNS rebinding) cannot redirect the request;
- follows redirects itself and checks every hop the same way, dropping caller headers (which
  may carry secrets) when a redirect leaves the original origin;
- caps the response size (decoded bytes) and the total time of the whole exchange.

CHAINLOOM_OUTBOUND_ALLOWLIST (comma-separated) lets chosen destinations through: IP addresses
("127.0.0.1", "::1"), CIDRs ("10.0.0.0/8") and host names ("hooks.internal", "*.corp.example").
An allowlisted host name is trusted whatever it resolves to.
"""

import asyncio
import base64
import ipaddress
import json as _json
import socket
import ssl
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

ALLOWLIST_ENV = "CHAINLOOM_OUTBOUND_ALLOWLIST"
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_REDIRECTS = 5
USER_AGENT = "chainloom/0.1"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# A mapping, or (name, value) pairs when a name repeats.
QueryParams = Mapping[str, Any] | list[tuple[str, Any]] | None
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Headers that may follow a redirect to another origin; everything else a caller set (tokens,
# cookies, hook secrets) stays with the origin it was meant for.
_CROSS_ORIGIN_SAFE = frozenset(
    {"accept", "accept-language", "content-type", "user-agent", "idempotency-key"}
)
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class OutboundFailure(Exception):
    """Base of both outbound exceptions, for callers that treat them alike."""


class OutboundRefused(OutboundFailure):
    """The request was not attempted: the policy forbids the destination (or the URL)."""

    def __init__(self, message: str, *, host: str = "", address: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.host = host
        self.address = address


class OutboundError(OutboundFailure):
    """The request was attempted and failed: network, time limit, size limit, redirects.

    `transient` says whether trying again later may succeed (network trouble, timeouts) or
    not (a response over the size cap, a redirect loop).
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


@dataclass(frozen=True)
class OutboundResponse:
    status: int
    # Lower-case names; repeated headers are joined with ", ".
    headers: dict[str, str]
    body: bytes
    # The final URL after redirects, with the host name (never the connected address).
    url: str

    @property
    def text(self) -> str:
        charset = "utf-8"
        ctype = self.headers.get("content-type", "")
        for part in ctype.split(";")[1:]:
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset" and value:
                charset = value.strip("\"'")
        try:
            return self.body.decode(charset, errors="replace")
        except LookupError:
            return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return _json.loads(self.body)


# --------------------------------------------------------------------------- the policy

_V4_RULES: list[tuple[ipaddress.IPv4Network, str]] = [
    (ipaddress.IPv4Network(net), reason)
    for net, reason in (
        ("0.0.0.0/8", "an unspecified ('this network') address"),
        ("127.0.0.0/8", "a loopback address"),
        ("10.0.0.0/8", "a private address"),
        ("172.16.0.0/12", "a private address"),
        ("192.168.0.0/16", "a private address"),
        ("169.254.169.254/32", "the cloud metadata address"),
        ("169.254.0.0/16", "a link-local address"),
        ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
        ("192.0.0.0/24", "an IETF protocol address"),
        ("192.0.2.0/24", "a documentation address"),
        ("198.51.100.0/24", "a documentation address"),
        ("203.0.113.0/24", "a documentation address"),
        ("198.18.0.0/15", "a benchmarking address"),
        ("224.0.0.0/4", "a multicast address"),
        ("240.0.0.0/4", "a reserved address"),
    )
]
_V6_RULES: list[tuple[ipaddress.IPv6Network, str]] = [
    (ipaddress.IPv6Network(net), reason)
    for net, reason in (
        ("::/128", "an unspecified address"),
        ("::1/128", "a loopback address"),
        # IPv4-compatible addresses (deprecated) embed an IPv4 address we will not vouch for.
        ("::/96", "an IPv4-compatible address"),
        ("fd00:ec2::254/128", "the cloud metadata address"),
        ("fc00::/7", "a private (unique local) address"),
        ("fe80::/10", "a link-local address"),
        ("fec0::/10", "a site-local address"),
        ("ff00::/8", "a multicast address"),
        ("100::/64", "a discard-only address"),
        ("2001:db8::/32", "a documentation address"),
    )
]
# NAT64 prefixes: the last 32 bits are the IPv4 address the gateway will connect to.
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address really reaches (mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in net for net in _NAT64):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def blocked_reason(ip: IPAddress) -> str | None:
    """Why connecting to `ip` is refused by default, or None for a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None:
            reason = blocked_reason(inner)
            return f"{reason} (it embeds IPv4 {inner})" if reason else None
        if ip.scope_id:
            ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])
        for net6, reason in _V6_RULES:
            if ip in net6:
                return reason
    else:
        for net4, reason in _V4_RULES:
            if ip in net4:
                return reason
    if not ip.is_global:
        return "a non-public address"
    return None


@dataclass(frozen=True)
class Allowlist:
    """Destinations let through despite the policy: addresses, networks, host names."""

    networks: tuple[IPNetwork, ...] = ()
    hosts: frozenset[str] = frozenset()
    # "*.corp.example" allows every name under corp.example (not corp.example itself).
    suffixes: tuple[str, ...] = ()
    entries: tuple[str, ...] = field(default=(), compare=False)
    # The setting a refusal tells the operator to change (backends have their own list).
    setting: str = field(default=ALLOWLIST_ENV, compare=False)

    @classmethod
    def parse(
        cls, value: "str | Iterable[str] | Allowlist | None", setting: str = ALLOWLIST_ENV
    ) -> "Allowlist":
        if isinstance(value, Allowlist):
            return value
        if value is None:
            return cls(setting=setting)
        items = value.split(",") if isinstance(value, str) else list(value)
        networks: list[IPNetwork] = []
        hosts: set[str] = set()
        suffixes: list[str] = []
        entries: list[str] = []
        for raw in items:
            entry = raw.strip().lower()
            if not entry:
                continue
            entries.append(entry)
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = entry.rstrip(".")
            if name.startswith("*."):
                suffixes.append(name[1:])
            elif _valid_hostname(name):
                hosts.add(name)
            else:
                raise ValueError(
                    f"{setting} entry {raw.strip()!r} is not a host name, IP address or CIDR"
                )
        return cls(tuple(networks), frozenset(hosts), tuple(suffixes), tuple(entries), setting)

    def allows_host(self, host: str) -> bool:
        name = host.lower().rstrip(".")
        return name in self.hosts or any(name.endswith(s) for s in self.suffixes)

    def allows_ip(self, ip: IPAddress) -> bool:
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.scope_id:
                candidates.append(ipaddress.IPv6Address(ip.compressed.split("%", 1)[0]))
            inner = _embedded_v4(ip)
            if inner is not None:
                candidates.append(inner)
        return any(
            c.version == net.version and c in net for c in candidates for net in self.networks
        )


def _valid_hostname(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    return all(
        part and len(part) <= 63 and all(ch.isalnum() or ch in "-_" for ch in part)
        for part in name.split(".")
    )


def default_allowlist() -> str:
    """The allowlist from the environment; callers holding a Settings object pass theirs."""
    from core.config import get_settings

    return get_settings().outbound_allowlist


def check_address(host: str, ip: IPAddress, allowlist: Allowlist) -> None:
    """Raise OutboundRefused unless `ip` (what `host` resolved to) may be connected to."""
    if allowlist.allows_host(host) or allowlist.allows_ip(ip):
        return
    reason = blocked_reason(ip)
    if reason is None:
        return
    literal = _literal_ip(host)
    if literal is not None and _standard_ip(host):
        subject = f"{host} is {reason}"
    elif literal is not None:
        subject = f"{host} (read as {ip}) is {reason}"
    else:
        subject = f"{host} resolves to {ip}, {reason}"
    raise OutboundRefused(
        f"refused: {subject}; add it to {allowlist.setting} to allow it",
        host=host,
        address=str(ip),
    )


# --------------------------------------------------------------------------- URLs and DNS


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # as written, lower-case, without brackets or trailing dot
    port: int
    path: str  # path and query, at least "/"
    host_header: str
    authorization: str | None

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)

    def url_for(self, address: IPAddress) -> str:
        literal = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{literal}:{self.port}{self.path}"

    def logical(self, path: str | None = None) -> str:
        return f"{self.scheme}://{self.host_header}{path if path is not None else self.path}"


def _standard_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _literal_ip(host: str) -> IPAddress | None:
    """An address written in the host itself, read like the C library reads it.

    inet_aton accepts "2130706433", "0x7f.1" and "0177.0.0.1" (all 127.0.0.1); getaddrinfo
    would hand them to the kernel the same way, so they are judged as the address they are.
    """
    text = host.strip("[]")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    if text and all(ch in "0123456789abcdefx." for ch in text) and text[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None
    return None


def _parse(url: str) -> _Target:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise OutboundRefused(f"refused: {url!r} is not a valid URL: {err}") from err
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise OutboundRefused(
            f"refused: {url!r} uses scheme {scheme or 'none'!r}; only http and https are allowed"
        )
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise OutboundRefused(f"refused: {url!r} has no host")
    try:
        ascii_host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError as err:
        raise OutboundRefused(f"refused: {host!r} is not a valid host name") from err
    default_port = 443 if scheme == "https" else 80
    real_port = port or default_port
    literal = f"[{ascii_host}]" if ":" in ascii_host else ascii_host
    host_header = literal if real_port == default_port else f"{literal}:{real_port}"
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    authorization = None
    if parts.username is not None:
        pair = f"{parts.username}:{parts.password or ''}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode()
    return _Target(scheme, ascii_host.lower(), real_port, path, host_header, authorization)


def _getaddrinfo(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (the one place DNS is asked; tests replace it)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in seen:
            seen.append(address)
    return seen


def _dns_error(host: str, err: BaseException) -> OutboundError:
    # A name that does not exist will not exist on the next attempt either.
    missing = isinstance(err, socket.gaierror) and err.errno in (
        socket.EAI_NONAME,
        getattr(socket, "EAI_NODATA", socket.EAI_NONAME),
    )
    return OutboundError(f"cannot resolve {host}: {err}", transient=not missing)


def _select(target: _Target, resolved: list[str], allowlist: Allowlist) -> list[IPAddress]:
    """The resolved addresses we may connect to; refuse when none is allowed.

    Addresses that fail the check are dropped rather than failing the call: the connection
    only ever goes to an address from the returned list, so a hostile DNS answer mixing a
    public and a private address gains nothing.
    """
    allowed: list[IPAddress] = []
    first_refusal: OutboundRefused | None = None
    for text in resolved:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        try:
            check_address(target.host, ip, allowlist)
        except OutboundRefused as err:
            first_refusal = first_refusal or err
            continue
        allowed.append(ip)
    if allowed:
        return allowed
    if first_refusal is not None:
        raise first_refusal
    raise OutboundError(f"cannot resolve {target.host}: no usable address", transient=True)


async def checked_addresses(url: str, allowlist: Allowlist) -> list[IPAddress]:
    """The addresses a request to `url` may connect to, resolved and checked as `fetch` does,
    for clients that send requests themselves (core/backends/transport.py)."""
    return await _resolve_async(_parse(url), allowlist)


def _literal_or_none(target: _Target, allowlist: Allowlist) -> list[IPAddress] | None:
    literal = _literal_ip(target.host)
    if literal is None:
        return None
    check_address(target.host, literal, allowlist)
    return [literal]


# --------------------------------------------------------------------------- requests


def _request_parts(
    headers: Mapping[str, str] | None,
    json: Any,
    content: bytes | str | None,
) -> tuple[dict[str, str], bytes | None]:
    out = {str(k): str(v) for k, v in (headers or {}).items()}
    lower = {k.lower() for k in out}
    if "user-agent" not in lower:
        out["User-Agent"] = USER_AGENT
    body: bytes | None = None
    if json is not None:
        body = _json.dumps(json).encode()
        if "content-type" not in lower:
            out["Content-Type"] = "application/json"
    elif content is not None:
        body = content.encode() if isinstance(content, str) else bytes(content)
    return out, body


def _hop_headers(base: dict[str, str], target: _Target) -> dict[str, str]:
    headers = {k: v for k, v in base.items() if k.lower() != "host"}
    headers["Host"] = target.host_header
    if target.authorization and not any(k.lower() == "authorization" for k in headers):
        headers["Authorization"] = target.authorization
    return headers


def _extensions(target: _Target, timeout: float) -> dict[str, Any]:
    ext: dict[str, Any] = {
        "timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}
    }
    if target.scheme == "https" and _literal_ip(target.host) is None:
        # Connect to the checked address, but speak TLS to (and verify) the name.
        ext["sni_hostname"] = target.host
    return ext


def _next_hop(
    target: _Target, response: httpx.Response, method: str, body: bytes | None, hops: int
) -> tuple[str, str, bytes | None]:
    if hops <= 0:
        raise OutboundError("too many redirects", transient=False)
    location = response.headers.get("location")
    if not location:
        raise OutboundError(
            f"HTTP {response.status_code} redirect without a Location header", transient=False
        )
    url = urljoin(target.logical(), location)
    status = response.status_code
    if status == 303 or (status in (301, 302) and method not in ("GET", "HEAD")):
        # What browsers do: the new request is a GET without the body.
        return url, "GET", None
    return url, method, body


def _drop_cross_origin(headers: dict[str, str], before: _Target, url: str) -> dict[str, str]:
    try:
        after = _parse(url)
    except OutboundRefused:
        return headers  # refused again, with the reason, when the hop is parsed
    if after.origin == before.origin:
        return headers
    return {k: v for k, v in headers.items() if k.lower() in _CROSS_ORIGIN_SAFE}


def _response_headers(response: httpx.Response) -> dict[str, str]:
    merged: dict[str, str] = {}
    for key, value in response.headers.multi_items():
        name = key.lower()
        merged[name] = f"{merged[name]}, {value}" if name in merged else value
    return merged


def _check_length(response: httpx.Response, max_bytes: int, url: str) -> None:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise OutboundError(
            f"response from {url} is {declared} bytes, over the limit of {max_bytes}",
            transient=False,
        )


def _too_large(url: str, max_bytes: int) -> OutboundError:
    return OutboundError(
        f"response from {url} is larger than the limit of {max_bytes} bytes", transient=False
    )


def _network_error(url: str, err: Exception) -> OutboundError:
    if isinstance(err, httpx.TimeoutException):
        return OutboundError(f"timed out calling {url}: {type(err).__name__}", transient=True)
    detail = str(err) or type(err).__name__
    return OutboundError(f"cannot reach {url}: {detail}", transient=True)


_ssl_lock = threading.Lock()
_ssl: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    """One verifying context for all calls (building one costs milliseconds)."""
    global _ssl
    with _ssl_lock:
        if _ssl is None:
            _ssl = httpx.create_ssl_context()
        return _ssl


def _client_kwargs(timeout: float) -> dict[str, Any]:
    return {
        "verify": _ssl_context(),
        # Proxies from the environment would connect somewhere we did not check.
        "trust_env": False,
        "follow_redirects": False,
        "timeout": timeout,
    }


def _timeout_error(url: str, timeout: float) -> OutboundError:
    return OutboundError(f"calling {url} took longer than {timeout:g} s", transient=True)


# --------------------------------------------------------------------------- async API


async def fetch(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    json: Any = None,
    content: bytes | str | None = None,
    params: QueryParams = None,
    # The deadline is enforced with asyncio.timeout inside.
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
    max_bytes: int = DEFAULT_MAX_BYTES,
    allowlist: "str | Iterable[str] | Allowlist | None" = None,
    max_redirects: int = DEFAULT_MAX_REDIRECTS,
) -> OutboundResponse:
    """One HTTP exchange with a user-supplied URL, under the outbound policy.

    `timeout` bounds the whole exchange (DNS, every redirect, the body); `max_bytes` the
    decoded body. `allowlist` None reads CHAINLOOM_OUTBOUND_ALLOWLIST from the environment.
    Raises OutboundRefused before any connection is made, OutboundError for failures.
    """
    allowed = Allowlist.parse(default_allowlist() if allowlist is None else allowlist)
    base_headers, body = _request_parts(headers, json, content)
    try:
        async with asyncio.timeout(timeout):
            return await _fetch_async(
                method.upper(),
                url,
                base_headers,
                body,
                params,
                timeout,
                max_bytes,
                allowed,
                max_redirects,
            )
    except TimeoutError as err:
        raise _timeout_error(url, timeout) from err


async def _resolve_async(target: _Target, allowlist: Allowlist) -> list[IPAddress]:
    literal = _literal_or_none(target, allowlist)
    if literal is not None:
        return literal
    loop = asyncio.get_running_loop()
    try:
        resolved = await loop.run_in_executor(None, _getaddrinfo, target.host, target.port)
    except OSError as err:
        raise _dns_error(target.host, err) from err
    return _select(target, resolved, allowlist)


async def _fetch_async(
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes | None,
    params: QueryParams,
    limit: float,
    max_bytes: int,
    allowlist: Allowlist,
    hops: int,
) -> OutboundResponse:
    async with httpx.AsyncClient(**_client_kwargs(limit)) as client:
        while True:
            target = _parse(url)
            addresses = await _resolve_async(target, allowlist)
            response = await _send_async(
                client, target, addresses, method, headers, body, params, limit
            )
            try:
                if response.status_code in _REDIRECTS and response.headers.get("location"):
                    new_url, method, body = _next_hop(target, response, method, body, hops)
                    headers = _drop_cross_origin(headers, target, new_url)
                    url, params, hops = new_url, None, hops - 1
                    continue
                final = target.logical(response.request.url.raw_path.decode("ascii"))
                _check_length(response, max_bytes, final)
                chunks: list[bytes] = []
                size = 0
                try:
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > max_bytes:
                            raise _too_large(final, max_bytes)
                        chunks.append(chunk)
                except httpx.HTTPError as err:
                    raise _network_error(final, err) from err
                return OutboundResponse(
                    response.status_code, _response_headers(response), b"".join(chunks), final
                )
            finally:
                await response.aclose()


async def _send_async(
    client: httpx.AsyncClient,
    target: _Target,
    addresses: list[IPAddress],
    method: str,
    headers: dict[str, str],
    body: bytes | None,
    params: QueryParams,
    limit: float,
) -> httpx.Response:
    last: Exception | None = None
    for address in addresses:
        try:
            request = client.build_request(
                method,
                target.url_for(address),
                headers=_hop_headers(headers, target),
                content=body,
                params=params,
                extensions=_extensions(target, limit),
            )
        except httpx.InvalidURL as err:
            raise OutboundRefused(
                f"refused: {target.logical()!r} is not a valid URL: {err}"
            ) from err
        try:
            return await client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as err:
            last = err  # nothing was sent: the next checked address is safe to try
        except httpx.HTTPError as err:
            raise _network_error(target.logical(), err) from err
    assert last is not None
    raise _network_error(target.logical(), last)
