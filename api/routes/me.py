"""The caller (seed 003): /me, /ui/me, and /projects (the tenants the signed-in user belongs
to, as seed 002 calls them).
"""

from typing import Annotated, Literal

from pydantic import Field
from sqlmodel import Session, col, select

from api.deps import (
    AppState,
    Principal,
    PrincipalDep,
    StateDep,
)
from api.errors import APIError, not_found
from api.routes.users import (
    LoginOut,
    MeIn,
    ProjectIn,
    ProjectOut,
    TokensOut,
    UserOut,
    update_profile,
    verify_current_password,
)
from api.schemas import Camel, Timestamp, absent_when_none
from api.strict_json import json_router
from core.identity.credentials import (
    hash_password,
)
from core.models import (
    ApiKeyRow,
    MembershipRow,
    TenantRow,
    UserRow,
)

router = json_router(tags=["users"])


class MeUser(UserOut):
    """A signed-in user."""

    kind: Literal["user"] = "user"
    system_admin: bool


class MeKey(Camel):
    """An API key."""

    kind: Literal["key"] = "key"
    id: str
    tenant_id: str
    name: str
    prefix: str
    scopes: list[str]
    user_id: str | None = Field(description="The user who made the key.")


class MeBootstrap(Camel):
    """The bootstrap key (CHAINLOOM_API_KEY)."""

    kind: Literal["bootstrap"] = "bootstrap"
    id: str
    tenant_id: str
    system_admin: bool


Me = Annotated[MeUser | MeKey | MeBootstrap, Field(discriminator="kind")]


class ProfileOut(UserOut):
    """The user as changed; a new password ended every session, so new tokens come along."""

    token: str | None = absent_when_none("Sent when the password changed.")
    refresh_token: str | None = absent_when_none()
    expires_at: Timestamp | None = absent_when_none()


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


def _me(state: AppState, principal: Principal) -> MeUser | MeKey | MeBootstrap:
    with state.db.session() as session:
        if principal.kind == "user":
            user = _signed_in_user(session, principal)
            return MeUser(
                **dict(UserOut.of(user, principal.role, principal.tenant_id)),
                system_admin=principal.system_admin,
            )
        if principal.kind == "key":
            key = session.get(ApiKeyRow, principal.identity)
            return MeKey(
                id=principal.identity,
                tenant_id=principal.tenant_id,
                name=key.name if key else "",
                prefix=key.prefix if key else "",
                scopes=list(principal.scopes),
                user_id=principal.user_id,
            )
    return MeBootstrap(
        id=principal.identity,
        tenant_id=principal.tenant_id,
        system_admin=principal.system_admin,
    )


@router.get(
    "/me",
    response_model=Me,
    summary="Returns the caller: a user, an API key or the bootstrap key.",
)
@router.get(
    "/ui/me",
    response_model=Me,
    summary="Returns the currently authenticated user (for UI clients).",
    operation_id="get_ui_me_ui_me_get",
)
def get_me(state: StateDep, principal: PrincipalDep) -> MeUser | MeKey | MeBootstrap:
    return _me(state, principal)


@router.patch(
    "/me",
    summary="Updates the caller's profile; email and password need currentPassword.",
)
def patch_me(body: MeIn, state: StateDep, principal: PrincipalDep) -> ProfileOut:
    with state.db.session() as session:
        user = _signed_in_user(session, principal)
        if body.email is not None or body.password is not None:
            verify_current_password(user, body.current_password)
        new_hash = hash_password(body.password) if body.password is not None else None
        update_profile(session, user, body, new_hash)
        tokens = TokensOut.issue(state, user, principal.tenant_id) if new_hash else None
        return ProfileOut(
            **dict(UserOut.of(user, principal.role, principal.tenant_id)),
            **(dict(tokens) if tokens else {}),
        )


@router.get(
    "/projects",
    response_model=list[ProjectOut],
    summary="Lists the tenants (projects) the caller belongs to, with the caller's role.",
)
def list_projects(state: StateDep, principal: PrincipalDep) -> list[ProjectOut]:
    with state.db.session() as session:
        if principal.kind != "user":
            names = _tenant_names(session, [principal.tenant_id])
            role = principal.role if principal.kind == "bootstrap" else None
            name = names.get(principal.tenant_id, principal.tenant_id)
            return [ProjectOut(id=principal.tenant_id, name=name, role=role)]
        memberships = session.exec(
            select(MembershipRow)
            .where(MembershipRow.user_id == principal.user_id)
            .order_by(col(MembershipRow.created_at))
        ).all()
        names = _tenant_names(session, [m.tenant_id for m in memberships])
    return [
        ProjectOut(id=m.tenant_id, name=names.get(m.tenant_id, m.tenant_id), role=m.role)
        for m in memberships
    ]


@router.post(
    "/projects",
    status_code=201,
    response_model=ProjectOut,
    summary="Creates a tenant (project) with the caller as its admin.",
)
def create_project(body: ProjectIn, state: StateDep, principal: PrincipalDep) -> ProjectOut:
    if not state.settings.registration_open and not principal.system_admin:
        # A tenant made here is a tenant made without registration.
        raise APIError(403, "registration_closed", "creating projects is closed on this server")
    with state.db.session() as session:
        user = _signed_in_user(session, principal)
        tenant = TenantRow(name=body.name)
        session.add(tenant)
        session.add(MembershipRow(tenant_id=tenant.id, user_id=user.id, role="admin"))
        session.commit()
        return ProjectOut(id=tenant.id, name=tenant.name, role="admin")


@router.post(
    "/projects/{id}/token",
    response_model=LoginOut,
    summary="Issues tokens scoped to one of the caller's tenants (projects).",
)
def project_token(id: str, state: StateDep, principal: PrincipalDep) -> LoginOut:
    with state.db.session() as session:
        user = _signed_in_user(session, principal)
        member = session.get(MembershipRow, (id, user.id))
    if member is None:
        raise not_found("project", id)
    return LoginOut.of(TokensOut.issue(state, user, id), user, member.role, id)
