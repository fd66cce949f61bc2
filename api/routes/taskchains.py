"""/taskchains: store and manage chain definitions (seed 003)."""

from typing import Any

from fastapi import APIRouter, Body, Query

from api.chain_validation import chain_json, validate_chain
from api.deps import PrincipalDep, StateDep, tenant_page
from api.errors import APIError, not_found
from chains.schema import chain_json_schema
from core.models import TaskChainRow, utcnow

router = APIRouter(tags=["taskchains"])

_EXAMPLE = {
    "id": "sentiment-router",
    "description": "Routes a message by sentiment",
    "tasks": [
        {
            "id": "is_positive",
            "handler": "prompt_to_condition",
            "prompt_template": "Is this positive? Answer positive or negative: {{.input}}",
            "valid_conditions": {"positive": True, "negative": False},
            "execute_config": {"model": "gpt-4o-mini"},
            "transition": {"branches": [{"operator": "default", "goto": "end"}]},
        }
    ],
}


@router.get("/taskchains/schema", summary="The JSON Schema of a task chain definition.")
def get_schema(_: PrincipalDep) -> dict[str, Any]:
    return chain_json_schema()


@router.get("/taskchains", summary="Lists all task chain definitions with pagination.")
def list_chains(
    state: StateDep,
    principal: PrincipalDep,
    limit: str | None = Query(None, description="The maximum number of items to return."),
    cursor: str | None = Query(None, description="RFC3339Nano timestamp of the last item seen."),
) -> list[dict[str, Any]]:
    query = tenant_page(TaskChainRow, principal.tenant_id, limit, cursor)
    with state.db.session() as session:
        return [row.definition for row in session.exec(query).all()]


@router.post("/taskchains", status_code=201, summary="Creates a new task chain definition.")
def create_chain(
    state: StateDep,
    principal: PrincipalDep,
    body: dict[str, Any] = Body(..., examples=[_EXAMPLE]),
) -> dict[str, Any]:
    chain = validate_chain(body)
    data = chain_json(chain)
    with state.db.session() as session:
        if session.get(TaskChainRow, (principal.tenant_id, chain.id)) is not None:
            raise APIError(409, "already_exists", f"task chain {chain.id!r} already exists")
        session.add(
            TaskChainRow(
                tenant_id=principal.tenant_id,
                id=chain.id,
                description=chain.description,
                definition=data,
            )
        )
        session.commit()
    return data


@router.get("/taskchains/{id}", summary="Retrieves a specific task chain by ID.")
def get_chain(id: str, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    with state.db.session() as session:
        row = session.get(TaskChainRow, (principal.tenant_id, id))
        if row is None:
            raise not_found("task chain", id)
        return row.definition


@router.put("/taskchains/{id}", summary="Updates an existing task chain definition.")
def update_chain(
    id: str,
    state: StateDep,
    principal: PrincipalDep,
    body: dict[str, Any] = Body(..., examples=[_EXAMPLE]),
) -> dict[str, Any]:
    if isinstance(body, dict):
        # The id in the path wins over the body, as the seed says for other resources.
        body = {**body, "id": id}
    chain = validate_chain(body)
    data = chain_json(chain)
    with state.db.session() as session:
        row = session.get(TaskChainRow, (principal.tenant_id, id))
        if row is None:
            raise not_found("task chain", id)
        row.definition = data
        row.description = chain.description
        row.updated_at = utcnow()
        session.add(row)
        session.commit()
    return data


@router.delete("/taskchains/{id}", summary="Deletes a task chain definition.")
def delete_chain(id: str, state: StateDep, principal: PrincipalDep) -> str:
    with state.db.session() as session:
        row = session.get(TaskChainRow, (principal.tenant_id, id))
        if row is None:
            raise not_found("task chain", id)
        session.delete(row)
        session.commit()
    return "task chain removed"
