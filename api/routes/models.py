"""/models: models declared to the system (seed 003)."""

import anyio
from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError

from api.deps import PrincipalDep, StateDep, owned, tenant_page
from api.errors import APIError
from api.routes.groups import remove_memberships
from api.routes.queue import purge_model_downloads, queue_declared_model
from api.schemas import Camel, Timestamp
from api.strict_json import json_router
from core.models import ModelRow, utcnow

router = json_router(tags=["models"])


class ModelIn(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    model: str = Field(..., min_length=1, max_length=400)
    can_chat: bool = Field(True, alias="canChat")
    can_embed: bool = Field(False, alias="canEmbed")
    can_prompt: bool = Field(True, alias="canPrompt")
    can_stream: bool = Field(True, alias="canStream")
    # The column is a 32-bit integer on PostgreSQL.
    context_length: int = Field(0, alias="contextLength", ge=0, le=2**31 - 1)


class ModelOut(Camel):
    id: str
    model: str
    can_chat: bool
    can_embed: bool
    can_prompt: bool
    can_stream: bool
    context_length: int
    created_at: Timestamp
    updated_at: Timestamp


@router.get(
    "/models",
    response_model=list[ModelOut],
    summary="Lists all registered models in internal format.",
)
def list_models(
    state: StateDep,
    principal: PrincipalDep,
    limit: str | None = None,
    cursor: str | None = Query(None, description="RFC3339Nano createdAt of the last item."),
) -> list[ModelOut]:
    query = tenant_page(ModelRow, principal.tenant_id, limit, cursor)
    with state.db.session() as session:
        return [ModelOut.model_validate(row) for row in session.exec(query).all()]


@router.post(
    "/models",
    status_code=201,
    response_model=ModelOut,
    summary="Declares a new model to the system.",
)
def create_model(body: ModelIn, state: StateDep, principal: PrincipalDep) -> ModelOut:
    row = ModelRow(tenant_id=principal.tenant_id, **body.model_dump(by_alias=False))
    with state.db.session() as session:
        session.add(row)
        try:
            session.commit()
        except IntegrityError as err:
            raise APIError(
                409, "already_exists", f"model {body.model!r} is already declared"
            ) from err
    # Seed 003: a model an ollama backend lacks is queued for download there (never fails
    # the request: with Temporal down, the state sync queues it later).
    anyio.from_thread.run(queue_declared_model, state, principal.tenant_id, row.model)
    return ModelOut.model_validate(row)


def _load(state: StateDep, tenant_id: str, model_id: str) -> ModelRow:
    with state.db.session() as session:
        return owned(session, ModelRow, model_id, tenant_id, "model")


@router.put(
    "/models/{id}", response_model=ModelOut, summary="Updates an existing model registration."
)
def update_model(id: str, body: ModelIn, state: StateDep, principal: PrincipalDep) -> ModelOut:
    row = _load(state, principal.tenant_id, id)
    if body.model != row.model:
        raise APIError(422, "immutable_field", "a model's name cannot be changed", param="model")
    for key, value in body.model_dump(by_alias=False).items():
        setattr(row, key, value)
    row.updated_at = utcnow()
    with state.db.session() as session:
        session.add(session.merge(row))
        session.commit()
    return ModelOut.model_validate(row)


@router.delete("/models/{id}", summary="Deletes a model from the system registry.")
def delete_model(
    id: str,
    state: StateDep,
    principal: PrincipalDep,
    purge: str | None = Query(
        None,
        description="If true, also removes the model from the download queue and cancels any "
        "in-progress downloads.",
    ),
) -> str:
    row = _load(state, principal.tenant_id, id)
    with state.db.session() as session:
        remove_memberships(session, model_id=id)
        session.delete(session.merge(row))
        session.commit()
    if (purge or "").lower() in ("true", "1", "yes"):
        # After the delete, so the state sync cannot queue the model again in between.
        anyio.from_thread.run(purge_model_downloads, state, principal.tenant_id, row.model)
    return "model removed"
