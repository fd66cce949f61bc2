"""Users (seed 003): the members of the caller's tenant on /users, and the request bodies and
user view that /register, /login and /me share.

A user belongs to tenants through memberships, each with a role; a JWT names one tenant
(seed 002 calls tenants projects), so what a token can reach is that tenant's data only.
Authorization itself lives in api.deps.require_auth; these routes only add the rules that
depend on the rows (last admin, yourself, users of other tenants).
"""

import re
from datetime import datetime
from typing import Any, Literal, Self

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, func, select

from api.deps import (
    AppState,
    Principal,
    PrincipalDep,
    StateDep,
    levels_everywhere,
    page_limit,
    parse_cursor,
)
from api.errors import APIError, not_found
from api.fields import a_name, plain_text
from api.schemas import Camel, Timestamp
from api.strict_json import json_router
from core.identity.credentials import (
    hash_password,
    password_problem,
    verify_password,
)
from core.identity.permissions import RANK, ROLES
from core.models import (
    AccessEntryRow,
    ApiKeyRow,
    MembershipRow,
    UserRow,
    utcnow,
)

router = json_router(tags=["users"])

_EMAIL = re.compile(r"^[^@\s\x00]+@[^@\s\x00]+\.[^@\s.\x00]+$")
_CURSOR = Query(None, description="RFC3339Nano createdAt of the last user of the previous page.")


def _email(value: str) -> str:
    email = value.strip().lower()
    if not _EMAIL.match(email):
        raise ValueError("not a valid email address")
    return email


def _new_password(value: str) -> str:
    problem = password_problem(value)
    if problem:
        raise ValueError(problem)
    return value


def _optional_email(value: str | None) -> str | None:
    return None if value is None else _email(value)


def _optional_password(value: str | None) -> str | None:
    return None if value is None else _new_password(value)


class RegisterIn(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    email: str = Field(..., max_length=320)
    password: str = Field(..., max_length=1024)
    friendly_name: str = Field("", alias="friendlyName", max_length=200)
    # Part of the seed's body; access is granted with /access-control instead.
    allowed_resources: list[Any] | None = Field(None, alias="allowedResources")

    _check_email = field_validator("email")(_email)
    _check_password = field_validator("password")(_new_password)
    _check_name = field_validator("friendly_name")(plain_text)


class LoginIn(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    email: str = Field(..., max_length=320)
    password: str = Field(..., max_length=1024)
    tenant_id: str | None = Field(None, alias="tenantId", max_length=64)

    _check_text = field_validator("email", "tenant_id")(plain_text)


class RefreshIn(BaseModel):
    token: str = Field(..., min_length=1, max_length=4096)


class LogoutIn(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    refresh_token: str | None = Field(None, alias="refreshToken", max_length=4096)


class MeIn(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    friendly_name: str | None = Field(None, alias="friendlyName", max_length=200)
    email: str | None = Field(None, max_length=320)
    password: str | None = Field(None, max_length=1024)
    current_password: str | None = Field(None, alias="currentPassword", max_length=1024)

    _check_email = field_validator("email")(_optional_email)
    _check_password = field_validator("password")(_optional_password)
    _check_name = field_validator("friendly_name")(plain_text)


class UserIn(RegisterIn):
    role: str = Field("member", max_length=16)

    @field_validator("role")
    @classmethod
    def _role(cls, value: str) -> str:
        if value not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        return value


class UserUpdateIn(MeIn):
    role: str | None = Field(None, max_length=16)

    @field_validator("role")
    @classmethod
    def _role(cls, value: str | None) -> str | None:
        if value is not None and value not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        return value


class ProjectIn(BaseModel):
    name: str = Field(..., min_length=1, max_length=200)

    _name = field_validator("name")(a_name)


class UserOut(Camel):
    id: str
    email: str
    friendly_name: str
    subject: str
    role: str = Field(description="The user's role in `tenantId`.")
    tenant_id: str = Field(description="The tenant this view is of (the caller's).")
    created_at: Timestamp
    updated_at: Timestamp

    @classmethod
    def of(cls, user: UserRow, role: str, tenant_id: str) -> Self:
        return cls.from_row(user, role=role, tenant_id=tenant_id)


class TokensOut(Camel):
    token: str = Field(description="The access token (a JWT): send it as Bearer.")
    refresh_token: str
    expires_at: Timestamp = Field(description="When the access token expires.")

    @classmethod
    def issue(cls, state: AppState, user: UserRow, tenant_id: str) -> Self:
        tokens = state.tokens
        return cls(
            token=tokens.issue(user.id, tenant_id, user.token_version, "access"),
            refresh_token=tokens.issue(user.id, tenant_id, user.token_version, "refresh"),
            expires_at=tokens.expiry("access"),
        )


class LoginOut(TokensOut):
    token_type: Literal["bearer"] = "bearer"
    tenant_id: str
    user: UserOut

    @classmethod
    def of(cls, tokens: TokensOut, user: UserRow, role: str, tenant_id: str) -> Self:
        return cls(**dict(tokens), tenant_id=tenant_id, user=UserOut.of(user, role, tenant_id))


class ProjectOut(Camel):
    id: str
    name: str
    role: str | None = Field(description="The caller's role in it (null for an API key).")


def email_taken(email: str) -> APIError:
    return APIError(409, "email_taken", f"a user with email {email!r} exists", param="email")


def ensure_email_free(session: Session, email: str) -> None:
    if session.exec(select(UserRow).where(UserRow.email == email)).first() is not None:
        raise email_taken(email)


def add_user(
    session: Session, tenant_id: str, body: RegisterIn, password_hash: str, role: str
) -> UserRow:
    """A new user whose home tenant is `tenant_id`, with that role in it (not yet committed)."""
    ensure_email_free(session, body.email)
    user = UserRow(
        tenant_id=tenant_id,
        email=body.email,
        friendly_name=body.friendly_name,
        password_hash=password_hash,
    )
    session.add(user)
    session.add(MembershipRow(tenant_id=tenant_id, user_id=user.id, role=role))
    return user


def commit_user(session: Session, email: str) -> None:
    # Two requests for one email can both pass ensure_email_free; the unique index decides.
    try:
        session.commit()
    except IntegrityError as err:
        session.rollback()
        raise email_taken(email) from err


def verify_current_password(user: UserRow, current: str | None) -> None:
    if not current:
        raise APIError(
            403,
            "wrong_password",
            "currentPassword is needed to change email or password",
            param="currentPassword",
        )
    if not verify_password(current, user.password_hash):
        raise APIError(
            403, "wrong_password", "currentPassword is not correct", param="currentPassword"
        )


def update_profile(session: Session, user: UserRow, body: MeIn, new_hash: str | None) -> None:
    """Writes the profile fields `body` sets, and commits; a new password ends every token
    issued before it."""
    if body.email is not None and body.email != user.email:
        ensure_email_free(session, body.email)
        user.email = body.email
    if body.friendly_name is not None:
        user.friendly_name = body.friendly_name
    if new_hash is not None:
        user.password_hash = new_hash
        user.token_version += 1
    user.updated_at = utcnow()
    session.add(user)
    commit_user(session, user.email)


# ---- /users: the members of the caller's tenant ----------------------------------------


def _member(session: Session, tenant_id: str, user_id: str) -> tuple[UserRow, MembershipRow]:
    """A user of this tenant; one of another tenant answers exactly like a missing one."""
    member = session.get(MembershipRow, (tenant_id, user_id))
    user = session.get(UserRow, user_id) if member is not None else None
    if member is None or user is None:
        raise not_found("user", user_id)
    return user, member


def _is_last_admin(session: Session, member: MembershipRow) -> bool:
    if member.role != "admin":
        return False
    admins = session.exec(
        select(func.count())
        .select_from(MembershipRow)
        .where(MembershipRow.tenant_id == member.tenant_id, MembershipRow.role == "admin")
    ).one()
    return int(admins) <= 1


def _last_admin() -> APIError:
    return APIError(409, "last_admin", "a tenant must keep at least one admin")


def _ceiling(state: AppState, principal: Principal) -> str:
    """The highest role level the caller may hand out or act upon: its lowest level over all
    resource types, since a role gives its level on every one (manage on users alone must
    not make admins)."""
    return min(levels_everywhere(state, principal).values(), key=RANK.__getitem__)


def _may_grant(ceiling: str, principal: Principal, role: str) -> None:
    if RANK[ROLES[role]] > RANK[ceiling]:
        raise APIError(
            403,
            "forbidden",
            f"role {role!r} needs {ROLES[role]} on every resource type; this "
            f"{principal.kind} has {ceiling} on some",
            param="role",
        )


def _may_act_on(ceiling: str, principal: Principal, member: MembershipRow) -> None:
    if RANK[ROLES.get(member.role, "manage")] > RANK[ceiling]:
        raise APIError(
            403,
            "forbidden",
            f"user {member.user_id!r} is a {member.role}, above what this {principal.kind} "
            f"may manage ({ceiling})",
        )


@router.get("/users", response_model=list[UserOut], summary="Lists users with pagination support.")
def list_users(
    state: StateDep,
    principal: PrincipalDep,
    limit: str | None = None,
    cursor: str | None = _CURSOR,
) -> list[UserOut]:
    before: datetime | None = parse_cursor(cursor)
    query = (
        select(UserRow, MembershipRow)
        .join(MembershipRow, col(MembershipRow.user_id) == col(UserRow.id))
        .where(MembershipRow.tenant_id == principal.tenant_id)
    )
    if before is not None:
        query = query.where(col(UserRow.created_at) < before)
    query = query.order_by(col(UserRow.created_at).desc(), col(UserRow.id).desc())
    with state.db.session() as session:
        rows = session.exec(query.limit(page_limit(limit))).all()
    return [UserOut.of(user, member.role, principal.tenant_id) for user, member in rows]


@router.post(
    "/users",
    status_code=201,
    response_model=UserOut,
    summary="Creates a new user in the caller's tenant.",
)
def create_user(body: UserIn, state: StateDep, principal: PrincipalDep) -> UserOut:
    _may_grant(_ceiling(state, principal), principal, body.role)
    password_hash = hash_password(body.password)
    with state.db.session() as session:
        user = add_user(session, principal.tenant_id, body, password_hash, body.role)
        commit_user(session, body.email)
        return UserOut.of(user, body.role, principal.tenant_id)


@router.get("/users/{id}", response_model=UserOut, summary="Retrieves a user by their unique ID.")
def get_user(id: str, state: StateDep, principal: PrincipalDep) -> UserOut:
    with state.db.session() as session:
        user, member = _member(session, principal.tenant_id, id)
    return UserOut.of(user, member.role, principal.tenant_id)


@router.put("/users/{id}", response_model=UserOut, summary="Updates a user's mutable fields.")
def update_user(id: str, body: UserUpdateIn, state: StateDep, principal: PrincipalDep) -> UserOut:
    ceiling = _ceiling(state, principal)
    if body.role is not None:
        _may_grant(ceiling, principal, body.role)
    new_hash = hash_password(body.password) if body.password is not None else None
    with state.db.session() as session:
        user, member = _member(session, principal.tenant_id, id)
        _may_act_on(ceiling, principal, member)
        if (
            body.email is not None or new_hash is not None
        ) and user.tenant_id != principal.tenant_id:
            # Otherwise an admin of any tenant the user joined could take over their account.
            raise APIError(
                403,
                "forbidden",
                "this user registered in another tenant; only their role here can be changed",
            )
        if body.role is not None and body.role != member.role:
            if _is_last_admin(session, member):
                raise _last_admin()
            member.role = body.role
            session.add(member)
        update_profile(session, user, body, new_hash)
        return UserOut.of(user, member.role, principal.tenant_id)


@router.delete(
    "/users/{id}",
    response_model=str,
    summary="Removes a user from the tenant, with their access entries, keys and sessions.",
)
def delete_user(id: str, state: StateDep, principal: PrincipalDep) -> str:
    if principal.user_id == id:
        raise APIError(409, "cannot_delete_self", "you cannot delete yourself")
    tenant_id = principal.tenant_id
    ceiling = _ceiling(state, principal)
    with state.db.session() as session:
        user, member = _member(session, tenant_id, id)
        _may_act_on(ceiling, principal, member)
        if _is_last_admin(session, member):
            raise _last_admin()
        session.delete(member)
        session.exec(
            delete(AccessEntryRow).where(
                col(AccessEntryRow.tenant_id) == tenant_id, col(AccessEntryRow.identity) == id
            )
        )
        now = utcnow()
        for key in session.exec(
            select(ApiKeyRow).where(
                ApiKeyRow.tenant_id == tenant_id,
                ApiKeyRow.user_id == id,
                col(ApiKeyRow.revoked_at).is_(None),
            )
        ).all():
            key.revoked_at = now
            session.add(key)
        session.flush()
        others = session.exec(select(MembershipRow).where(MembershipRow.user_id == id)).first()
        if others is None:
            session.delete(user)
        else:
            user.token_version += 1  # sessions end everywhere; other tenants need a new login
            user.updated_at = now
            session.add(user)
        session.commit()
    return "user deleted"
