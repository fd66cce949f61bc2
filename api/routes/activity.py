"""/activity (seed 003) and /audit: a tenant's own requests, read from the request log.

Every list is newest first; `cursor` is the `at` of the last item seen. Other tenants'
entries are invisible: their ids answer 404 like missing ones.
"""

import asyncio
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Query
from sqlalchemy import func
from sqlmodel import col, select

from api.deps import PrincipalDep, StateDep, manages, page_limit, parse_cursor
from api.errors import APIError, not_found
from api.run_service import get_run_row, run_view
from core.backends.providers import public_error
from core.metering.request_log import MUTATING
from core.models import BackendRow, BackendStateRow, RequestLogRow, as_utc, rfc3339

router = APIRouter(tags=["activity"])

_CURSOR = Query(None, description="The `at` (RFC 3339) of the last item seen.")


def _view(row: RequestLogRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "at": rfc3339(row.at),
        "method": row.method,
        "path": row.path,
        "route": row.route,
        "status": row.status,
        "durationMs": row.duration_ms,
        "identity": row.identity,
        "identityKind": row.identity_kind,
        "operation": row.operation,
        "subject": row.subject,
        "subjectId": row.subject_id or None,
        "runId": row.run_id,
        "client": row.client,
        "detail": row.detail or None,
    }


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
) -> list[dict[str, Any]]:
    before = parse_cursor(cursor)
    query = select(RequestLogRow).where(RequestLogRow.tenant_id == tenant_id, *conditions)
    if before is not None:
        query = query.where(col(RequestLogRow.at) < before)
    query = query.order_by(col(RequestLogRow.at).desc(), col(RequestLogRow.id).desc())
    with state.db.session() as session:
        rows = session.exec(query.limit(page_limit(limit))).all()
    return [_view(row) for row in rows]


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
) -> list[dict[str, Any]]:
    conditions: list[Any] = []
    if method:
        conditions.append(RequestLogRow.method == method.upper())
    code = _status_filter(status)
    if code is not None:
        conditions.append(RequestLogRow.status == code)
    if identity:
        conditions.append(RequestLogRow.identity == identity)
    return await asyncio.to_thread(
        _page, state, principal.tenant_id, *conditions, limit=limit, cursor=cursor
    )


@router.get("/activity/requests/{id}", summary="One logged request.")
async def get_request(id: str, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    return _view(await asyncio.to_thread(_entry, state, principal.tenant_id, id))


@router.get(
    "/activity/requests/{id}/state",
    summary="The per-task state of the run a request started.",
)
async def request_state(id: str, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    row = await asyncio.to_thread(_entry, state, principal.tenant_id, id)
    if not row.run_id:
        raise APIError(404, "not_found", f"request {id} started no run", param="id")
    run = await asyncio.to_thread(get_run_row, state, principal, row.run_id)
    client = await state.temporal.get()
    view = (await run_view(state, client, run)).model_dump(mode="json", by_alias=True)
    return {
        "requestId": row.id,
        "runId": run.id,
        "chainId": run.chain_id,
        "status": view["status"],
        "currentTask": view["currentTask"],
        "error": view["error"],
        "state": view["state"],
    }


@router.get("/activity/stateful-requests", summary="Requests that started chain runs.")
async def stateful_requests(
    state: StateDep,
    principal: PrincipalDep,
    limit: str | None = None,
    cursor: str | None = _CURSOR,
) -> list[dict[str, Any]]:
    return await asyncio.to_thread(
        _page,
        state,
        principal.tenant_id,
        col(RequestLogRow.run_id).is_not(None),
        limit=limit,
        cursor=cursor,
    )


@router.get(
    "/activity/operations", summary="Request counts per operation and subject, latest first."
)
async def operations(state: StateDep, principal: PrincipalDep) -> list[dict[str, Any]]:
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
        {"operation": op, "subject": subject, "count": count, "lastAt": _when(last)}
        for op, subject, count, last in rows
    ]


def _when(value: datetime | str) -> str:
    # SQLite hands aggregate datetimes back as text.
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return rfc3339(as_utc(moment))


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
) -> list[dict[str, Any]]:
    return await asyncio.to_thread(
        _page,
        state,
        principal.tenant_id,
        RequestLogRow.operation == op,
        RequestLogRow.subject == subject,
        limit=limit,
        cursor=cursor,
    )


@router.get(
    "/activity/alerts",
    summary="Recent server errors and rate-limited requests, and backends now unhealthy.",
)
async def alerts(
    state: StateDep, principal: PrincipalDep, limit: str | None = None
) -> dict[str, Any]:
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
    return {
        "requests": requests,
        "backends": [
            {
                "backendId": row.backend_id,
                "name": name,
                "failures": row.failures,
                "lastError": row.last_error if detail else public_error(row.last_error),
                "downUntil": rfc3339(row.down_until) if row.down_until else None,
                "checkedAt": rfc3339(row.checked_at) if row.checked_at else None,
            }
            for row, name in down
        ],
    }


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
) -> list[dict[str, Any]]:
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
    return [
        {
            "id": row["id"],
            "at": row["at"],
            "identity": row["identity"],
            "identityKind": row["identityKind"],
            "method": row["method"],
            "path": row["path"],
            "operation": row["operation"],
            "subject": row["subject"],
            "subjectId": row["subjectId"],
            "status": row["status"],
            "runId": row["runId"],
            # What the change did to secrets: a backend approved, hook headers dropped, ...
            "detail": row["detail"],
        }
        for row in rows
    ]


def _bound(value: str | None, param: str) -> datetime | None:
    try:
        return parse_cursor(value)
    except APIError as err:
        raise APIError(
            400, "invalid_time", f"{param} {value!r} is not an RFC 3339 timestamp", param=param
        ) from err
