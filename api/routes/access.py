"""/access-control and /permissions (seed 003): per-identity permission levels on resources.

The entries are read by api.deps.require_auth on every request, so a change applies to the
very next request of that identity.
"""

import asyncio
from collections.abc import Sequence
from typing import Literal, Self

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from api.deps import (
    AppState,
    Principal,
    PrincipalDep,
    StateDep,
    effective_level,
    owned,
    page_limit,
    parse_cursor,
)
from api.errors import APIError
from api.schemas import Camel, Timestamp
from api.strict_json import json_router
from core.identity.permissions import LEVELS, RANK, RESOURCE_TYPES
from core.models import AccessEntryRow, ApiKeyRow, MembershipRow, UserRow, utcnow

router = json_router(tags=["access-control"])

_TYPES = sorted(RESOURCE_TYPES)


class AccessEntryIn(BaseModel):
    """seed 003 accessservice_AccessEntryRequest; read-only fields are accepted and ignored."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    identity: str = Field(..., min_length=1, max_length=64, description="A user or API key id.")
    resource: str = Field(
        "*", min_length=1, max_length=400, description="A resource id, or * for all of the type."
    )
    resource_type: str = Field(..., alias="resourceType", description=f"One of {_TYPES}.")
    permission: str = Field(..., description="none, view, edit or manage.")

    @field_validator("resource_type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in RESOURCE_TYPES:
            raise ValueError(f"resourceType must be one of {', '.join(_TYPES)}")
        return value

    @field_validator("permission")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value not in LEVELS:
            raise ValueError(f"permission must be one of {', '.join(LEVELS)}")
        return value


class UserIdentity(Camel):
    id: str
    email: str
    friendly_name: str
    role: str = Field(description="The user's role in the tenant.")


class KeyIdentity(Camel):
    id: str
    name: str
    prefix: str


class GoneIdentity(Camel):
    """The identity was deleted since: the entry is inert."""

    model_config = ConfigDict(extra="forbid")


# What an entry's identity is: a user or an API key of the tenant, as the entry shows it.
Identity = tuple[Literal["user", "key"], UserIdentity | KeyIdentity]


class AccessEntryOut(Camel):
    """seed 003 accessservice_AccessEntry."""

    id: str
    identity: str
    identity_type: Literal["user", "key", "unknown"]
    resource: str
    resource_type: str
    permission: str
    created_at: Timestamp
    updated_at: Timestamp
    identity_details: UserIdentity | KeyIdentity | GoneIdentity | None = Field(
        description="The identity, with `expand=user` (and on create and update)."
    )

    @classmethod
    def of(cls, row: AccessEntryRow, expand: bool, identity: Identity | None) -> Self:
        kind, details = identity or ("unknown", GoneIdentity())
        return cls.from_row(row, identity_type=kind, identity_details=details if expand else None)


def _identities(session: Session, tenant_id: str, ids: set[str]) -> dict[str, Identity]:
    """The users and API keys of the tenant among `ids`, in two queries whatever their number."""
    found: dict[str, Identity] = {}
    members = session.exec(
        select(MembershipRow, UserRow)
        .join(UserRow, col(UserRow.id) == col(MembershipRow.user_id))
        .where(MembershipRow.tenant_id == tenant_id, col(MembershipRow.user_id).in_(ids))
    )
    for member, user in members:
        found[user.id] = ("user", UserIdentity.from_row(user, role=member.role))
    rest = ids - found.keys()
    if rest:
        keys = session.exec(
            select(ApiKeyRow).where(ApiKeyRow.tenant_id == tenant_id, col(ApiKeyRow.id).in_(rest))
        )
        for key in keys:
            found[key.id] = ("key", KeyIdentity.model_validate(key))
    return found


def _identity_of(session: Session, tenant_id: str, identity: str) -> Identity:
    """A user or API key of the tenant; 422 for anyone else's."""
    found = _identities(session, tenant_id, {identity}).get(identity)
    if found is None:
        raise APIError(
            422,
            "unknown_identity",
            f"identity {identity!r} is neither a user nor an API key of this tenant",
            param="identity",
        )
    return found


def _check_grantable(
    state: AppState, principal: Principal, resource_type: str, resource: str, permission: str
) -> None:
    """Nobody grants more than they hold, or manage on access would be manage on everything."""
    held = effective_level(state, principal, resource_type, None if resource == "*" else resource)
    if RANK[permission] > RANK[held]:
        raise APIError(
            403,
            "forbidden",
            f"{permission} on {resource_type}/{resource} is more than this {principal.kind} "
            f"holds ({held})",
            param="permission",
        )


def _entries(
    session: Session, rows: Sequence[AccessEntryRow], expand: bool
) -> list[AccessEntryOut]:
    if not rows:
        return []
    found = _identities(session, rows[0].tenant_id, {row.identity for row in rows})
    return [AccessEntryOut.of(row, expand, found.get(row.identity)) for row in rows]


def _expand(expand: str | None) -> bool:
    if expand in (None, ""):
        return False
    if expand != "user":
        raise APIError(400, "invalid_expand", "expand accepts only 'user'", param="expand")
    return True


@router.get(
    "/access-control",
    response_model=list[AccessEntryOut],
    summary="Lists access control entries with optional filtering and pagination.",
)
async def list_entries(
    state: StateDep,
    principal: PrincipalDep,
    identity: str | None = None,
    expand: str | None = None,
    from_: str | None = Query(None, alias="from", description="RFC 3339 createdAt cursor."),
    limit: str | None = None,
) -> list[AccessEntryOut]:
    with_details = _expand(expand)
    after = parse_cursor(from_)
    size = page_limit(limit)

    def load() -> list[AccessEntryOut]:
        with state.db.session() as session:
            query = select(AccessEntryRow).where(AccessEntryRow.tenant_id == principal.tenant_id)
            if identity:
                query = query.where(AccessEntryRow.identity == identity)
            if after is not None:
                query = query.where(col(AccessEntryRow.created_at) > after)
            query = query.order_by(col(AccessEntryRow.created_at), col(AccessEntryRow.id))
            rows = session.exec(query.limit(size)).all()
            return _entries(session, rows, with_details)

    return await asyncio.to_thread(load)


@router.post(
    "/access-control",
    status_code=201,
    response_model=AccessEntryOut,
    summary="Creates a new access control entry.",
)
async def create_entry(
    body: AccessEntryIn, state: StateDep, principal: PrincipalDep
) -> AccessEntryOut:
    def create() -> AccessEntryOut:
        _check_grantable(state, principal, body.resource_type, body.resource, body.permission)
        with state.db.session() as session:
            identity = _identity_of(session, principal.tenant_id, body.identity)
            row = AccessEntryRow(
                tenant_id=principal.tenant_id,
                identity=body.identity,
                resource_type=body.resource_type,
                resource=body.resource,
                permission=body.permission,
            )
            session.add(row)
            try:
                session.commit()
            except IntegrityError as err:
                raise APIError(
                    409,
                    "entry_exists",
                    f"{body.identity} already has an entry for {body.resource_type}/"
                    f"{body.resource}; update it with PUT /access-control/{{id}}",
                ) from err
            return AccessEntryOut.of(row, True, identity)

    return await asyncio.to_thread(create)


@router.get(
    "/access-control/{id}",
    response_model=AccessEntryOut,
    summary="Retrieves an access control entry by its unique ID.",
)
async def get_entry(
    id: str, state: StateDep, principal: PrincipalDep, expand: str | None = None
) -> AccessEntryOut:
    with_details = _expand(expand)

    def load() -> AccessEntryOut:
        with state.db.session() as session:
            row = owned(session, AccessEntryRow, id, principal.tenant_id, "access entry")
            return _entries(session, [row], with_details)[0]

    return await asyncio.to_thread(load)


@router.put(
    "/access-control/{id}",
    response_model=AccessEntryOut,
    summary="Updates an existing access control entry.",
)
async def update_entry(
    id: str, body: AccessEntryIn, state: StateDep, principal: PrincipalDep
) -> AccessEntryOut:
    def update() -> AccessEntryOut:
        with state.db.session() as session:
            row = owned(session, AccessEntryRow, id, principal.tenant_id, "access entry")
            # Rewriting an entry also undoes it where it was: the old place must be within
            # reach for both its old and its new permission (else moving a "none" entry away
            # would lift a restriction the caller could not have granted).
            for permission in (row.permission, body.permission):
                _check_grantable(state, principal, row.resource_type, row.resource, permission)
            _check_grantable(state, principal, body.resource_type, body.resource, body.permission)
            identity = _identity_of(session, principal.tenant_id, body.identity)
            row.identity = body.identity
            row.resource_type = body.resource_type
            row.resource = body.resource
            row.permission = body.permission
            row.updated_at = utcnow()
            session.add(row)
            try:
                session.commit()
            except IntegrityError as err:
                raise APIError(
                    409, "entry_exists", "another entry already covers that identity and resource"
                ) from err
            return AccessEntryOut.of(row, True, identity)

    return await asyncio.to_thread(update)


@router.delete(
    "/access-control/{id}", response_model=str, summary="Deletes an access control entry."
)
async def delete_entry(id: str, state: StateDep, principal: PrincipalDep) -> str:
    def delete() -> None:
        with state.db.session() as session:
            row = owned(session, AccessEntryRow, id, principal.tenant_id, "access entry")
            # Deleting an entry can lift the identity to any level its role or scopes give
            # (a "none" entry is a restriction), so only a manager of that resource may.
            _check_grantable(state, principal, row.resource_type, row.resource, "manage")
            session.delete(row)
            session.commit()

    await asyncio.to_thread(delete)
    return "access entry deleted"


@router.get(
    "/permissions",
    response_model=list[str],
    summary="Returns the list of supported permission levels.",
    description="Permissions: none, view, edit, manage (in increasing order of privilege).",
)
async def permissions() -> list[str]:
    return list(LEVELS)
