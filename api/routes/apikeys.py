"""/api-keys: a tenant's API keys (seed 004), shown once at creation and stored as SHA-256.

require_auth already demands `manage` on apikeys for every route here, and it reads the key
row on every request, so a revocation locks the key out on its very next request.
"""

from datetime import UTC, datetime, timedelta

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlmodel import Session

from api.deps import Principal, PrincipalDep, StateDep, levels_everywhere, owned, tenant_page
from api.errors import APIError
from api.fields import a_name
from api.schemas import Camel, Timestamp
from api.strict_json import json_router
from core.identity.credentials import new_api_key
from core.identity.permissions import RANK, RESOURCE_TYPES, SCOPE_LEVELS, valid_scope
from core.models import ApiKeyRow, utcnow

router = json_router(tags=["api-keys"])

_CURSOR = Query(None, description="RFC3339Nano createdAt of the last item.")


class ApiKeyIn(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    name: str = Field(..., min_length=1, max_length=200)
    scopes: list[str] = Field(default_factory=lambda: ["read"], max_length=100)
    expires_at: datetime | None = Field(None, alias="expiresAt")
    expires_in_days: int | None = Field(None, alias="expiresInDays", ge=1, le=36500)

    _name = field_validator("name")(a_name)


class ApiKeyOut(Camel):
    id: str
    name: str
    prefix: str
    scopes: list[str]
    created_at: Timestamp
    expires_at: Timestamp | None
    last_used_at: Timestamp | None
    revoked_at: Timestamp | None


class NewApiKeyOut(ApiKeyOut):
    key: str = Field(description="The key itself: shown in this answer only.")


def issue_key(
    session: Session,
    tenant_id: str,
    user_id: str | None,
    name: str,
    scopes: list[str],
    expires_at: datetime | None = None,
) -> tuple[ApiKeyRow, str]:
    """Adds a new key to the session (the caller commits); the plaintext is never stored."""
    new = new_api_key()
    row = ApiKeyRow(
        tenant_id=tenant_id,
        user_id=user_id,
        name=name,
        prefix=new.prefix,
        key_hash=new.digest,
        scopes=scopes,
        expires_at=expires_at,
    )
    session.add(row)
    return row, new.plain


def _check_scopes(scopes: list[str]) -> list[str]:
    if not scopes:
        raise APIError(422, "invalid_scope", "scopes must not be empty", param="scopes")
    for scope in scopes:
        if not valid_scope(scope):
            raise APIError(
                422,
                "invalid_scope",
                f"scope {scope!r} is not valid: use read, write or admin, optionally "
                f"prefixed by a resource type ({', '.join(sorted(RESOURCE_TYPES))}) and ':'",
                param="scopes",
            )
    return list(dict.fromkeys(scopes))


def _check_grantable(state: StateDep, principal: Principal, scopes: list[str]) -> None:
    """A key may not carry more than its creator holds; otherwise apikeys:admin is everything."""
    levels = levels_everywhere(state, principal)
    for scope in scopes:
        kind, sep, name = scope.rpartition(":")
        wanted = SCOPE_LEVELS[name]
        for resource_type in [kind] if sep else list(RESOURCE_TYPES):
            held = levels[resource_type]
            if RANK[held] < RANK[wanted]:
                raise APIError(
                    403,
                    "forbidden",
                    f"scope {scope!r} needs {wanted} on {resource_type}; "
                    f"this {principal.kind} has {held}",
                    param="scopes",
                )


def _expiry(body: ApiKeyIn) -> datetime | None:
    if body.expires_at is not None and body.expires_in_days is not None:
        raise APIError(
            422, "invalid_expiry", "give expiresAt or expiresInDays, not both", param="expiresAt"
        )
    if body.expires_in_days is not None:
        return utcnow() + timedelta(days=body.expires_in_days)
    if body.expires_at is None:
        return None
    moment = body.expires_at
    try:
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except OverflowError as err:  # 9999-12-31T23:59:59-05:00 is past datetime.max in UTC
        raise APIError(
            422, "invalid_expiry", "expiresAt is out of range", param="expiresAt"
        ) from err
    if moment <= utcnow():
        raise APIError(422, "invalid_expiry", "expiresAt is in the past", param="expiresAt")
    return moment


@router.post(
    "/api-keys",
    status_code=201,
    response_model=NewApiKeyOut,
    summary="Creates an API key; the key itself is returned only in this response.",
)
def create_api_key(body: ApiKeyIn, state: StateDep, principal: PrincipalDep) -> NewApiKeyOut:
    scopes = _check_scopes(body.scopes)
    expires_at = _expiry(body)
    _check_grantable(state, principal, scopes)
    with state.db.session() as session:
        row, plain = issue_key(
            session, principal.tenant_id, principal.user_id, body.name, scopes, expires_at
        )
        session.commit()
        return NewApiKeyOut.from_row(row, key=plain)


@router.get(
    "/api-keys",
    response_model=list[ApiKeyOut],
    summary="Lists the tenant's API keys (revoked ones included), oldest first.",
)
def list_api_keys(
    state: StateDep,
    principal: PrincipalDep,
    limit: str | None = None,
    cursor: str | None = _CURSOR,
) -> list[ApiKeyOut]:
    with state.db.session() as session:
        rows = session.exec(tenant_page(ApiKeyRow, principal.tenant_id, limit, cursor)).all()
        return [ApiKeyOut.model_validate(row) for row in rows]


@router.get("/api-keys/{id}", response_model=ApiKeyOut, summary="Retrieves an API key.")
def get_api_key(id: str, state: StateDep, principal: PrincipalDep) -> ApiKeyOut:
    with state.db.session() as session:
        row = owned(session, ApiKeyRow, id, principal.tenant_id, "api key")
        return ApiKeyOut.model_validate(row)


@router.delete(
    "/api-keys/{id}",
    response_model=str,
    summary="Revokes an API key; it is refused from its next request on.",
)
def revoke_api_key(id: str, state: StateDep, principal: PrincipalDep) -> str:
    with state.db.session() as session:
        row = owned(session, ApiKeyRow, id, principal.tenant_id, "api key")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            session.add(row)
            session.commit()
    return "api key revoked"
