"""Users and sessions (seed 003): /register, /login, /token_refresh, /ui/*, /me, /projects, /users.

A user belongs to tenants through memberships, each with a role; a JWT names one tenant
(seed 002 calls tenants projects), so what a token can reach is that tenant's data only.
Authorization itself lives in api.deps.require_auth; these routes only add the rules that
depend on the rows (last admin, yourself, users of other tenants).
"""

import asyncio
import re
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, func, select

from api.deps import (
    SESSION_COOKIE,
    AppState,
    Principal,
    PrincipalDep,
    StateDep,
    levels_everywhere,
    limit_by_client,
    live_session,
    page_limit,
    parse_cursor,
    refuse_when_limited,
)
from api.errors import APIError, not_found
from api.fields import a_name, plain_text
from api.routes.apikeys import issue_key, key_json
from core.access import RANK, ROLES
from core.identity import (
    TokenClaims,
    TokenError,
    hash_password,
    looks_like_jwt,
    password_problem,
    verify_password,
)
from core.models import (
    AccessEntryRow,
    ApiKeyRow,
    MembershipRow,
    RevokedTokenRow,
    TenantRow,
    UserRow,
    rfc3339,
    utcnow,
)

router = APIRouter(tags=["users"])
public_router = APIRouter(tags=["users"])

REFRESH_COOKIE = "chainloom_refresh"
REFRESH_PATH = "/ui/token_refresh"
_EMAIL = re.compile(r"^[^@\s\x00]+@[^@\s\x00]+\.[^@\s.\x00]+$")
_CURSOR = Query(None, description="RFC3339Nano createdAt of the last user of the previous page.")
_limited = [Depends(limit_by_client)]


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


class UserOut(BaseModel):
    id: str
    email: str
    friendlyName: str
    subject: str
    role: str
    tenantId: str
    createdAt: str
    updatedAt: str


class TokensOut(BaseModel):
    token: str
    refreshToken: str
    expiresAt: str


class LoginOut(TokensOut):
    tokenType: str
    tenantId: str
    user: UserOut


class ProjectOut(BaseModel):
    id: str
    name: str
    role: str | None


def user_json(user: UserRow, role: str, tenant_id: str) -> dict[str, Any]:
    return {
        "id": user.id,
        "email": user.email,
        "friendlyName": user.friendly_name,
        "subject": user.subject,
        "role": role,
        "tenantId": tenant_id,
        "createdAt": rfc3339(user.created_at),
        "updatedAt": rfc3339(user.updated_at),
    }


def _tokens(state: AppState, user: UserRow, tenant_id: str) -> dict[str, Any]:
    return {
        "token": state.tokens.issue(user.id, tenant_id, user.token_version, "access"),
        "refreshToken": state.tokens.issue(user.id, tenant_id, user.token_version, "refresh"),
        "expiresAt": rfc3339(state.tokens.expiry("access")),
    }


def _email_taken(email: str) -> APIError:
    return APIError(409, "email_taken", f"a user with email {email!r} exists", param="email")


def _email_free(session: Session, email: str) -> None:
    if session.exec(select(UserRow).where(UserRow.email == email)).first() is not None:
        raise _email_taken(email)


def _add_user(
    session: Session, tenant_id: str, body: RegisterIn, password_hash: str, role: str
) -> UserRow:
    """A new user whose home tenant is `tenant_id`, with that role in it (not yet committed)."""
    _email_free(session, body.email)
    user = UserRow(
        tenant_id=tenant_id,
        email=body.email,
        friendly_name=body.friendly_name,
        password_hash=password_hash,
    )
    session.add(user)
    session.add(MembershipRow(tenant_id=tenant_id, user_id=user.id, role=role))
    return user


def _commit(session: Session, email: str) -> None:
    # Two requests for one email can both pass _email_free; the unique index decides.
    try:
        session.commit()
    except IntegrityError as err:
        session.rollback()
        raise _email_taken(email) from err


# ---- cookies (/ui/*) -------------------------------------------------------------------


def _set_cookies(response: Response, state: AppState, tokens: dict[str, Any]) -> None:
    secure = state.settings.cookie_secure
    response.set_cookie(
        SESSION_COOKIE,
        tokens["token"],
        max_age=int(state.settings.access_token_ttl),
        path="/",
        secure=secure,
        httponly=True,
        samesite="strict",
    )
    response.set_cookie(
        REFRESH_COOKIE,
        tokens["refreshToken"],
        max_age=int(state.settings.refresh_token_ttl),
        path=REFRESH_PATH,
        secure=secure,
        httponly=True,
        samesite="strict",
    )


def _clear_cookies(response: Response, state: AppState) -> None:
    secure = state.settings.cookie_secure
    response.delete_cookie(
        SESSION_COOKIE, path="/", secure=secure, httponly=True, samesite="strict"
    )
    response.delete_cookie(
        REFRESH_COOKIE, path=REFRESH_PATH, secure=secure, httponly=True, samesite="strict"
    )


# ---- register, login, refresh ----------------------------------------------------------


def _register(state: AppState, body: RegisterIn, request: Request) -> dict[str, Any]:
    if not state.settings.registration_open:
        raise APIError(403, "registration_closed", "registration is closed on this server")
    password_hash = hash_password(body.password)
    with state.db.session() as session:
        tenant = TenantRow(name=(body.friendly_name or body.email)[:200])
        session.add(tenant)
        user = _add_user(session, tenant.id, body, password_hash, "admin")
        key, plain = issue_key(session, tenant.id, user.id, "initial", ["admin"])
        _commit(session, body.email)
        # Nobody was signed in: the new user is who the request log (the tenant's /audit)
        # records as having made the tenant.
        request.state.principal = Principal(
            tenant_id=tenant.id, identity=user.id, kind="user", role="admin", user_id=user.id
        )
        return {
            **user_json(user, "admin", tenant.id),
            **_tokens(state, user, tenant.id),
            "apiKey": key_json(key, plain),
        }


def _login(state: AppState, body: LoginIn) -> dict[str, Any]:
    refused = APIError(401, "invalid_credentials", "the email or password is not correct")
    email = body.email.strip().lower()
    with state.db.session() as session:
        user = session.exec(select(UserRow).where(UserRow.email == email)).first()
        # Verified even for an unknown email, so timing does not tell which part was wrong.
        if not verify_password(body.password, user.password_hash if user else None):
            raise refused
        assert user is not None
        memberships = session.exec(
            select(MembershipRow)
            .where(MembershipRow.user_id == user.id)
            .order_by(col(MembershipRow.created_at))
        ).all()
    roles = {m.tenant_id: m.role for m in memberships}
    if body.tenant_id is not None:
        if body.tenant_id not in roles:
            raise APIError(
                403,
                "forbidden",
                f"you are not a member of tenant {body.tenant_id!r}",
                param="tenantId",
            )
        tenant_id = body.tenant_id
    elif user.tenant_id in roles:
        tenant_id = user.tenant_id
    elif memberships:  # removed from the tenant they registered, still in others
        tenant_id = memberships[0].tenant_id
    else:
        raise refused
    return {
        **_tokens(state, user, tenant_id),
        "tokenType": "bearer",
        "tenantId": tenant_id,
        "user": user_json(user, roles[tenant_id], tenant_id),
    }


def _access_claims(state: AppState, token: str) -> tuple[TokenClaims, datetime]:
    """An access token's claims, accepted up to one access lifetime after it expired (the
    seed refreshes "an expired or expiring" token), and the end of that grace period."""
    leeway = state.tokens.access_ttl
    claims = state.tokens.check(token, "access", leeway=leeway)
    return claims, claims.expires_at + timedelta(seconds=leeway)


def _refresh_claims(state: AppState, token: str) -> tuple[TokenClaims, datetime]:
    """The claims of a token /token_refresh accepts, and until when it would accept it."""
    try:
        claims = state.tokens.check(token, "refresh")
        return claims, claims.expires_at
    except TokenError as first:
        try:
            return _access_claims(state, token)
        except TokenError:
            raise APIError(401, "invalid_token", str(first), param="token") from first


# Why a token id is in revoked_token.
_REFRESHED, _LOGGED_OUT = "refreshed", "logout"


def _revoke(session: Session, claims: TokenClaims, until: datetime, reason: str) -> str | None:
    """Refuses the token from now on (until `until`, when it would be refused anyway), and
    commits. None if this call revoked it, else why it already was."""
    # Rows of tokens that can no longer be used are dead weight: pruned on every write.
    session.exec(delete(RevokedTokenRow).where(col(RevokedTokenRow.expires_at) < utcnow()))
    earlier = session.get(RevokedTokenRow, claims.jti)
    if earlier is not None:
        session.commit()
        return earlier.reason
    session.add(
        RevokedTokenRow(
            jti=claims.jti,
            tenant_id=claims.tenant_id,
            user_id=claims.user_id,
            reason=reason,
            expires_at=until,
        )
    )
    try:
        session.commit()
    except IntegrityError:  # the same token presented twice at once: the other one won
        session.rollback()
        return _REFRESHED
    return None


def _refresh(state: AppState, token: str) -> dict[str, Any]:
    claims, until = _refresh_claims(state, token)
    with state.db.session() as session:
        user, _ = live_session(session, claims)
        earlier = _revoke(session, claims, until, _REFRESHED)
        if earlier == _LOGGED_OUT:
            raise APIError(401, "invalid_token", "this token was logged out", param="token")
        # Rotation: each token refreshes once, so a stolen one is noticed when either the
        # thief or the user presents it second. Which of them did is unknowable, so every
        # session of the user ends (OAuth 2.0 Security BCP, refresh token reuse).
        if earlier is not None:
            user.token_version += 1
            user.updated_at = utcnow()
            session.add(user)
            session.commit()
            raise APIError(
                401,
                "invalid_token",
                "this refresh token was already used; every session of this user has ended, "
                "log in again",
                param="token",
            )
        return _tokens(state, user, claims.tenant_id)


def _logout(state: AppState, *tokens: tuple[TokenClaims, datetime]) -> None:
    with state.db.session() as session:
        for claims, until in tokens:
            _revoke(session, claims, until, _LOGGED_OUT)


async def _limit_email(request: Request, state: AppState, email: str) -> None:
    """A login counter per account, so many addresses cannot share out a password guess."""
    key = f"login-email:{email.strip().lower()}"
    verdict = await state.limiter.hit((state.limiter.login, key))
    # Until it is spent, this counter's headers stay off the response: the per-address
    # counter's are the ones a client should pace itself by.
    if not verdict.allowed:
        refuse_when_limited(request, verdict, "too many login attempts for this account")


@public_router.post(
    "/register",
    status_code=201,
    dependencies=_limited,
    summary="Registers a new user and returns authentication credentials.",
)
def register(body: RegisterIn, state: StateDep, request: Request) -> dict[str, Any]:
    return _register(state, body, request)


@public_router.post(
    "/login",
    response_model=LoginOut,
    dependencies=_limited,
    summary="Authenticates a user using email and password.",
)
async def login(body: LoginIn, state: StateDep, request: Request) -> dict[str, Any]:
    await _limit_email(request, state, body.email)
    return await asyncio.to_thread(_login, state, body)


@public_router.post(
    "/token_refresh",
    response_model=TokensOut,
    dependencies=_limited,
    summary="Refreshes an expired or expiring JWT token.",
)
def token_refresh(body: RefreshIn, state: StateDep) -> dict[str, Any]:
    return _refresh(state, body.token)


@public_router.post(
    "/ui/login",
    response_model=LoginOut,
    dependencies=_limited,
    summary="Authenticates a user and sets an HTTP-only authentication cookie.",
)
async def ui_login(
    body: LoginIn, state: StateDep, request: Request, response: Response
) -> dict[str, Any]:
    await _limit_email(request, state, body.email)
    result = await asyncio.to_thread(_login, state, body)
    _set_cookies(response, state, result)
    return result


@public_router.post(
    "/ui/register",
    status_code=201,
    dependencies=_limited,
    summary="Registers a new user and sets an authentication cookie.",
)
def ui_register(
    body: RegisterIn, state: StateDep, request: Request, response: Response
) -> dict[str, Any]:
    result = _register(state, body, request)
    _set_cookies(response, state, result)
    return result


@public_router.post(
    "/ui/logout",
    response_model=str,
    dependencies=_limited,
    summary="Clears the authentication cookie and logs the user out.",
)
def ui_logout(request: Request, state: StateDep, response: Response) -> str:
    # Clearing a cookie does not make the browser forget a copy taken earlier: the tokens
    # themselves are revoked. Cookies that do not verify have nothing left to revoke.
    revoked = []
    session_token = request.cookies.get(SESSION_COOKIE)
    refresh_token = request.cookies.get(REFRESH_COOKIE)
    if session_token:
        try:
            revoked.append(_access_claims(state, session_token))
        except TokenError:
            pass
    if refresh_token:
        try:
            claims = state.tokens.check(refresh_token, "refresh")
            revoked.append((claims, claims.expires_at))
        except TokenError:
            pass
    _logout(state, *revoked)
    _clear_cookies(response, state)
    return "logged out"


@public_router.post(
    "/logout",
    response_model=str,
    dependencies=_limited,
    summary="Revokes the bearer access token and, when given, its refresh token.",
    responses={401: {"description": "No valid access token, or refreshToken is not valid."}},
)
def logout(request: Request, state: StateDep, body: LogoutIn | None = None) -> str:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    token = value.strip()
    if scheme.lower() != "bearer" or not looks_like_jwt(token):
        raise APIError(
            401,
            "invalid_token",
            "send the access token from /login as Authorization: Bearer",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        access = _access_claims(state, token)
    except TokenError as err:
        raise APIError(401, "invalid_token", str(err)) from err
    tokens = [access]
    if body is not None and body.refresh_token:
        try:
            refresh = state.tokens.check(body.refresh_token, "refresh")
        except TokenError as err:
            raise APIError(401, "invalid_token", str(err), param="refreshToken") from err
        if (refresh.user_id, refresh.tenant_id) != (access[0].user_id, access[0].tenant_id):
            raise APIError(
                401,
                "invalid_token",
                "the refresh token is not of the same session",
                param="refreshToken",
            )
        tokens.append((refresh, refresh.expires_at))
    _logout(state, *tokens)
    return "logged out"


@public_router.post(
    "/ui/token_refresh",
    response_model=str,
    dependencies=_limited,
    summary="Refreshes the authentication token stored in the cookie.",
)
def ui_token_refresh(request: Request, state: StateDep, response: Response) -> str:
    token = request.cookies.get(REFRESH_COOKIE) or request.cookies.get(SESSION_COOKIE)
    if not token:
        raise APIError(401, "invalid_token", "no session cookie; log in with /ui/login")
    _set_cookies(response, state, _refresh(state, token))
    return "token refreshed"


# ---- the caller: /me, /ui/me, /projects --------------------------------------------------


def _signed_in_user(session: Session, principal: Principal) -> UserRow:
    if principal.kind != "user" or principal.user_id is None:
        raise APIError(
            403, "forbidden", f"only a signed-in user can do this, not a {principal.kind}"
        )
    user = session.get(UserRow, principal.user_id)
    if user is None:
        raise APIError(401, "invalid_token", "the user no longer exists")
    return user


def _tenant_names(session: Session, ids: list[str]) -> dict[str, str]:
    rows = session.exec(select(TenantRow).where(col(TenantRow.id).in_(ids))).all() if ids else []
    return {row.id: row.name for row in rows}


def _me(state: AppState, principal: Principal) -> dict[str, Any]:
    with state.db.session() as session:
        if principal.kind == "user":
            user = _signed_in_user(session, principal)
            return {
                **user_json(user, principal.role, principal.tenant_id),
                "kind": "user",
                "systemAdmin": principal.system_admin,
            }
        if principal.kind == "key":
            key = session.get(ApiKeyRow, principal.identity)
            return {
                "kind": "key",
                "id": principal.identity,
                "tenantId": principal.tenant_id,
                "name": key.name if key else "",
                "prefix": key.prefix if key else "",
                "scopes": list(principal.scopes),
                "userId": principal.user_id,
            }
    return {
        "kind": principal.kind,
        "id": principal.identity,
        "tenantId": principal.tenant_id,
        "systemAdmin": principal.system_admin,
    }


@router.get("/me", summary="Returns the caller: a user, an API key or the bootstrap key.")
def get_me(state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    return _me(state, principal)


@router.get("/ui/me", summary="Returns the currently authenticated user (for UI clients).")
def get_ui_me(state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    return _me(state, principal)


def _verify_current(user: UserRow, current: str | None) -> None:
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


def _update_profile(session: Session, user: UserRow, body: MeIn, new_hash: str | None) -> None:
    """Writes the profile fields `body` sets, and commits; a new password ends every token
    issued before it."""
    if body.email is not None and body.email != user.email:
        _email_free(session, body.email)
        user.email = body.email
    if body.friendly_name is not None:
        user.friendly_name = body.friendly_name
    if new_hash is not None:
        user.password_hash = new_hash
        user.token_version += 1
    user.updated_at = utcnow()
    session.add(user)
    _commit(session, user.email)


@router.patch(
    "/me",
    summary="Updates the caller's profile; email and password need currentPassword.",
)
def patch_me(body: MeIn, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    with state.db.session() as session:
        user = _signed_in_user(session, principal)
        if body.email is not None or body.password is not None:
            _verify_current(user, body.current_password)
        new_hash = hash_password(body.password) if body.password is not None else None
        _update_profile(session, user, body, new_hash)
        result = user_json(user, principal.role, principal.tenant_id)
        if new_hash is not None:
            result.update(_tokens(state, user, principal.tenant_id))
        return result


@router.get(
    "/projects",
    response_model=list[ProjectOut],
    summary="Lists the tenants (projects) the caller belongs to, with the caller's role.",
)
def list_projects(state: StateDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    with state.db.session() as session:
        if principal.kind != "user":
            names = _tenant_names(session, [principal.tenant_id])
            role = principal.role if principal.kind == "bootstrap" else None
            return [
                {
                    "id": principal.tenant_id,
                    "name": names.get(principal.tenant_id, principal.tenant_id),
                    "role": role,
                }
            ]
        memberships = session.exec(
            select(MembershipRow)
            .where(MembershipRow.user_id == principal.user_id)
            .order_by(col(MembershipRow.created_at))
        ).all()
        names = _tenant_names(session, [m.tenant_id for m in memberships])
    return [
        {"id": m.tenant_id, "name": names.get(m.tenant_id, m.tenant_id), "role": m.role}
        for m in memberships
    ]


@router.post(
    "/projects",
    status_code=201,
    response_model=ProjectOut,
    summary="Creates a tenant (project) with the caller as its admin.",
)
def create_project(body: ProjectIn, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    if not state.settings.registration_open and not principal.system_admin:
        # A tenant made here is a tenant made without registration.
        raise APIError(403, "registration_closed", "creating projects is closed on this server")
    with state.db.session() as session:
        user = _signed_in_user(session, principal)
        tenant = TenantRow(name=body.name)
        session.add(tenant)
        session.add(MembershipRow(tenant_id=tenant.id, user_id=user.id, role="admin"))
        session.commit()
        return {"id": tenant.id, "name": tenant.name, "role": "admin"}


@router.post(
    "/projects/{id}/token",
    response_model=LoginOut,
    summary="Issues tokens scoped to one of the caller's tenants (projects).",
)
def project_token(id: str, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    with state.db.session() as session:
        user = _signed_in_user(session, principal)
        member = session.get(MembershipRow, (id, user.id))
    if member is None:
        raise not_found("project", id)
    return {
        **_tokens(state, user, id),
        "tokenType": "bearer",
        "tenantId": id,
        "user": user_json(user, member.role, id),
    }


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
) -> list[dict[str, Any]]:
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
    return [user_json(user, member.role, principal.tenant_id) for user, member in rows]


@router.post(
    "/users",
    status_code=201,
    response_model=UserOut,
    summary="Creates a new user in the caller's tenant.",
)
def create_user(body: UserIn, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    _may_grant(_ceiling(state, principal), principal, body.role)
    password_hash = hash_password(body.password)
    with state.db.session() as session:
        user = _add_user(session, principal.tenant_id, body, password_hash, body.role)
        _commit(session, body.email)
        return user_json(user, body.role, principal.tenant_id)


@router.get("/users/{id}", response_model=UserOut, summary="Retrieves a user by their unique ID.")
def get_user(id: str, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    with state.db.session() as session:
        user, member = _member(session, principal.tenant_id, id)
    return user_json(user, member.role, principal.tenant_id)


@router.put("/users/{id}", response_model=UserOut, summary="Updates a user's mutable fields.")
def update_user(
    id: str, body: UserUpdateIn, state: StateDep, principal: PrincipalDep
) -> dict[str, Any]:
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
        _update_profile(session, user, body, new_hash)
        return user_json(user, member.role, principal.tenant_id)


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
