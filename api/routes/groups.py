"""/groups: affinity groups that pair backends with models for routing (seed 003)."""

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select

from api.deps import PrincipalDep, StateDep, owned, tenant_page
from api.errors import APIError, not_found
from api.schemas import Camel, Timestamp
from api.strict_json import json_router
from core.models import AffinityGroupRow, GroupBackendRow, GroupModelRow, utcnow

router = json_router(tags=["groups"])

_CURSOR = Query(None, description="RFC3339Nano createdAt of the last item.")


class GroupIn(BaseModel):
    # The seed's body is the whole AffinityGroup; id and timestamps in it are ignored.
    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    name: str = Field(..., min_length=1, max_length=200)
    purpose_type: str = Field("", alias="purposeType", max_length=200)

    @field_validator("name")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("name must not be blank")
        return value


class GroupOut(Camel):
    id: str
    name: str
    purpose_type: str
    created_at: Timestamp
    updated_at: Timestamp


def load_group(session: Session, tenant_id: str, group_id: str) -> AffinityGroupRow:
    return owned(session, AffinityGroupRow, group_id, tenant_id, "group")


def remove_memberships(
    session: Session,
    backend_id: str | None = None,
    model_id: str | None = None,
    group_id: str | None = None,
) -> None:
    """Queue the deletion of every membership of a backend, model or group; the caller commits.

    Called where a backend, model or group is deleted, so no membership outlives its resource.
    It lives here, not in affinity.py, because this module imports no other route module:
    backends.py and models.py can import it without an import cycle.
    """
    if backend_id is not None:
        session.exec(delete(GroupBackendRow).where(col(GroupBackendRow.backend_id) == backend_id))
    if model_id is not None:
        session.exec(delete(GroupModelRow).where(col(GroupModelRow.model_id) == model_id))
    if group_id is not None:
        session.exec(delete(GroupBackendRow).where(col(GroupBackendRow.group_id) == group_id))
        session.exec(delete(GroupModelRow).where(col(GroupModelRow.group_id) == group_id))


def _conflict(name: str) -> APIError:
    return APIError(409, "already_exists", f"a group named {name!r} exists", param="name")


def _page(
    state: StateDep, tenant_id: str, limit: str | None, cursor: str | None, purpose: str | None
) -> list[GroupOut]:
    query = tenant_page(AffinityGroupRow, tenant_id, limit, cursor)
    if purpose is not None:
        query = query.where(AffinityGroupRow.purpose_type == purpose)
    with state.db.session() as session:
        return [GroupOut.model_validate(row) for row in session.exec(query).all()]


@router.get(
    "/groups",
    response_model=list[GroupOut],
    summary="Lists all affinity groups in the system.",
)
def list_groups(
    state: StateDep,
    principal: PrincipalDep,
    limit: str | None = None,
    cursor: str | None = _CURSOR,
) -> list[GroupOut]:
    return _page(state, principal.tenant_id, limit, cursor, None)


@router.post(
    "/groups",
    status_code=201,
    response_model=GroupOut,
    summary="Creates a new affinity group for organizing backends and models.",
)
def create_group(body: GroupIn, state: StateDep, principal: PrincipalDep) -> GroupOut:
    row = AffinityGroupRow(
        tenant_id=principal.tenant_id, name=body.name, purpose_type=body.purpose_type
    )
    with state.db.session() as session:
        session.add(row)
        try:
            session.commit()
        except IntegrityError as err:
            raise _conflict(body.name) from err
    return GroupOut.model_validate(row)


@router.get(
    "/groups/{id}",
    response_model=GroupOut,
    summary="Retrieves an specific affinity group by its unique ID.",
)
def get_group(id: str, state: StateDep, principal: PrincipalDep) -> GroupOut:
    with state.db.session() as session:
        return GroupOut.model_validate(load_group(session, principal.tenant_id, id))


@router.put(
    "/groups/{id}",
    response_model=GroupOut,
    summary="Updates an existing affinity group configuration.",
)
def update_group(id: str, body: GroupIn, state: StateDep, principal: PrincipalDep) -> GroupOut:
    with state.db.session() as session:
        row = load_group(session, principal.tenant_id, id)
        row.name, row.purpose_type = body.name, body.purpose_type
        row.updated_at = utcnow()
        session.add(row)
        try:
            session.commit()
        except IntegrityError as err:
            raise _conflict(body.name) from err
        return GroupOut.model_validate(row)


@router.delete("/groups/{id}", summary="Removes an affinity group from the system.")
def delete_group(id: str, state: StateDep, principal: PrincipalDep) -> str:
    with state.db.session() as session:
        row = load_group(session, principal.tenant_id, id)
        # Memberships go with the group; the backends and models themselves stay.
        remove_memberships(session, group_id=row.id)
        session.delete(row)
        session.commit()
    return "deleted"


@router.get(
    "/group-by-name/{name}",
    response_model=GroupOut,
    summary="Retrieves an affinity group by its human-readable name.",
)
def get_group_by_name(name: str, state: StateDep, principal: PrincipalDep) -> GroupOut:
    query = select(AffinityGroupRow).where(
        AffinityGroupRow.tenant_id == principal.tenant_id, AffinityGroupRow.name == name
    )
    with state.db.session() as session:
        row = session.exec(query).first()
    if row is None:
        raise not_found("group named", name)
    return GroupOut.model_validate(row)


@router.get(
    "/group-by-purpose/{purpose}",
    response_model=list[GroupOut],
    summary="Lists groups filtered by purpose type with pagination support.",
)
def list_groups_by_purpose(
    purpose: str,
    state: StateDep,
    principal: PrincipalDep,
    limit: str | None = None,
    cursor: str | None = _CURSOR,
) -> list[GroupOut]:
    return _page(state, principal.tenant_id, limit, cursor, purpose)
