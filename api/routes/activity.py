"""/activity (seed 003) and /audit: a tenant's own requests, read from the request log.

Every list is newest first; `cursor` is the `at` of the last item seen. Other tenants'
entries are invisible: their ids answer 404 like missing ones.
"""

import asyncio
from datetime import datetime
from typing import Any

from fastapi import Query
from pydantic import Field, field_validator
from sqlalchemy import func
from sqlmodel import col, select

from api.deps import PrincipalDep, StateDep, manages, page_limit, parse_cursor
from api.errors import APIError, not_found
from api.run_models import CapturedStateUnit, RunStatus
from api.run_service import get_run_row, run_view
from api.schemas import Camel, Timestamp
from api.strict_json import json_router
from core.backends.providers import public_error
from core.metering.request_log import MUTATING
from core.models import BackendRow, BackendStateRow, RequestLogRow

router = json_router(tags=["activity"])

_CURSOR = Query(None, description="The `at` (RFC 3339) of the last item seen.")


class AuditEntry(Camel):
    """A change: who made it, to what, when and with what outcome."""

    id: str
    at: Timestamp
    identity: str = Field(description="The user or API key id that made the request.")
    identity_kind: str
    method: str
    path: str
    operation: str = Field(description="create, update, delete, read, ...")
    subject: str = Field(description="The resource type.")
    subject_id: str | None
    status: int
    run_id: str | None
    detail: str | None = Field(
        description="What the change did to secrets: a backend approved, hook headers "
        "dropped, a provider key bound."
    )

    @field_validator("subject_id", "detail", mode="before")
    @classmethod
    def _empty_as_null(cls, value: str | None) -> str | None:
        return value or None


class RequestOut(AuditEntry):
    """One logged request."""

    route: str = Field(description="The route template, e.g. /backends/{id}.")
    duration_ms: float
    client: str = Field(description="The client's address.")


class RequestRunState(Camel):
    request_id: str
    run_id: str
    chain_id: str
    status: RunStatus
    current_task: str | None
    error: str | None
    state: list[CapturedStateUnit]


class OperationCount(Camel):
    operation: str
    subject: str
    count: int
    last_at: Timestamp


class UnhealthyBackend(Camel):
    backend_id: str
    name: str | None = Field(description="null when the backend was deleted since.")
    failures: int
    last_error: str
    down_until: Timestamp | None
    checked_at: Timestamp | None


class Alerts(Camel):
    requests: list[RequestOut] = Field(description="Server errors and 429s, newest first.")
    backends: list[UnhealthyBackend]


def _status_filter(status: str | None) -> int | None:
    if status is None or status == "":
        return None
    try:
        value = int(status)
    except ValueError as err:
        raise APIError(
            400, "invalid_status", f"status {status!r} is not an HTTP status", param="status"
        ) from err
    if not 100 <= value <= 599:
        raise APIError(400, "invalid_status", "status must be 100 to 599", param="status")
    return value


def _page(
    state: StateDep,
    tenant_id: str,
    *conditions: Any,
    limit: str | None,
    cursor: str | None,
) -> list[RequestLogRow]:
    before = parse_cursor(cursor)
    query = select(RequestLogRow).where(RequestLogRow.tenant_id == tenant_id, *conditions)
    if before is not None:
        query = query.where(col(RequestLogRow.at) < before)
    query = query.order_by(col(RequestLogRow.at).desc(), col(RequestLogRow.id).desc())
    with state.db.session() as session:
        return list(session.exec(query.limit(page_limit(limit))).all())


def _entry(state: StateDep, tenant_id: str, ident: str) -> RequestLogRow:
    with state.db.session() as session:
        row = session.exec(
            select(RequestLogRow).where(
                RequestLogRow.id == ident, RequestLogRow.tenant_id == tenant_id
            )
        ).first()
    if row is None:
        raise not_found("request", ident)
    return row


@router.get("/activity/requests", summary="The tenant's recent requests, newest first.")
async def list_requests(
    state: StateDep,
    principal: PrincipalDep,
    method: str | None = None,
    status: str | None = None,
    identity: str | None = None,
    limit: str | None = None,
    cursor: str | None = _CURSOR,
) -> list[RequestOut]:
    conditions: list[Any] = []
    if method:
        conditions.append(RequestLogRow.method == method.upper())
    code = _status_filter(status)
    if code is not None:
        conditions.append(RequestLogRow.status == code)
    if identity:
        conditions.append(RequestLogRow.identity == identity)
    rows = await asyncio.to_thread(
        _page, state, principal.tenant_id, *conditions, limit=limit, cursor=cursor
    )
    return [RequestOut.model_validate(row) for row in rows]


@router.get("/activity/requests/{id}", summary="One logged request.")
async def get_request(id: str, state: StateDep, principal: PrincipalDep) -> RequestOut:
    return RequestOut.model_validate(
        await asyncio.to_thread(_entry, state, principal.tenant_id, id)
    )


@router.get(
    "/activity/requests/{id}/state",
    summary="The per-task state of the run a request started.",
)
async def request_state(id: str, state: StateDep, principal: PrincipalDep) -> RequestRunState:
    row = await asyncio.to_thread(_entry, state, principal.tenant_id, id)
    if not row.run_id:
        raise APIError(404, "not_found", f"request {id} started no run", param="id")
    run = await asyncio.to_thread(get_run_row, state, principal, row.run_id)
    client = await state.temporal.get()
    view = await run_view(state, client, run)
    return RequestRunState(
        request_id=row.id,
        run_id=run.id,
        chain_id=run.chain_id,
        status=view.status,
        current_task=view.current_task,
        error=view.error,
        state=view.state,
    )


@router.get("/activity/stateful-requests", summary="Requests that started chain runs.")
async def stateful_requests(
    state: StateDep,
    principal: PrincipalDep,
    limit: str | None = None,
    cursor: str | None = _CURSOR,
) -> list[RequestOut]:
    rows = await asyncio.to_thread(
        _page,
        state,
        principal.tenant_id,
        col(RequestLogRow.run_id).is_not(None),
        limit=limit,
        cursor=cursor,
    )
    return [RequestOut.model_validate(row) for row in rows]


@router.get(
    "/activity/operations", summary="Request counts per operation and subject, latest first."
)
async def operations(state: StateDep, principal: PrincipalDep) -> list[OperationCount]:
    def load() -> list[Any]:
        last = func.max(RequestLogRow.at)
        query = (
            select(RequestLogRow.operation, RequestLogRow.subject, func.count(), last)
            .where(RequestLogRow.tenant_id == principal.tenant_id)
            .group_by(col(RequestLogRow.operation), col(RequestLogRow.subject))
            .order_by(last.desc())
        )
        with state.db.session() as session:
            return list(session.exec(query).all())

    rows = await asyncio.to_thread(load)
    return [
        OperationCount(operation=op, subject=subject, count=count, last_at=_when(last))
        for op, subject, count, last in rows
    ]


def _when(value: datetime | str) -> datetime:
    # SQLite hands aggregate datetimes back as text.
    return datetime.fromisoformat(value) if isinstance(value, str) else value


@router.get(
    "/activity/operations/{op}/{subject}", summary="Requests of one operation on one subject."
)
async def operation_requests(
    op: str,
    subject: str,
    state: StateDep,
    principal: PrincipalDep,
    limit: str | None = None,
    cursor: str | None = _CURSOR,
) -> list[RequestOut]:
    rows = await asyncio.to_thread(
        _page,
        state,
        principal.tenant_id,
        RequestLogRow.operation == op,
        RequestLogRow.subject == subject,
        limit=limit,
        cursor=cursor,
    )
    return [RequestOut.model_validate(row) for row in rows]


@router.get(
    "/activity/alerts",
    summary="Recent server errors and rate-limited requests, and backends now unhealthy.",
)
async def alerts(state: StateDep, principal: PrincipalDep, limit: str | None = None) -> Alerts:
    failing = (col(RequestLogRow.status) >= 500) | (col(RequestLogRow.status) == 429)
    requests = await asyncio.to_thread(
        _page, state, principal.tenant_id, failing, limit=limit, cursor=None
    )

    def backends() -> list[Any]:
        query = (
            select(BackendStateRow, BackendRow.name)
            .join(BackendRow, col(BackendRow.id) == col(BackendStateRow.backend_id), isouter=True)
            .where(
                BackendStateRow.tenant_id == principal.tenant_id,
                col(BackendStateRow.healthy).is_(False),
            )
        )
        with state.db.session() as session:
            return list(session.exec(query).all())

    down = await asyncio.to_thread(backends)
    detail = await asyncio.to_thread(manages, state, principal, "backends")
    return Alerts(
        requests=[RequestOut.model_validate(row) for row in requests],
        backends=[
            UnhealthyBackend.from_row(
                row,
                name=name,
                last_error=row.last_error if detail else public_error(row.last_error),
            )
            for row, name in down
        ],
    )


@router.get("/audit", summary="The tenant's changes (who, what, when), newest first.")
async def audit(
    state: StateDep,
    principal: PrincipalDep,
    identity: str | None = None,
    subject: str | None = None,
    from_: str | None = Query(None, alias="from", description="RFC 3339; inclusive."),
    to: str | None = Query(None, description="RFC 3339; exclusive."),
    limit: str | None = None,
    cursor: str | None = _CURSOR,
) -> list[AuditEntry]:
    conditions: list[Any] = [col(RequestLogRow.method).in_(sorted(MUTATING))]
    if identity:
        conditions.append(RequestLogRow.identity == identity)
    if subject:
        conditions.append(RequestLogRow.subject == subject)
    start, end = _bound(from_, "from"), _bound(to, "to")
    if start is not None:
        conditions.append(col(RequestLogRow.at) >= start)
    if end is not None:
        conditions.append(col(RequestLogRow.at) < end)
    rows = await asyncio.to_thread(
        _page, state, principal.tenant_id, *conditions, limit=limit, cursor=cursor
    )
    return [AuditEntry.model_validate(row) for row in rows]


def _bound(value: str | None, param: str) -> datetime | None:
    try:
        return parse_cursor(value)
    except APIError as err:
        raise APIError(
            400, "invalid_time", f"{param} {value!r} is not an RFC 3339 timestamp", param=param
        ) from err
