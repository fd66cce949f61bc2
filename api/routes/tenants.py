"""/tenants: the tenants (seed 002's projects) and their own quotas and rate limits (seed 004).

Everyone sees their own tenant; system administrators see, create and change all of them.
"""

import asyncio

from fastapi import Depends, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from api.deps import (
    AppState,
    Principal,
    PrincipalDep,
    StateDep,
    page_limit,
    parse_cursor,
    require_system_admin,
)
from api.errors import not_found
from api.fields import a_name
from api.schemas import Camel, Timestamp
from api.strict_json import json_router
from core.metering.ratelimit import parse_limit
from core.models import TenantRow, utcnow

router = json_router(tags=["tenants"])

# Quotas are BIGINT columns.
_MAX_QUOTA = 2**63 - 1


class TenantOut(Camel):
    id: str
    name: str
    created_at: Timestamp
    updated_at: Timestamp
    request_quota: int | None = Field(
        description="Requests a month; null = the server default, 0 = unlimited."
    )
    token_quota: int | None = Field(
        description="Model tokens a month; null = the server default, 0 = unlimited."
    )
    rate_limit: str | None = Field(
        description="Requests per window for the whole tenant, e.g. '100/minute'."
    )


class _Limits(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    request_quota: int | None = Field(None, alias="requestQuota", ge=0, le=_MAX_QUOTA)
    token_quota: int | None = Field(None, alias="tokenQuota", ge=0, le=_MAX_QUOTA)
    rate_limit: str | None = Field(None, alias="rateLimit", max_length=100)

    @field_validator("rate_limit")
    @classmethod
    def _valid_limit(cls, value: str | None) -> str | None:
        if value is None:
            return None
        text = value.strip()
        parse_limit(text, "rateLimit")  # its ValueError becomes a 422
        return text


class TenantIn(_Limits):
    name: str = Field(..., min_length=1, max_length=200)

    _name = field_validator("name")(a_name)


class TenantPatch(_Limits):
    name: str | None = Field(None, min_length=1, max_length=200)

    @field_validator("name")
    @classmethod
    def _name_not_null(cls, value: str | None) -> str:
        if value is None:
            raise ValueError("name cannot be null")
        return a_name(value)


def _get(session: Session, tenant_id: str, create: bool) -> TenantRow | None:
    """The tenant's row, made on first use if `create`: the bootstrap key's tenant (and keys
    made for a tenant by hand) never went through /register, which makes the others."""
    row = session.get(TenantRow, tenant_id)
    if row is None and create:
        row = TenantRow(id=tenant_id, name=tenant_id)
        session.add(row)
        try:
            session.commit()
        except IntegrityError:  # another request made it first
            session.rollback()
            row = session.get(TenantRow, tenant_id)
    return row


def _visible(state: AppState, principal: Principal, tenant_id: str) -> TenantRow:
    # Another tenant answers like a missing one, so ids leak nothing.
    if tenant_id != principal.tenant_id and not principal.system_admin:
        raise not_found("tenant", tenant_id)
    create = tenant_id in (principal.tenant_id, state.settings.default_tenant)
    with state.db.session() as session:
        row = _get(session, tenant_id, create)
    if row is None:
        raise not_found("tenant", tenant_id)
    return row


@router.get(
    "/tenants",
    response_model=list[TenantOut],
    summary="Lists the caller's tenant, or every tenant for a system administrator.",
)
def list_tenants(
    state: StateDep,
    principal: PrincipalDep,
    limit: str | None = None,
    cursor: str | None = Query(None, description="RFC3339Nano createdAt of the last item."),
) -> list[TenantOut]:
    if not principal.system_admin:
        return [TenantOut.model_validate(_visible(state, principal, principal.tenant_id))]
    after = parse_cursor(cursor)
    with state.db.session() as session:
        _get(session, state.settings.default_tenant, True)
        _get(session, principal.tenant_id, True)
        query = select(TenantRow)
        if after is not None:
            query = query.where(col(TenantRow.created_at) > after)
        query = query.order_by(col(TenantRow.created_at), col(TenantRow.id))
        rows = session.exec(query.limit(page_limit(limit))).all()
        return [TenantOut.model_validate(row) for row in rows]


@router.get("/tenants/{tenant_id}", response_model=TenantOut, summary="Gets one tenant.")
def get_tenant(tenant_id: str, state: StateDep, principal: PrincipalDep) -> TenantOut:
    return TenantOut.model_validate(_visible(state, principal, tenant_id))


@router.post(
    "/tenants",
    status_code=201,
    response_model=TenantOut,
    summary="Creates a tenant (system administrators only).",
)
def create_tenant(
    body: TenantIn,
    state: StateDep,
    _admin: Principal = Depends(require_system_admin),
) -> TenantOut:
    row = TenantRow(
        name=body.name,
        request_quota=body.request_quota,
        token_quota=body.token_quota,
        rate_limit=body.rate_limit,
    )
    with state.db.session() as session:
        session.add(row)
        session.commit()
        session.refresh(row)
    return TenantOut.model_validate(row)


@router.patch(
    "/tenants/{tenant_id}",
    response_model=TenantOut,
    summary="Renames a tenant or changes its quotas and rate limit (system administrators only).",
    description="Fields left out stay as they are; a quota or rateLimit of null brings back "
    "the server default. Changes apply at once.",
)
async def update_tenant(
    tenant_id: str,
    body: TenantPatch,
    state: StateDep,
    _admin: Principal = Depends(require_system_admin),
) -> TenantOut:
    changes = body.model_dump(include=body.model_fields_set)

    def save() -> TenantRow:
        with state.db.session() as session:
            row = _get(session, tenant_id, tenant_id == state.settings.default_tenant)
            if row is None:
                raise not_found("tenant", tenant_id)
            for name, value in changes.items():
                setattr(row, name, value)
            row.updated_at = utcnow()
            session.add(row)
            session.commit()
            session.refresh(row)
            return row

    row = await asyncio.to_thread(save)
    state.usage.forget(tenant_id)
    return TenantOut.model_validate(row)
