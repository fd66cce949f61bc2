"""Shared dependencies: settings, database, Temporal client, and the API-key check."""

import asyncio
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session, col, select
from temporalio.client import Client

from api.errors import APIError, not_found
from core.config import Settings
from core.db import Database
from core.temporal import connect, ensure_search_attributes

T = TypeVar("T")


class TemporalHolder:
    """Connects on first use, so the API starts (and /health answers) without Temporal."""

    def __init__(self, settings: Settings, client: Client | None = None) -> None:
        self._settings = settings
        self._client = client
        self._lock = asyncio.Lock()

    async def get(self) -> Client:
        if self._client is not None:
            return self._client
        async with self._lock:
            if self._client is None:
                try:
                    client = await connect(self._settings)
                    await ensure_search_attributes(client)
                except (TimeoutError, RuntimeError, OSError) as err:
                    raise APIError(
                        503,
                        "temporal_unavailable",
                        f"cannot reach Temporal at {self._settings.temporal_address}: {err}",
                    ) from err
                self._client = client
        return self._client


@dataclass
class AppState:
    settings: Settings
    db: Database
    temporal: TemporalHolder


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.chainloom
    return state


StateDep = Annotated[AppState, Depends(get_state)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)


@dataclass
class Principal:
    tenant_id: str
    key_id: str


def require_auth(
    state: StateDep,
    api_key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    presented = api_key or (bearer.credentials if bearer else None)
    if not presented:
        raise APIError(
            401,
            "missing_api_key",
            "authentication required: send the API key in X-API-Key or Authorization: Bearer",
            headers={"WWW-Authenticate": "Bearer"},
        )
    expected = state.settings.api_key
    if not expected or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise APIError(
            401,
            "invalid_api_key",
            "the API key is not valid",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return Principal(tenant_id=state.settings.default_tenant, key_id="bootstrap")


PrincipalDep = Annotated[Principal, Depends(require_auth)]


def parse_cursor(cursor: str | None) -> datetime | None:
    if not cursor:
        return None
    text = cursor.strip().replace("Z", "+00:00")
    # RFC3339Nano carries up to nine fraction digits; Python takes six.
    if "." in text:
        head, _, rest = text.partition(".")
        digits = rest[: len(rest) - len(rest.lstrip("0123456789"))]
        zone = rest[len(digits) :]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        value = datetime.fromisoformat(text)
    except ValueError as err:
        raise APIError(
            400, "invalid_cursor", f"cursor {cursor!r} is not an RFC 3339 timestamp", param="cursor"
        ) from err
    # Stored times are UTC (SQLite compares them as text): bring every cursor to UTC.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def page_limit(limit: str | None, default: int = 100, maximum: int = 1000) -> int:
    if limit is None or limit == "":
        return default
    try:
        value = int(limit)
    except ValueError as err:
        raise APIError(
            400, "invalid_limit", f"limit {limit!r} is not a number", param="limit"
        ) from err
    if value < 1:
        raise APIError(400, "invalid_limit", "limit must be at least 1", param="limit")
    return min(value, maximum)


def tenant_page(table: Any, tenant_id: str, limit: str | None, cursor: str | None) -> Any:
    """One page of a tenant's rows, oldest first, after the `cursor` (a createdAt).

    The seed pages every list by creation time; ties are broken by primary key so a page
    boundary never drops a row.
    """
    after = parse_cursor(cursor)
    query = select(table).where(table.tenant_id == tenant_id)
    if after is not None:
        query = query.where(col(table.created_at) > after)
    keys = [col(c) for c in table.__table__.primary_key.columns]
    return query.order_by(col(table.created_at), *keys).limit(page_limit(limit))


def owned(session: Session, table: type[T], ident: str, tenant_id: str, kind: str) -> T:
    """The row `ident` of an id-keyed table, if it belongs to the tenant; else a 404.

    Another tenant's row answers exactly like a missing one, so ids leak nothing.
    """
    row = session.get(table, ident)
    if row is None or getattr(row, "tenant_id", None) != tenant_id:
        raise not_found(kind, ident)
    return row
