"""The outbound policy for model servers: an httpx transport for the openai and ollama clients.

The SDKs build and send their own requests, so they cannot go through core.outbound.fetch.
Their httpx client gets this transport instead. For every request it sends (each redirect hop
too: the client follows redirects through its transport) it

- resolves the host and checks the addresses with core.outbound's policy, against
  CHAINLOOM_BACKEND_ALLOWLIST (model servers usually live on a private network, so they have
  an allowlist of their own, apart from the hooks' CHAINLOOM_OUTBOUND_ALLOWLIST);
- connects only to an address it checked, keeping the original Host header and TLS SNI (and
  certificate check) for the name, so DNS rebinding cannot swap the address afterwards;
- drops the Authorization header when the backend is not meant to hold a key (the ollama
  client adds OLLAMA_API_KEY from the environment to every request otherwise).

Nothing about which addresses are allowed is decided here: that is core.outbound's.
"""

import asyncio
import ipaddress
from typing import Any

import httpx

from core.outbound import Allowlist, OutboundError, checked_addresses

BACKEND_ALLOWLIST_ENV = "CHAINLOOM_BACKEND_ALLOWLIST"


def backend_allowlist(value: "str | Allowlist | None" = None) -> Allowlist:
    """The model servers' allowlist; None reads CHAINLOOM_BACKEND_ALLOWLIST."""
    if value is None:
        from core.config import get_settings

        value = get_settings().backend_allowlist
    return Allowlist.parse(value, setting=BACKEND_ALLOWLIST_ENV)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class PolicyTransport(httpx.AsyncBaseTransport):
    """Sends each request to an address the outbound policy allows, or raises
    core.outbound.OutboundRefused (OutboundError when the name does not resolve)."""

    def __init__(self, allowlist: Allowlist, *, authorization: bool = True) -> None:
        self._allowlist = allowlist
        self._authorization = authorization
        # httpx clients given a transport ignore proxy variables, and this one connects
        # directly: a proxy would connect somewhere the policy did not check.
        self._inner = httpx.AsyncHTTPTransport(retries=0)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        # Resolving is part of connecting: a resolver that hangs must not outlast the
        # client's connect timeout (a status probe has 3 s).
        limit = (request.extensions.get("timeout") or {}).get("connect")
        try:
            async with asyncio.timeout(limit):
                addresses = await checked_addresses(str(url), self._allowlist)
        except TimeoutError as err:
            raise OutboundError(f"cannot resolve {url.host}: timed out") from err
        headers = request.headers.copy()  # Host is already the name the caller asked for
        if not self._authorization:
            headers.pop("authorization", None)
        extensions: dict[str, Any] = dict(request.extensions)
        host = url.raw_host.decode("ascii")
        if url.scheme == "https" and not _is_ip(host):
            extensions["sni_hostname"] = host
        last: Exception | None = None
        for address in addresses:
            hop = httpx.Request(
                request.method,
                url.copy_with(host=str(address)),
                headers=headers,
                stream=request.stream,
                extensions=extensions,
            )
            try:
                return await self._inner.handle_async_request(hop)
            except (httpx.ConnectError, httpx.ConnectTimeout) as err:
                last = err  # nothing was sent: the next checked address is safe to try
        assert last is not None
        raise last

    async def aclose(self) -> None:
        await self._inner.aclose()
