"""Rate limits with the `limits` library: Redis when REDIS_URL is set, else process memory.

Each request is counted against every limit that applies to it (its API key or user, and its
tenant); the headers report the tightest, so a client backing off on them never gets a 429.
"""

import logging
import math
import time
from dataclasses import dataclass

from limits import RateLimitItem, parse
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.storage import storage_from_string

from core.config import Settings

log = logging.getLogger("chainloom.ratelimit")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    limit: int
    remaining: int
    reset: int  # epoch seconds when a slot frees up

    def headers(self) -> dict[str, str]:
        values = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(max(self.remaining, 0)),
            "X-RateLimit-Reset": str(self.reset),
        }
        if not self.allowed:
            values["Retry-After"] = str(max(1, self.reset - math.floor(time.time())))
        return values


def parse_limit(text: str, setting: str) -> RateLimitItem:
    problem = f"{setting}={text!r} is not a rate limit like '600/minute'"
    # `parse` silently keeps the first of "a;b" and accepts "0/minute", which refuses everything.
    if any(sep in text for sep in ";,|"):
        raise ValueError(problem + " (give one limit)")
    try:
        item = parse(text)
    except ValueError as err:
        raise ValueError(problem) from err
    if item.amount < 1:
        raise ValueError(problem + " (the amount must be at least 1)")
    return item


class RateLimiter:
    def __init__(self, settings: Settings) -> None:
        url = settings.redis_url
        if url:
            url = "async+" + url if not url.startswith("async+") else url
            # limits defaults to coredis; redis-py is the client this project installs.
            self._storage = storage_from_string(url, implementation="redispy")
        else:
            self._storage = storage_from_string("async+memory://")
        # O(1) per hit whatever the limit (a moving window scans every hit it keeps).
        self._strategy = SlidingWindowCounterRateLimiter(self._storage)
        self.per_identity = parse_limit(settings.rate_limit, "CHAINLOOM_RATE_LIMIT")
        self.per_tenant = parse_limit(settings.tenant_rate_limit, "CHAINLOOM_TENANT_RATE_LIMIT")
        self.login = parse_limit(settings.login_rate_limit, "CHAINLOOM_LOGIN_RATE_LIMIT")
        self._overrides: dict[str, RateLimitItem] = {}

    def tenant_limit(self, override: str | None) -> RateLimitItem:
        """A tenant's own limit (TenantRow.rate_limit) if it has a valid one, else the default."""
        if not override:
            return self.per_tenant
        item = self._overrides.get(override)
        if item is None:
            try:
                item = parse_limit(override, "tenant rate_limit")
            except ValueError:
                # PATCH /tenants validates; a bad value set by hand must not lock the tenant out.
                log.warning("ignoring invalid tenant rate limit %r", override)
                item = self.per_tenant
            self._overrides[override] = item
        return item

    async def hit(self, *checks: tuple[RateLimitItem, str]) -> Verdict:
        """Counts one request against each (limit, key) pair and reports the tightest."""
        tightest: Verdict | None = None
        for item, key in checks:
            allowed = await self._strategy.hit(item, key)
            stats = await self._strategy.get_window_stats(item, key)
            verdict = Verdict(allowed, item.amount, stats.remaining, math.ceil(stats.reset_time))
            if tightest is None or _tighter(verdict, tightest):
                tightest = verdict
            if not allowed:
                return verdict
        assert tightest is not None
        return tightest

    async def peek(self, item: RateLimitItem, key: str) -> Verdict:
        """Where a counter stands, without counting a request."""
        stats = await self._strategy.get_window_stats(item, key)
        return Verdict(
            stats.remaining > 0, item.amount, stats.remaining, math.ceil(stats.reset_time)
        )

    async def reset(self) -> None:
        """Forgets every counter (tests, and operators lifting a limit at once)."""
        await self._storage.reset()  # type: ignore[misc]


def _tighter(a: Verdict, b: Verdict) -> bool:
    return a.remaining / a.limit < b.remaining / b.limit
