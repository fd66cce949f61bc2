"""Shared dependencies: settings, database, Temporal client, and the API-key check."""

import asyncio
import hmac
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPBearer
from sqlmodel import Session, col, select
from temporalio.client import Client

from api import proxies
from api.errors import APIError, not_found
from core.config import Settings
from core.db import Database
from core.events.outbox import TriggerDispatcher
from core.identity.credentials import (
    TokenClaims,
    TokenError,
    Tokens,
    digest_matches,
    key_prefix,
    looks_like_jwt,
)
from core.identity.permissions import (
    RANK,
    RESOURCE_TYPES,
    ROLES,
    SEGMENT_TYPES,
    STARTS_RUNS,
    SYSTEM,
    at_least,
    required_level,
    scope_level,
)
from core.metering.ratelimit import RateLimiter, Verdict
from core.metering.usage import Snapshot, UsageMeter, period_reset
from core.models import (
    AccessEntryRow,
    ApiKeyRow,
    MembershipRow,
    RevokedTokenRow,
    UserRow,
    as_utc,
    utcnow,
)
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
    tokens: Tokens
    limiter: RateLimiter
    usage: UsageMeter
    # Starts trigger workflows after appends and sweeps the outbox (core/events/outbox.py).
    triggers: TriggerDispatcher
    started: float = field(default_factory=time.time)


async def get_state(request: Request) -> AppState:
    # async: a plain def dependency costs a thread-pool hop on every request.
    state: AppState = request.app.state.chainloom
    return state


StateDep = Annotated[AppState, Depends(get_state)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)
SESSION_COOKIE = "chainloom_session"
# last_used_at is written at most this often per key, not on every request.
_LAST_USED_EVERY = 60.0


@dataclass
class Principal:
    """Who is calling: a user (JWT or session cookie), an API key, or the bootstrap key."""

    tenant_id: str
    identity: str
    kind: str  # user | key | bootstrap
    # A user's role in the tenant. For a key, its creator's role, which caps what the key's
    # scopes give; "" for keys made by the bootstrap key, which are capped by nothing.
    role: str = "admin"
    scopes: tuple[str, ...] = ()
    user_id: str | None = None  # the user, or the user who created the key
    system_admin: bool = False

    @property
    def key_id(self) -> str:  # kept for callers from before users existed
        return self.identity


def _unauthorized(code: str, message: str) -> APIError:
    return APIError(401, code, message, headers={"WWW-Authenticate": "Bearer"})


def presented_credential(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.cookies.get(SESSION_COOKIE) or None


def _key_principal(state: AppState, presented: str) -> Principal:
    prefix = key_prefix(presented)
    with state.db.session() as session:
        row = (
            session.exec(select(ApiKeyRow).where(ApiKeyRow.prefix == prefix)).first()
            if prefix
            else None
        )
        if row is None or not digest_matches(presented, row.key_hash):
            raise _unauthorized("invalid_api_key", "the API key is not valid")
        now = utcnow()
        if row.revoked_at is not None:
            raise _unauthorized("revoked_api_key", "the API key has been revoked")
        if row.expires_at is not None and as_utc(row.expires_at) <= now:
            raise _unauthorized("expired_api_key", "the API key has expired")
        creator = session.get(MembershipRow, (row.tenant_id, row.user_id)) if row.user_id else None
        if row.user_id and creator is None:
            # A key must not outlive its creator's membership, whoever forgot to revoke it.
            raise _unauthorized(
                "invalid_api_key", "the API key is not valid: its creator is no longer a member"
            )
        last = as_utc(row.last_used_at) if row.last_used_at else None
        if last is None or (now - last).total_seconds() > _LAST_USED_EVERY:
            row.last_used_at = now
            session.add(row)
            session.commit()
    return Principal(
        tenant_id=row.tenant_id,
        identity=row.id,
        kind="key",
        role=creator.role if creator else "",
        scopes=tuple(row.scopes),
        user_id=row.user_id,
    )


def live_session(session: Session, claims: TokenClaims) -> tuple[UserRow, MembershipRow]:
    """The user and membership a token speaks for: a 401 once the user's tokens were revoked
    (password change, logout everywhere) or the membership is gone."""
    user = session.get(UserRow, claims.user_id)
    member = session.get(MembershipRow, (claims.tenant_id, claims.user_id))
    if user is None or user.token_version != claims.version:
        raise _unauthorized("invalid_token", "the token has been revoked; log in again")
    if member is None:
        raise _unauthorized("invalid_token", "the user is no longer a member of this tenant")
    return user, member


def _user_principal(state: AppState, token: str) -> Principal:
    try:
        claims = state.tokens.check(token)
    except TokenError as err:
        raise _unauthorized("invalid_token", str(err)) from err
    with state.db.session() as session:
        user, member = live_session(session, claims)
        if session.get(RevokedTokenRow, claims.jti) is not None:
            raise _unauthorized("invalid_token", "the token has been revoked; log in again")
    return Principal(
        tenant_id=claims.tenant_id,
        identity=user.id,
        kind="user",
        role=member.role,
        user_id=user.id,
        system_admin=user.system_admin,
    )


def is_bootstrap(state: AppState, presented: str | None) -> bool:
    expected = state.settings.api_key
    return bool(
        presented and expected and hmac.compare_digest(presented.encode(), expected.encode())
    )


def bootstrap_principal(state: AppState) -> Principal:
    return Principal(
        tenant_id=state.settings.default_tenant,
        identity="bootstrap",
        kind="bootstrap",
        system_admin=True,
    )


def authenticate(state: AppState, presented: str | None) -> Principal:
    """A user or API key principal (require_auth has already matched the bootstrap key)."""
    if not presented:
        raise _unauthorized(
            "missing_api_key",
            "authentication required: send an API key in X-API-Key or Authorization: Bearer, "
            "or a token from /login",
        )
    if looks_like_jwt(presented):
        return _user_principal(state, presented)
    return _key_principal(state, presented)


def _route_path(request: Request) -> str:
    return str(getattr(request.scope.get("route"), "path", request.url.path))


def route_resource(request: Request) -> tuple[str, str | None]:
    """The resource type a request acts on and the id in its path, if any."""
    route = request.scope.get("route")
    template = getattr(route, "path", request.url.path)
    segment = template.strip("/").split("/", 1)[0]
    kind = SEGMENT_TYPES.get(segment)
    if kind is None:
        # Every route is classified (tests/test_access_matrix.py); an unknown one is refused.
        raise APIError(403, "forbidden", f"no permission rule covers {template}")
    params = request.path_params
    ident = next(iter(params.values()), None) if params else None
    return kind, None if ident is None else str(ident)


def _entry_level(
    entries: Collection[AccessEntryRow], identity: str, kind: str, ident: str | None, base: str
) -> str:
    """The most specific entry of `identity` on `kind` wins: the id, then "*", then `base`."""
    by_resource = {
        e.resource: e.permission
        for e in entries
        if e.identity == identity and e.resource_type == kind
    }
    if ident is not None and ident in by_resource:
        return by_resource[ident]
    return by_resource.get("*", base)


def _levels(
    state: AppState, principal: Principal, kinds: Collection[str], ident: str | None
) -> dict[str, str]:
    if principal.kind == "bootstrap":
        return dict.fromkeys(kinds, "manage")
    # A key is capped by its creator's own level (role and entries), read in the same query.
    creator = principal.user_id if principal.kind == "key" and principal.role else None
    identities = [principal.identity] + ([creator] if creator else [])
    with state.db.session() as session:
        entries = session.exec(
            select(AccessEntryRow).where(
                AccessEntryRow.tenant_id == principal.tenant_id,
                col(AccessEntryRow.identity).in_(identities),
                col(AccessEntryRow.resource_type).in_(list(kinds)),
            )
        ).all()
    levels: dict[str, str] = {}
    for kind in kinds:
        if principal.kind != "key":
            base = ROLES.get(principal.role, "none")
            levels[kind] = _entry_level(entries, principal.identity, kind, ident, base)
            continue
        level = _entry_level(
            entries, principal.identity, kind, ident, scope_level(principal.scopes, kind)
        )
        if creator:
            cap = _entry_level(entries, creator, kind, ident, ROLES.get(principal.role, "none"))
            level = min(level, cap, key=RANK.__getitem__)
        levels[kind] = level
    return levels


def effective_level(state: AppState, principal: Principal, kind: str, ident: str | None) -> str:
    return _levels(state, principal, (kind,), ident)[kind]


def manages(state: AppState, principal: Principal, kind: str, ident: str | None = None) -> bool:
    """Whether the caller holds `manage` on `kind` (the admin role, an admin-scoped key or an
    access entry): what sending a stored secret somewhere new, or reading upstream error
    detail, needs (docs/identity.md)."""
    if principal.kind == "bootstrap":
        return True
    return at_least(effective_level(state, principal, kind, ident), "manage")


def levels_everywhere(state: AppState, principal: Principal) -> dict[str, str]:
    """The caller's type-wide level on every resource type (one query)."""
    return _levels(state, principal, tuple(RESOURCE_TYPES), None)


def _identify(
    state: AppState, presented: str | None, kind: str, ident: str | None, needed: str
) -> tuple[Principal, str]:
    principal = authenticate(state, presented)
    if needed == "none":
        return principal, "none"
    return principal, effective_level(state, principal, kind, ident)


async def require_auth(
    request: Request,
    state: StateDep,
    # Declared so the OpenAPI document shows both ways to send a credential.
    _key: Annotated[str | None, Depends(_api_key_header)] = None,
    _bearer: Annotated[Any, Depends(_bearer)] = None,
) -> Principal:
    """Authenticates, rate-limits, meters and authorizes one request (the only such check).

    Every secured route depends on this; the route's path says which resource type it acts
    on and its method which level it needs (core/identity/permissions.py).
    """
    kind, ident = route_resource(request)
    needed = required_level(kind, request.method)
    presented = presented_credential(request)
    if is_bootstrap(state, presented):
        principal, level = bootstrap_principal(state), "manage"
    else:
        try:
            # One thread hop for the credential and the access entries: both read the database.
            principal, level = await asyncio.to_thread(
                _identify, state, presented, kind, ident, needed
            )
        except APIError as err:
            if err.status == 401:
                await _count_failed_auth(request, state)
            raise
    request.state.principal = principal
    tenant_limit = state.limiter.tenant_limit(await state.usage.rate_limit(principal.tenant_id))
    verdict = await state.limiter.hit(
        (state.limiter.per_identity, identity_counter(principal)),
        (tenant_limit, f"tenant:{principal.tenant_id}"),
    )
    refuse_when_limited(request, verdict, f"rate limit of {verdict.limit} requests exceeded")
    usage = await state.usage.count_request(principal.tenant_id)
    add_response_headers(request, usage.headers())
    if usage.refused:
        raise _quota_spent("request", usage.requests.limit, usage)
    if kind == SYSTEM and not principal.system_admin:
        raise APIError(403, "forbidden", "only a system administrator may read /system")
    if not at_least(level, needed):
        raise APIError(
            403,
            "forbidden",
            f"{needed} permission on {kind} is needed; this {principal.kind} has {level}",
        )
    if request.method == "POST" and _route_path(request) in STARTS_RUNS and usage.tokens.exhausted:
        raise _quota_spent("token", usage.tokens.limit, usage)
    return principal


PrincipalDep = Annotated[Principal, Depends(require_auth)]


def identity_counter(principal: Principal) -> str:
    """The rate-limit key of one API key or user (GET /usage peeks at it)."""
    return f"id:{principal.identity}"


async def require_system_admin(principal: PrincipalDep) -> Principal:
    if not principal.system_admin:
        raise APIError(403, "forbidden", "only a system administrator may do this")
    return principal


def _client_host(request: Request) -> str:
    """The client's address as per-address counters know it: the peer, or what a trusted
    proxy says (api/proxies.py; the middleware has put it in request.client)."""
    return proxies.rate_key(request.client.host) if request.client else "unknown"


async def _count_failed_auth(request: Request, state: AppState) -> None:
    """Counts a refused credential per client address, so guessing keys is rate-limited too."""
    verdict = await state.limiter.hit((state.limiter.login, f"authfail:{_client_host(request)}"))
    refuse_when_limited(request, verdict, "too many failed authentication attempts")


# Routes sharing one counter per address: the cookie variant of a route must not double
# an attacker's attempts.
_CLIENT_COUNTERS = {
    "/login": "login",
    "/ui/login": "login",
    "/register": "register",
    "/ui/register": "register",
    "/token_refresh": "refresh",
    "/ui/token_refresh": "refresh",
    "/logout": "refresh",
    "/ui/logout": "refresh",
}


async def limit_by_client(request: Request, state: StateDep) -> None:
    """For routes without credentials (/login, /register, refresh, logout): a limit per
    client address."""
    path = _route_path(request)
    counter = _CLIENT_COUNTERS.get(path, path)
    verdict = await state.limiter.hit(
        (state.limiter.login, f"ip:{_client_host(request)}:{counter}")
    )
    refuse_when_limited(request, verdict, "too many attempts")


def refuse_when_limited(request: Request, verdict: Verdict, what: str) -> None:
    """Puts a counter's headers on the response; a 429 saying `what` once its limit is spent."""
    add_response_headers(request, verdict.headers())
    if not verdict.allowed:
        retry = verdict.headers()["Retry-After"]
        raise APIError(
            429, "rate_limited", f"{what}; retry after {retry} s", headers=verdict.headers()
        )


def _quota_spent(kind: str, limit: int, usage: Snapshot) -> APIError:
    reset = period_reset(usage.period)
    return APIError(
        429,
        "quota_exceeded",
        f"monthly {kind} quota of {limit} is used up; it resets on {reset.date().isoformat()}",
        headers={**usage.headers(), **_retry_at(reset)},
    )


def add_response_headers(request: Request, headers: dict[str, str]) -> None:
    """Headers the middleware puts on the response, whatever it turns out to be (api/middleware)."""
    extra: dict[str, str] = request.scope.setdefault("chainloom.headers", {})
    extra.update(headers)


def _retry_at(moment: datetime) -> dict[str, str]:
    return {"Retry-After": str(max(1, int((moment - datetime.now(UTC)).total_seconds())))}


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
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError as err:  # 9999-12-31T23:59-05:00 lies past the last datetime
        raise APIError(
            400, "invalid_cursor", f"cursor {cursor!r} is out of range", param="cursor"
        ) from err


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
