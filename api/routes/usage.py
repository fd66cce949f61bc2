"""GET /usage: a tenant's monthly requests and tokens against its quotas, and its rate limits."""

import asyncio
from typing import Self

from fastapi import Query
from pydantic import Field

from api.deps import PrincipalDep, StateDep, identity_counter
from api.errors import not_found
from api.schemas import Camel, Timestamp
from api.strict_json import json_router
from core.metering.ratelimit import Verdict
from core.metering.usage import Quota, period_reset, tenant_periods

router = json_router(tags=["usage"])


class QuotaOut(Camel):
    used: int
    limit: int | None = Field(description="null = unlimited.")
    remaining: int | None
    percent_used: float | None

    @classmethod
    def of(cls, quota: Quota) -> Self:
        return cls(
            used=quota.used,
            limit=quota.limit or None,
            remaining=quota.remaining,
            percent_used=round(100 * quota.used / quota.limit, 2) if quota.limit else None,
        )


class RateLimitOut(Camel):
    limit: int
    remaining: int
    reset: int = Field(description="Epoch seconds when a slot frees up.")

    @classmethod
    def of(cls, verdict: Verdict) -> Self:
        return cls(limit=verdict.limit, remaining=max(verdict.remaining, 0), reset=verdict.reset)


class PeriodOut(Camel):
    period: str = Field(description="YYYY-MM (UTC).")
    requests: int
    tokens: int


class UsageOut(Camel):
    tenant_id: str
    period: str
    resets_at: Timestamp
    requests: QuotaOut
    tokens: QuotaOut
    rate_limit: RateLimitOut
    tenant_rate_limit: RateLimitOut
    history: list[PeriodOut]


@router.get(
    "/usage",
    response_model=UsageOut,
    summary="This month's requests and tokens against the quotas, the rate limits, and history.",
    description="`rateLimit` is the caller's own counter (its API key or user), "
    "`tenantRateLimit` the whole tenant's; both already include this request. `history` "
    "holds up to `months` calendar months (UTC), newest first.",
)
async def get_usage(
    state: StateDep,
    principal: PrincipalDep,
    months: int = Query(12, ge=1, le=120),
    tenantId: str | None = Query(None, description="Another tenant (system administrators)."),
) -> UsageOut:
    tenant_id = tenantId or principal.tenant_id
    if tenant_id != principal.tenant_id and not principal.system_admin:
        raise not_found("tenant", tenant_id)
    snapshot = await state.usage.snapshot(tenant_id)
    limiter = state.limiter
    # Peeked, not hit: require_auth already counted this request.
    own = await limiter.peek(limiter.per_identity, identity_counter(principal))
    tenant_limit = limiter.tenant_limit(await state.usage.rate_limit(tenant_id))
    whole = await limiter.peek(tenant_limit, f"tenant:{tenant_id}")
    rows = await asyncio.to_thread(tenant_periods, state.db, tenant_id, months)
    history = [PeriodOut.model_validate(row) for row in rows]
    # The stored row lags the in-memory count by up to a second; show the live numbers.
    current = PeriodOut(
        period=snapshot.period,
        requests=snapshot.requests.used,
        tokens=snapshot.tokens.used,
    )
    if history and history[0].period == snapshot.period:
        history[0] = current
    else:
        history.insert(0, current)
        del history[months:]
    return UsageOut(
        tenant_id=tenant_id,
        period=snapshot.period,
        resets_at=period_reset(snapshot.period),
        requests=QuotaOut.of(snapshot.requests),
        tokens=QuotaOut.of(snapshot.tokens),
        rate_limit=RateLimitOut.of(own),
        tenant_rate_limit=RateLimitOut.of(whole),
        history=history,
    )
