"""/backend-affinity and /model-affinity: which backends and models share a group (seed 003).

Listings join through the backend and model tables, so a membership whose backend or model is
gone never shows up, even before `remove_memberships` has cleaned it away.
`remove_memberships` is defined in groups.py (importable from backends.py and models.py without
a cycle) and re-exported here.
"""

from fastapi import Response
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from api.deps import PrincipalDep, StateDep, owned
from api.errors import APIError
from api.routes.backends import BackendOut
from api.routes.groups import GroupOut, load_group, remove_memberships
from api.routes.models import ModelOut
from api.strict_json import json_router
from core.backends.keys import provider_bindings
from core.models import AffinityGroupRow, BackendRow, GroupBackendRow, GroupModelRow, ModelRow

__all__ = ["remove_memberships", "router"]

router = json_router(tags=["affinity"])


def _backend(session: Session, tenant_id: str, backend_id: str) -> BackendRow:
    return owned(session, BackendRow, backend_id, tenant_id, "backend")


def _model(session: Session, tenant_id: str, model_id: str) -> ModelRow:
    return owned(session, ModelRow, model_id, tenant_id, "model")


def _add(session: Session, member: GroupBackendRow | GroupModelRow) -> bool:
    """Insert a membership; False when it already existed (assigning twice is not an error)."""
    session.add(member)
    try:
        session.commit()
    except IntegrityError:
        # The primary key (group, member) is taken: someone assigned it first.
        session.rollback()
        return False
    return True


def _not_member(kind: str, member_id: str, group_id: str) -> APIError:
    return APIError(404, "not_found", f"{kind} {member_id!r} is not in group {group_id!r}")


# --------------------------------------------------------------------------- backends


@router.post(
    "/backend-affinity/{groupID}/backends/{backendID}",
    status_code=201,
    response_model=str,
    summary="Associates a backend with an affinity group.",
    description="201 when assigned now, 200 when the backend was already in the group.",
)
def assign_backend(
    groupID: str, backendID: str, response: Response, state: StateDep, principal: PrincipalDep
) -> str:
    tenant = principal.tenant_id
    with state.db.session() as session:
        load_group(session, tenant, groupID)
        _backend(session, tenant, backendID)
        if session.get(GroupBackendRow, (groupID, backendID)) is None and _add(
            session, GroupBackendRow(group_id=groupID, backend_id=backendID, tenant_id=tenant)
        ):
            return "backend assigned"
    response.status_code = 200
    return "backend already assigned"


@router.delete(
    "/backend-affinity/{groupID}/backends/{backendID}",
    response_model=str,
    summary="Removes a backend from an affinity group.",
)
def unassign_backend(groupID: str, backendID: str, state: StateDep, principal: PrincipalDep) -> str:
    with state.db.session() as session:
        member = session.get(GroupBackendRow, (groupID, backendID))
        if member is None or member.tenant_id != principal.tenant_id:
            raise _not_member("backend", backendID, groupID)
        session.delete(member)
        session.commit()
    return "backend removed"


@router.get(
    "/backend-affinity/{groupID}/backends",
    response_model=list[BackendOut],
    summary="Lists all backends associated with a specific affinity group.",
)
def list_group_backends(groupID: str, state: StateDep, principal: PrincipalDep) -> list[BackendOut]:
    tenant = principal.tenant_id
    query = (
        select(BackendRow)
        .join(GroupBackendRow, col(GroupBackendRow.backend_id) == col(BackendRow.id))
        .where(GroupBackendRow.group_id == groupID, BackendRow.tenant_id == tenant)
        .order_by(col(BackendRow.created_at), col(BackendRow.id))
    )
    bindings = provider_bindings(state.db, tenant)
    with state.db.session() as session:
        load_group(session, tenant, groupID)
        return [BackendOut.of(row, bindings) for row in session.exec(query).all()]


@router.get(
    "/backend-affinity/{backendID}/groups",
    response_model=list[GroupOut],
    summary="Lists all affinity groups that a specific backend belongs to.",
)
def list_backend_groups(backendID: str, state: StateDep, principal: PrincipalDep) -> list[GroupOut]:
    tenant = principal.tenant_id
    query = (
        select(AffinityGroupRow)
        .join(GroupBackendRow, col(GroupBackendRow.group_id) == col(AffinityGroupRow.id))
        .where(GroupBackendRow.backend_id == backendID, AffinityGroupRow.tenant_id == tenant)
        .order_by(col(AffinityGroupRow.created_at), col(AffinityGroupRow.id))
    )
    with state.db.session() as session:
        _backend(session, tenant, backendID)
        return [GroupOut.model_validate(row) for row in session.exec(query).all()]


# --------------------------------------------------------------------------- models


@router.post(
    "/model-affinity/{groupID}/models/{modelID}",
    status_code=201,
    response_model=str,
    summary="Associates a model with an affinity group.",
    description="201 when assigned now, 200 when the model was already in the group.",
)
def assign_model(
    groupID: str, modelID: str, response: Response, state: StateDep, principal: PrincipalDep
) -> str:
    tenant = principal.tenant_id
    with state.db.session() as session:
        load_group(session, tenant, groupID)
        _model(session, tenant, modelID)
        if session.get(GroupModelRow, (groupID, modelID)) is None and _add(
            session, GroupModelRow(group_id=groupID, model_id=modelID, tenant_id=tenant)
        ):
            return "model assigned"
    response.status_code = 200
    return "model already assigned"


@router.delete(
    "/model-affinity/{groupID}/models/{modelID}",
    response_model=str,
    summary="Removes a model from an affinity group.",
)
def unassign_model(groupID: str, modelID: str, state: StateDep, principal: PrincipalDep) -> str:
    with state.db.session() as session:
        member = session.get(GroupModelRow, (groupID, modelID))
        if member is None or member.tenant_id != principal.tenant_id:
            raise _not_member("model", modelID, groupID)
        session.delete(member)
        session.commit()
    return "model removed"


@router.get(
    "/model-affinity/{groupID}/models",
    response_model=list[ModelOut],
    summary="Lists all models associated with a specific affinity group.",
)
def list_group_models(groupID: str, state: StateDep, principal: PrincipalDep) -> list[ModelOut]:
    tenant = principal.tenant_id
    query = (
        select(ModelRow)
        .join(GroupModelRow, col(GroupModelRow.model_id) == col(ModelRow.id))
        .where(GroupModelRow.group_id == groupID, ModelRow.tenant_id == tenant)
        .order_by(col(ModelRow.created_at), col(ModelRow.id))
    )
    with state.db.session() as session:
        load_group(session, tenant, groupID)
        return [ModelOut.model_validate(row) for row in session.exec(query).all()]


@router.get(
    "/model-affinity/{modelID}/groups",
    response_model=list[GroupOut],
    summary="Lists all affinity groups that a specific model belongs to.",
)
def list_model_groups(modelID: str, state: StateDep, principal: PrincipalDep) -> list[GroupOut]:
    tenant = principal.tenant_id
    query = (
        select(AffinityGroupRow)
        .join(GroupModelRow, col(GroupModelRow.group_id) == col(AffinityGroupRow.id))
        .where(GroupModelRow.model_id == modelID, AffinityGroupRow.tenant_id == tenant)
        .order_by(col(AffinityGroupRow.created_at), col(AffinityGroupRow.id))
    )
    with state.db.session() as session:
        _model(session, tenant, modelID)
        return [GroupOut.model_validate(row) for row in session.exec(query).all()]
