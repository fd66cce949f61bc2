"""GET /usage: a tenant's monthly requests and tokens against its quotas, and its rate limits."""

import asyncio
from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel

from api.deps import PrincipalDep, StateDep, identity_counter
from api.errors import not_found
from core.metering.ratelimit import Verdict
from core.metering.usage import period_reset, tenant_periods
from core.models import rfc3339

router = APIRouter(tags=["usage"])


class QuotaOut(BaseModel):
    used: int
    limit: int | None  # null = unlimited
    remaining: int | None
    percentUsed: float | None


class RateLimitOut(BaseModel):
    limit: int
    remaining: int
    reset: int  # epoch seconds when a slot frees up


class PeriodOut(BaseModel):
    period: str
    requests: int
    tokens: int


class UsageOut(BaseModel):
    tenantId: str
    period: str
    resetsAt: str
    requests: QuotaOut
    tokens: QuotaOut
    rateLimit: RateLimitOut
    tenantRateLimit: RateLimitOut
    history: list[PeriodOut]


def _limit_json(verdict: Verdict) -> dict[str, int]:
    return {"limit": verdict.limit, "remaining": max(verdict.remaining, 0), "reset": verdict.reset}


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
) -> dict[str, Any]:
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
    history: list[dict[str, Any]] = [
        {"period": r.period, "requests": r.requests, "tokens": r.tokens} for r in rows
    ]
    # The stored row lags the in-memory count by up to a second; show the live numbers.
    current = {
        "period": snapshot.period,
        "requests": snapshot.requests.used,
        "tokens": snapshot.tokens.used,
    }
    if history and history[0]["period"] == snapshot.period:
        history[0].update(current)
    else:
        history.insert(0, current)
        del history[months:]
    return {
        "tenantId": tenant_id,
        "period": snapshot.period,
        "resetsAt": rfc3339(period_reset(snapshot.period)),
        "requests": snapshot.requests.as_dict(),
        "tokens": snapshot.tokens.as_dict(),
        "rateLimit": _limit_json(own),
        "tenantRateLimit": _limit_json(whole),
        "history": history,
    }
