"""/taskchains: store and manage chain definitions (seed 003).

A stored chain is kept as its definition's JSON (chains.spec.ChainDefinition, defaults filled
in) and answered as stored: it is not validated again on the way out, so a chain stored
before the language grew stricter can still be read, and fixed.
"""

from typing import Annotated, Any

from fastapi import Body, Query
from fastapi.responses import JSONResponse
from pydantic import WithJsonSchema

from api.chain_validation import validate_chain
from api.deps import PrincipalDep, StateDep, tenant_page
from api.errors import APIError, not_found
from api.strict_json import json_router
from chains.schema import chain_json_schema
from chains.spec import ChainDefinition
from core.models import TaskChainRow, utcnow

router = json_router(tags=["taskchains"])

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


# Documented as a chain definition (the component the responses below put in the document)
# but checked by the chain loader (api/chain_validation), whose 422 names every problem by
# JSON pointer and lints gotos as well.
ChainBody = Annotated[
    dict[str, Any],
    WithJsonSchema({"$ref": "#/components/schemas/ChainDefinition"}),
    Body(openapi_examples={"sentiment-router": {"value": _EXAMPLE}}),
]


def _stored(definition: Any, status_code: int = 200) -> JSONResponse:
    """Stored definitions as the answer, sent as they are: their shape is the route's
    response model (they were made by it), which is not applied again here."""
    return JSONResponse(definition, status_code=status_code)


@router.get(
    "/taskchains/schema",
    # A JSON Schema document (draft 2020-12): free-form by nature.
    response_model=dict[str, Any],
    summary="The JSON Schema of a task chain definition.",
)
def get_schema(_: PrincipalDep) -> dict[str, Any]:
    return chain_json_schema()


@router.get(
    "/taskchains",
    response_model=list[ChainDefinition],
    summary="Lists all task chain definitions with pagination.",
)
def list_chains(
    state: StateDep,
    principal: PrincipalDep,
    limit: str | None = Query(None, description="The maximum number of items to return."),
    cursor: str | None = Query(None, description="RFC3339Nano timestamp of the last item seen."),
) -> JSONResponse:
    query = tenant_page(TaskChainRow, principal.tenant_id, limit, cursor)
    with state.db.session() as session:
        return _stored([row.definition for row in session.exec(query).all()])


@router.post(
    "/taskchains",
    status_code=201,
    response_model=ChainDefinition,
    summary="Creates a new task chain definition.",
)
def create_chain(state: StateDep, principal: PrincipalDep, body: ChainBody) -> JSONResponse:
    chain = validate_chain(body)
    data = chain.model_dump(mode="json")
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
    return _stored(data, 201)


@router.get(
    "/taskchains/{id}",
    response_model=ChainDefinition,
    summary="Retrieves a specific task chain by ID.",
)
def get_chain(id: str, state: StateDep, principal: PrincipalDep) -> JSONResponse:
    with state.db.session() as session:
        row = session.get(TaskChainRow, (principal.tenant_id, id))
        if row is None:
            raise not_found("task chain", id)
        return _stored(row.definition)


@router.put(
    "/taskchains/{id}",
    response_model=ChainDefinition,
    summary="Updates an existing task chain definition.",
)
def update_chain(
    id: str, state: StateDep, principal: PrincipalDep, body: ChainBody
) -> JSONResponse:
    # The id in the path wins over the body, as the seed says for other resources.
    chain = validate_chain({**body, "id": id})
    definition = chain.model_dump(mode="json")
    with state.db.session() as session:
        row = session.get(TaskChainRow, (principal.tenant_id, id))
        if row is None:
            raise not_found("task chain", id)
        row.definition = definition
        row.description = chain.description
        row.updated_at = utcnow()
        session.add(row)
        session.commit()
    return _stored(definition)


@router.delete("/taskchains/{id}", summary="Deletes a task chain definition.")
def delete_chain(id: str, state: StateDep, principal: PrincipalDep) -> str:
    with state.db.session() as session:
        row = session.get(TaskChainRow, (principal.tenant_id, id))
        if row is None:
            raise not_found("task chain", id)
        session.delete(row)
        session.commit()
    return "task chain removed"
