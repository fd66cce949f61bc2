"""Sessions (seed 003): /register, /login, /token_refresh, /logout and the cookie-based /ui/*
variants. Every route here is public and limited per client address.
"""

import asyncio
from datetime import datetime, timedelta

from fastapi import Depends, Request, Response
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select

from api.deps import (
    SESSION_COOKIE,
    AppState,
    Principal,
    StateDep,
    limit_by_client,
    live_session,
    refuse_when_limited,
)
from api.errors import APIError
from api.routes.apikeys import NewApiKeyOut, issue_key
from api.routes.users import (
    LoginIn,
    LoginOut,
    LogoutIn,
    RefreshIn,
    RegisterIn,
    TokensOut,
    UserOut,
    add_user,
    commit_user,
)
from api.strict_json import json_router
from core.identity.credentials import (
    TokenClaims,
    TokenError,
    hash_password,
    looks_like_jwt,
    verify_password,
)
from core.models import (
    MembershipRow,
    RevokedTokenRow,
    TenantRow,
    UserRow,
    utcnow,
)

public_router = json_router(tags=["users"])

REFRESH_COOKIE = "chainloom_refresh"
REFRESH_PATH = "/ui/token_refresh"
_limited = [Depends(limit_by_client)]


# ---- cookies (/ui/*) -------------------------------------------------------------------


def _set_cookies(response: Response, state: AppState, tokens: TokensOut) -> None:
    secure = state.settings.cookie_secure
    response.set_cookie(
        SESSION_COOKIE,
        tokens.token,
        max_age=int(state.settings.access_token_ttl),
        path="/",
        secure=secure,
        httponly=True,
        samesite="strict",
    )
    response.set_cookie(
        REFRESH_COOKIE,
        tokens.refresh_token,
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


class RegisteredOut(TokensOut, UserOut):
    """The new user (an admin of the new tenant), its tokens and its first API key."""

    api_key: NewApiKeyOut


def _register(state: AppState, body: RegisterIn, request: Request) -> RegisteredOut:
    if not state.settings.registration_open:
        raise APIError(403, "registration_closed", "registration is closed on this server")
    password_hash = hash_password(body.password)
    with state.db.session() as session:
        tenant = TenantRow(name=(body.friendly_name or body.email)[:200])
        session.add(tenant)
        user = add_user(session, tenant.id, body, password_hash, "admin")
        key, plain = issue_key(session, tenant.id, user.id, "initial", ["admin"])
        commit_user(session, body.email)
        # Nobody was signed in: the new user is who the request log (the tenant's /audit)
        # records as having made the tenant.
        request.state.principal = Principal(
            tenant_id=tenant.id, identity=user.id, kind="user", role="admin", user_id=user.id
        )
        return RegisteredOut(
            **dict(UserOut.of(user, "admin", tenant.id)),
            **dict(TokensOut.issue(state, user, tenant.id)),
            api_key=NewApiKeyOut.from_row(key, key=plain),
        )


def _login(state: AppState, body: LoginIn) -> LoginOut:
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
    return LoginOut.of(TokensOut.issue(state, user, tenant_id), user, roles[tenant_id], tenant_id)


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


def _refresh(state: AppState, token: str) -> TokensOut:
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
        return TokensOut.issue(state, user, claims.tenant_id)


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
def register(body: RegisterIn, state: StateDep, request: Request) -> RegisteredOut:
    return _register(state, body, request)


@public_router.post(
    "/login",
    response_model=LoginOut,
    dependencies=_limited,
    summary="Authenticates a user using email and password.",
)
async def login(body: LoginIn, state: StateDep, request: Request) -> LoginOut:
    await _limit_email(request, state, body.email)
    return await asyncio.to_thread(_login, state, body)


@public_router.post(
    "/token_refresh",
    response_model=TokensOut,
    dependencies=_limited,
    summary="Refreshes an expired or expiring JWT token.",
)
def token_refresh(body: RefreshIn, state: StateDep) -> TokensOut:
    return _refresh(state, body.token)


@public_router.post(
    "/ui/login",
    response_model=LoginOut,
    dependencies=_limited,
    summary="Authenticates a user and sets an HTTP-only authentication cookie.",
)
async def ui_login(
    body: LoginIn, state: StateDep, request: Request, response: Response
) -> LoginOut:
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
) -> RegisteredOut:
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
