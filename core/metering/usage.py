"""Monthly request and token usage per tenant, and the quotas on them (seed 004).

The API counts requests in memory and flushes the counts every second, so metering costs no
database write per request; workers add tokens right after each model call, off the call's
path (TokenTally). Quotas are therefore enforced to within about a second of traffic per API
process.
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from core.background import Flusher
from core.config import Settings
from core.db import Database
from core.models import TenantRow, UsageRow, utcnow

log = logging.getLogger("chainloom.usage")


def period_of(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).strftime("%Y-%m")


def period_reset(period: str) -> datetime:
    """Start of the month after `period` (when its quotas reset)."""
    year, month = (int(x) for x in period.split("-"))
    return datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)


def add_usage(session: Session, tenant_id: str, requests: int = 0, tokens: int = 0) -> None:
    """Adds to this month's row, creating it on first use (portable upsert)."""
    period = period_of()
    for _ in range(3):
        result = session.execute(
            update(UsageRow)
            .where(col(UsageRow.tenant_id) == tenant_id, col(UsageRow.period) == period)
            .values(
                requests=col(UsageRow.requests) + requests,
                tokens=col(UsageRow.tokens) + tokens,
                updated_at=utcnow(),
            )
        )
        if getattr(result, "rowcount", 0):
            session.commit()
            return
        session.add(UsageRow(tenant_id=tenant_id, period=period, requests=requests, tokens=tokens))
        try:
            session.commit()
            return
        except IntegrityError:  # another process created it first; add to theirs
            session.rollback()
    raise RuntimeError(f"could not record usage for tenant {tenant_id}")


def record_tokens(db: Database, tenant_id: str, tokens: int) -> None:
    if tokens > 0:
        with db.session() as session:
            add_usage(session, tenant_id, tokens=tokens)


class TokenTally:
    """The model tokens a worker counts, written to the usage table right after each call but
    off its path: a model call's activity returns without waiting on the database (a write per
    call was a thread hop and a commit per step, measured in docs/benchmarks.md).

    A write waits COALESCE seconds for more counts, so a busy worker makes one write for many
    calls rather than one each (a write costs milliseconds of CPU). A failed write keeps its
    counts for the next; a worker killed with SIGKILL loses what was not written yet (at most
    the calls of the last COALESCE seconds). `pending` is added to the quota check, so
    counts not yet written still count against the quota.
    """

    COALESCE = 0.25

    def __init__(self, db: Database) -> None:
        self._db = db
        self._pending: dict[str, int] = {}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    def add(self, tenant_id: str, tokens: int) -> None:
        if tokens <= 0:
            return
        self._pending[tenant_id] = self._pending.get(tenant_id, 0) + tokens
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())
        assert self._wake is not None
        self._wake.set()

    def pending(self, tenant_id: str) -> int:
        return self._pending.get(tenant_id, 0)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            await asyncio.sleep(self.COALESCE)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        batch, self._pending = self._pending, {}
        if not batch:
            return
        try:
            await asyncio.to_thread(self._write, batch)
        except Exception:
            # The answers are already paid for: keep the counts for the next write rather than
            # fail anything.
            log.exception("could not record model tokens; kept for the next write")
            for tenant_id, tokens in batch.items():
                self._pending[tenant_id] = self._pending.get(tenant_id, 0) + tokens

    def _write(self, batch: dict[str, int]) -> None:
        with self._db.session() as session:
            for tenant_id, tokens in batch.items():
                add_usage(session, tenant_id, tokens=tokens)

    async def close(self) -> None:
        """Stop the writer and write what is left (a worker's graceful stop)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()


def _stored(db: Database, tenant_id: str, period: str) -> tuple[UsageRow | None, TenantRow | None]:
    with db.session() as session:
        return session.get(UsageRow, (tenant_id, period)), session.get(TenantRow, tenant_id)


def _own_or(quota: int | None, default: int) -> int:
    """A tenant's own quota wins over the setting, even 0 (unlimited)."""
    return default if quota is None else quota


def token_quota(db: Database, tenant_id: str, default_quota: int) -> "Quota":
    """This month's tokens against the tenant's token quota (for workers, which have no meter)."""
    row, tenant = _stored(db, tenant_id, period_of())
    limit = _own_or(tenant.token_quota if tenant else None, default_quota)
    return Quota(row.tokens if row else 0, limit)


@dataclass
class Quota:
    used: int
    limit: int  # 0 = unlimited

    @property
    def remaining(self) -> int | None:
        return None if not self.limit else max(self.limit - self.used, 0)

    @property
    def exhausted(self) -> bool:
        return bool(self.limit) and self.used >= self.limit

    def plus(self, used: int) -> "Quota":
        return Quota(self.used + used, self.limit) if used else self


@dataclass
class Snapshot:
    tenant_id: str
    period: str
    requests: Quota
    tokens: Quota
    # True when this request was not counted because the request quota was already used up.
    refused: bool = False

    def headers(self) -> dict[str, str]:
        values = {"X-Usage-Requests-Used": str(self.requests.used)}
        for name, quota in (("Requests", self.requests), ("Tokens", self.tokens)):
            if quota.limit:
                values[f"X-Usage-{name}-Remaining"] = str(quota.remaining)
                values[f"X-Usage-{name}-Percent"] = f"{100 * quota.used / quota.limit:.2f}"
        return values


@dataclass
class _Tenant:
    loaded: float
    period: str
    stored_requests: int
    stored_tokens: int
    request_quota: int
    token_quota: int
    rate_limit: str | None = None  # the tenant's own rate limit text, if it has one
    pending: int = 0
    flushing: int = field(default=0)


class UsageMeter(Flusher):
    REFRESH_SECONDS = Flusher.INTERVAL

    def __init__(self, db: Database, settings: Settings) -> None:
        self._db = db
        self._settings = settings
        self._tenants: dict[str, _Tenant] = {}
        self._lock = asyncio.Lock()
        self._flushes = 0  # completed flushes, to tell whether a load raced one

    def _load(self, tenant_id: str) -> _Tenant:
        period = period_of()
        row, tenant = _stored(self._db, tenant_id, period)
        return _Tenant(
            time.monotonic(),
            period,
            row.requests if row else 0,
            row.tokens if row else 0,
            _own_or(tenant.request_quota if tenant else None, self._settings.request_quota),
            _own_or(tenant.token_quota if tenant else None, self._settings.token_quota),
            rate_limit=tenant.rate_limit if tenant else None,
        )

    async def _entry(self, tenant_id: str) -> _Tenant:
        entry = self._tenants.get(tenant_id)
        if (
            entry is None
            or time.monotonic() - entry.loaded > self.REFRESH_SECONDS
            or entry.period != period_of()
        ):
            if entry is not None:
                entry.loaded = time.monotonic()  # one reload at a time; others use the cache
            flushes = self._flushes
            fresh = await asyncio.to_thread(self._load, tenant_id)
            current = self._tenants.get(tenant_id)
            if current is None or current.period != fresh.period:
                self._tenants[tenant_id] = fresh
                return fresh
            # Update in place: requests counted and flushes begun during the load stay counted.
            current.loaded = fresh.loaded
            current.request_quota = fresh.request_quota
            current.token_quota = fresh.token_quota
            current.rate_limit = fresh.rate_limit
            current.stored_tokens = fresh.stored_tokens
            if flushes == self._flushes and not current.flushing:
                # Only when no flush overlapped the read could it have half-seen one.
                current.stored_requests = fresh.stored_requests
            entry = current
        return entry

    def _snapshot(self, tenant_id: str, entry: _Tenant) -> Snapshot:
        used = entry.stored_requests + entry.pending + entry.flushing
        return Snapshot(
            tenant_id,
            entry.period,
            Quota(used, entry.request_quota),
            Quota(entry.stored_tokens, entry.token_quota),
        )

    async def snapshot(self, tenant_id: str) -> Snapshot:
        return self._snapshot(tenant_id, await self._entry(tenant_id))

    async def count_request(self, tenant_id: str) -> Snapshot:
        """Counts one request unless the monthly quota is used up; the caller checks that."""
        entry = await self._entry(tenant_id)
        before = self._snapshot(tenant_id, entry)
        if before.requests.exhausted:
            before.refused = True
            return before
        entry.pending += 1
        return self._snapshot(tenant_id, entry)

    async def rate_limit(self, tenant_id: str) -> str | None:
        """The tenant's own rate limit (TenantRow.rate_limit), cached like its quotas."""
        return (await self._entry(tenant_id)).rate_limit

    def forget(self, tenant_id: str) -> None:
        """Drops the cached quota, after a tenant's limits change."""
        entry = self._tenants.get(tenant_id)
        if entry is not None:
            entry.loaded = 0

    async def flush(self) -> None:
        async with self._lock:
            batch = {t: e for t, e in self._tenants.items() if e.pending}
            for entry in batch.values():
                entry.flushing, entry.pending = entry.pending, 0
            if not batch:
                return
            try:
                await asyncio.to_thread(self._write, {t: e.flushing for t, e in batch.items()})
            except Exception:
                log.exception("usage flush failed; counts are kept for the next one")
                for entry in batch.values():
                    entry.pending += entry.flushing
                    entry.flushing = 0
                self._flushes += 1
                return
            for entry in batch.values():
                entry.stored_requests += entry.flushing
                entry.flushing = 0
            self._flushes += 1

    def _write(self, counts: dict[str, int]) -> None:
        with self._db.session() as session:
            for tenant_id, count in counts.items():
                add_usage(session, tenant_id, requests=count)


def tenant_periods(db: Database, tenant_id: str, limit: int = 12) -> list[UsageRow]:
    with db.session() as session:
        query = (
            select(UsageRow)
            .where(UsageRow.tenant_id == tenant_id)
            .order_by(col(UsageRow.period).desc())
            .limit(limit)
        )
        return list(session.exec(query))
