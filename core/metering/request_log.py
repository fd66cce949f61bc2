"""The request log behind /activity and /audit (docs/operations.md).

Every authenticated request becomes one RequestLogRow. Changes (POST, PUT, PATCH, DELETE)
are the audit log, so they are written before their response goes out; reads are buffered
and written once a second, so a crash loses at most about a second of read entries.
"""

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete
from sqlalchemy.exc import OperationalError
from sqlmodel import col

from core.background import Flusher
from core.db import Database
from core.identity.permissions import SEGMENT_TYPES, STARTS_RUNS
from core.models import RequestLogRow, utcnow

log = logging.getLogger("chainloom.request_log")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
UNLOGGED_PATHS = frozenset({"/health", "/ready", "/ping"})
_OPERATIONS = {"GET": "read", "HEAD": "read", "POST": "create", "PUT": "update", "PATCH": "update"}
_OPERATIONS["DELETE"] = "delete"
# Reads waiting for a flush are capped so a database outage cannot exhaust memory.
_MAX_PENDING = 10_000

# The middleware gives each request a fresh holder; start_run fills it. A mutable holder
# (not the value itself) so the id survives contexts copied into threads or child tasks.
_run_holder: ContextVar[dict[str, str] | None] = ContextVar("chainloom_run_holder", default=None)


def open_run_holder() -> tuple[dict[str, str], Any]:
    holder: dict[str, str] = {}
    return holder, _run_holder.set(holder)


def close_run_holder(token: Any) -> None:
    _run_holder.reset(token)


def note_run(run_id: str) -> None:
    """Marks the current request as the one that started run `run_id`."""
    holder = _run_holder.get()
    if holder is not None:
        holder["run_id"] = run_id


def note_change(text: str) -> None:
    """Adds `text` to the current request's audit entry (its `detail`): what a change did to
    secrets and where they go, which the method and path alone do not tell."""
    holder = _run_holder.get()
    if holder is not None:
        prior = holder.get("detail")
        holder["detail"] = f"{prior}; {text}" if prior else text


def operation_of(method: str, template: str) -> str:
    if method == "POST":
        if template.rstrip("/") in STARTS_RUNS:
            return "execute"
        parts = template.strip("/").split("/")
        # POST /runs/{id}/cancel and the like are actions on an existing resource.
        if len(parts) >= 3 and parts[-2].startswith("{") and not parts[-1].startswith("{"):
            return parts[-1][:32]
    return _OPERATIONS.get(method, method.lower()[:32])


def entry(
    scope: Mapping[str, Any],
    status: int,
    duration_ms: float,
    run_id: str | None,
    detail: str = "",
) -> RequestLogRow | None:
    """The log row of a finished request, or None when it is not logged."""
    principal = (scope.get("state") or {}).get("principal")
    path = str(scope.get("path", ""))
    if principal is None or path in UNLOGGED_PATHS:
        return None  # unauthenticated requests belong to no tenant
    route = scope.get("route")
    template = str(getattr(route, "path", "") or "")
    method = str(scope.get("method", "GET")).upper()
    segment = (template or path).strip("/").split("/", 1)[0]
    params = scope.get("path_params") or {}
    subject_id = str(next(iter(params.values()))) if params else ""
    client = scope.get("client")
    return RequestLogRow(
        tenant_id=principal.tenant_id,
        method=method[:10],
        path=path[:2000],
        route=template[:400],
        status=status,
        duration_ms=round(duration_ms, 3),
        identity=principal.identity[:64],
        identity_kind=principal.kind[:16],
        operation=operation_of(method, template or path)[:32],
        subject=SEGMENT_TYPES.get(segment, segment)[:64],
        subject_id=subject_id[:400],
        run_id=run_id,
        client=str(client[0])[:64] if client else "",
        # A refused change did nothing, whatever the route meant to note.
        detail=detail[:2000] if status < 400 else "",
    )


class RequestLog(Flusher):
    PRUNE_SECONDS = 3600.0

    def __init__(self, db: Database, retention_days: float = 0) -> None:
        self._db = db
        self._retention_days = retention_days
        self._pruned_at = -math.inf
        self._pending: list[RequestLogRow] = []
        self._lock = asyncio.Lock()

    def prune(self, now: datetime | None = None) -> int:
        """Deletes entries older than the retention period; returns how many."""
        if self._retention_days <= 0:
            return 0
        cutoff = (now or utcnow()) - timedelta(days=self._retention_days)
        with self._db.session() as session:
            result = session.execute(delete(RequestLogRow).where(col(RequestLogRow.at) < cutoff))
            session.commit()
        return int(getattr(result, "rowcount", 0) or 0)

    async def _maybe_prune(self) -> None:
        if time.monotonic() - self._pruned_at < self.PRUNE_SECONDS:
            return
        self._pruned_at = time.monotonic()
        try:
            removed = await asyncio.to_thread(self.prune)
        except Exception:
            log.exception("request log pruning failed; trying again in an hour")
            return
        if removed:
            log.info(
                "request log: removed %d entries older than %s days", removed, self._retention_days
            )

    def _write(self, rows: list[RequestLogRow]) -> None:
        with self._db.session() as session:
            session.add_all(rows)
            session.commit()

    def _write_each(self, rows: list[RequestLogRow]) -> list[RequestLogRow]:
        """After a batch failed: writes rows one by one, returns those worth retrying.

        A row the database refuses is dropped, so it cannot block every later flush; one
        that failed because the database is unreachable is kept.
        """
        kept: list[RequestLogRow] = []
        for row in rows:
            try:
                self._write([row])
            except OperationalError:
                kept.append(row)
            except Exception:
                log.exception("dropping request log entry %s %s", row.method, row.path)
        return kept

    async def record(self, row: RequestLogRow) -> None:
        if row.method not in MUTATING:
            self._buffer([row])
            return
        try:
            await asyncio.to_thread(self._write, [row])
        except Exception:
            # The change itself is done; keep its entry for the next flush rather than fail it.
            log.exception("audit entry not written; retrying with the next flush")
            self._buffer([row])

    def _buffer(self, rows: list[RequestLogRow]) -> None:
        room = _MAX_PENDING - len(self._pending)
        if room < len(rows):
            log.warning("request log buffer full; dropping %d entries", len(rows) - max(room, 0))
        self._pending.extend(rows[: max(room, 0)])

    async def flush(self) -> None:
        async with self._lock:
            batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                await asyncio.to_thread(self._write, batch)
            except Exception:
                kept = await asyncio.to_thread(self._write_each, batch)
                if kept:
                    log.warning("request log: keeping %d entries for the next flush", len(kept))
                    self._pending[:0] = kept[: _MAX_PENDING - len(self._pending)]

    async def tick(self) -> None:
        await self.flush()
        await self._maybe_prune()
