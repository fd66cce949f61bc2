"""/event-triggers: run a stored function whenever an event of a type is appended (seed 003).

Dispatch itself is in core/events/triggers.py; this module only stores the definitions.
"""

from typing import Any, Literal

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from api.deps import PrincipalDep, StateDep, tenant_page
from api.errors import APIError, not_found
from api.strict_json import json_router
from core.events.triggers import Listener, Trigger, trigger_json
from core.models import EventTriggerRow, FunctionRow, utcnow

router = json_router(tags=["event-triggers"])


class TriggerIn(BaseModel):
    """seed 003 functionstore.EventTrigger as sent; createdAt/updatedAt are ignored."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    name: str = Field("", max_length=200, description="Unique; taken from the path on PUT.")
    description: str = Field("", max_length=4000)
    listen_for: Listener = Field(..., alias="listenFor")
    type: Literal["function"] = Field("function", description="Only `function` exists.")
    function: str = Field(..., min_length=1, max_length=200)


def _check_function(session: Session, tenant_id: str, name: str) -> None:
    if session.get(FunctionRow, (tenant_id, name)) is None:
        raise APIError(
            422,
            "unknown_function",
            f"function {name!r} does not exist; create it with POST /functions first",
            param="function",
            errors=[{"field": "/function", "message": "unknown function", "code": "unknown"}],
        )


@router.get(
    "/event-triggers",
    response_model=list[Trigger],
    summary="Lists all event triggers with pagination, oldest first.",
)
def list_triggers(
    state: StateDep,
    principal: PrincipalDep,
    limit: str | None = None,
    cursor: str | None = Query(None, description="RFC3339Nano createdAt of the last item."),
) -> list[dict[str, Any]]:
    query = tenant_page(EventTriggerRow, principal.tenant_id, limit, cursor)
    with state.db.session() as session:
        return [trigger_json(row) for row in session.exec(query).all()]


@router.post(
    "/event-triggers",
    status_code=201,
    response_model=Trigger,
    summary="Creates a new event trigger.",
    description="The function must exist (422 otherwise); names are unique (409).",
)
def create_trigger(body: TriggerIn, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    if not body.name.strip():
        raise APIError(422, "validation_error", "name is required", param="name")
    row = EventTriggerRow(
        tenant_id=principal.tenant_id,
        name=body.name,
        description=body.description,
        listen_for_type=body.listen_for.type,
        type=body.type,
        function_name=body.function,
    )
    with state.db.session() as session:
        _check_function(session, principal.tenant_id, body.function)
        session.add(row)
        try:
            session.commit()
        except IntegrityError as err:
            raise APIError(
                409, "already_exists", f"an event trigger named {body.name!r} exists"
            ) from err
    return trigger_json(row)


def _filtered(state: StateDep, tenant_id: str, **match: str) -> list[dict[str, Any]]:
    query = select(EventTriggerRow).where(EventTriggerRow.tenant_id == tenant_id)
    for column, value in match.items():
        query = query.where(getattr(EventTriggerRow, column) == value)
    with state.db.session() as session:
        rows = session.exec(query.order_by(col(EventTriggerRow.created_at))).all()
    return [trigger_json(row) for row in rows]


@router.get(
    "/event-triggers/event-type/{eventType}",
    response_model=list[Trigger],
    summary="Lists event triggers filtered by event type.",
)
def triggers_by_event_type(
    eventType: str, state: StateDep, principal: PrincipalDep
) -> list[dict[str, Any]]:
    return _filtered(state, principal.tenant_id, listen_for_type=eventType)


@router.get(
    "/event-triggers/function/{functionName}",
    response_model=list[Trigger],
    summary="Lists event triggers filtered by function name.",
)
def triggers_by_function(
    functionName: str, state: StateDep, principal: PrincipalDep
) -> list[dict[str, Any]]:
    return _filtered(state, principal.tenant_id, function_name=functionName)


def _load(session: Session, tenant_id: str, name: str) -> EventTriggerRow:
    row = session.get(EventTriggerRow, (tenant_id, name))
    if row is None:
        raise not_found("event trigger", name)
    return row


@router.get(
    "/event-triggers/{name}",
    response_model=Trigger,
    summary="Retrieves details for a specific event trigger.",
)
def get_trigger(name: str, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    with state.db.session() as session:
        return trigger_json(_load(session, principal.tenant_id, name))


@router.put(
    "/event-triggers/{name}",
    response_model=Trigger,
    summary="Updates an existing event trigger configuration.",
    description="The name from the URL path overrides any name in the request body.",
)
def update_trigger(
    name: str, body: TriggerIn, state: StateDep, principal: PrincipalDep
) -> dict[str, Any]:
    with state.db.session() as session:
        row = _load(session, principal.tenant_id, name)
        _check_function(session, principal.tenant_id, body.function)
        row.description = body.description
        row.listen_for_type = body.listen_for.type
        row.type = body.type
        row.function_name = body.function
        row.updated_at = utcnow()
        session.add(row)
        session.commit()
    return trigger_json(row)


@router.delete("/event-triggers/{name}", response_model=str, summary="Deletes an event trigger.")
def delete_trigger(name: str, state: StateDep, principal: PrincipalDep) -> str:
    with state.db.session() as session:
        session.delete(_load(session, principal.tenant_id, name))
        session.commit()
    return "event trigger removed"
