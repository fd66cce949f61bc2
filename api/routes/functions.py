"""/functions: stored JavaScript functions (seed 003 functionstore.Function).

A script is parsed in the JS sandbox when it is created or updated, so a syntax error is a
422 naming the line rather than a failed run later. How scripts run: docs/functions.md.
"""

import asyncio
import re

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from sqlmodel import select

from api.deps import PrincipalDep, StateDep, tenant_page
from api.errors import APIError, not_found
from api.schemas import Camel, Timestamp
from api.strict_json import json_router
from core.config import Settings
from core.models import EventTriggerRow, FunctionRow, utcnow
from core.sandbox.pool import JSError, runner_for

router = json_router(tags=["functions"])

NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
# Every name contenox gives a script: they all run as JavaScript here.
SCRIPT_TYPES = ("goja", "javascript", "js")
MAX_SCRIPT_CHARS = 1024 * 1024


class FunctionIn(BaseModel):
    """seed 003 functionstore.Function as sent; createdAt/updatedAt are ignored."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    name: str = Field(
        "",
        max_length=200,
        description="Unique per tenant: letters, digits, `_`, `-`, `.`; taken from the path "
        "on PUT.",
    )
    description: str = Field("", max_length=4000)
    script_type: str = Field("goja", alias="scriptType", description="goja (JavaScript).")
    script: str = Field(
        ...,
        min_length=1,
        max_length=MAX_SCRIPT_CHARS,
        description="JavaScript defining `function main(input)`; see docs/functions.md.",
    )


class FunctionOut(Camel):
    """seed 003 functionstore.Function."""

    name: str
    description: str
    script_type: str
    script: str
    created_at: Timestamp
    updated_at: Timestamp


def _check_name(name: str) -> None:
    if not name or not re.match(NAME_PATTERN, name):
        raise APIError(
            422,
            "invalid_name",
            f"function name {name!r} must be letters, digits, '_', '-' or '.', not starting "
            "with '.' or '-'",
            param="name",
            errors=[{"field": "/name", "message": "invalid function name", "code": "invalid"}],
        )


async def _check(settings: Settings, tenant_id: str, body: FunctionIn) -> None:
    if body.script_type not in SCRIPT_TYPES:
        raise APIError(
            422,
            "invalid_script_type",
            f"scriptType {body.script_type!r} is not supported; use one of "
            f"{', '.join(SCRIPT_TYPES)} (all run as JavaScript)",
            param="scriptType",
            errors=[{"field": "/scriptType", "message": "unsupported", "code": "invalid"}],
        )
    try:
        await runner_for(settings).check(body.script, tenant=tenant_id)
    except JSError as err:
        if err.kind == "busy":
            raise APIError(
                503,
                "sandbox_busy",
                f"could not check the script now: {err.message}",
                headers={"Retry-After": "1"},
            ) from err
        if err.kind != "syntax":
            raise APIError(
                503, "sandbox_unavailable", f"could not check the script: {err.message}"
            ) from err
        raise APIError(
            422,
            "invalid_script",
            f"the script does not parse: {err.message}",
            param="script",
            errors=[{"field": "/script", "message": err.message, "code": "syntax_error"}],
        ) from err


@router.get(
    "/functions",
    response_model=list[FunctionOut],
    summary="Lists all registered functions with pagination, oldest first.",
)
async def list_functions(
    state: StateDep,
    principal: PrincipalDep,
    limit: str | None = None,
    cursor: str | None = Query(None, description="RFC3339Nano createdAt of the last item."),
) -> list[FunctionOut]:
    query = tenant_page(FunctionRow, principal.tenant_id, limit, cursor)

    def load() -> list[FunctionOut]:
        with state.db.session() as session:
            return [FunctionOut.model_validate(row) for row in session.exec(query).all()]

    return await asyncio.to_thread(load)


@router.post(
    "/functions",
    status_code=201,
    response_model=FunctionOut,
    summary="Creates a new serverless function.",
)
async def create_function(
    body: FunctionIn, state: StateDep, principal: PrincipalDep
) -> FunctionOut:
    _check_name(body.name)
    await _check(state.settings, principal.tenant_id, body)
    row = FunctionRow(
        tenant_id=principal.tenant_id,
        name=body.name,
        description=body.description,
        script_type=body.script_type,
        script=body.script,
    )

    def insert() -> FunctionOut:
        with state.db.session() as session:
            session.add(row)
            try:
                session.commit()
            except IntegrityError as err:
                raise APIError(
                    409, "already_exists", f"a function named {body.name!r} exists", param="name"
                ) from err
            return FunctionOut.model_validate(row)

    return await asyncio.to_thread(insert)


def _load(state: StateDep, tenant_id: str, name: str) -> FunctionRow:
    with state.db.session() as session:
        row = session.get(FunctionRow, (tenant_id, name))
    if row is None:
        raise not_found("function", name)
    return row


@router.get(
    "/functions/{name}",
    response_model=FunctionOut,
    summary="Retrieves details for a specific function.",
)
async def get_function(name: str, state: StateDep, principal: PrincipalDep) -> FunctionOut:
    row = await asyncio.to_thread(_load, state, principal.tenant_id, name)
    return FunctionOut.model_validate(row)


@router.put(
    "/functions/{name}",
    response_model=FunctionOut,
    summary="Updates an existing function; the name in the path overrides the body's.",
)
async def update_function(
    name: str, body: FunctionIn, state: StateDep, principal: PrincipalDep
) -> FunctionOut:
    await asyncio.to_thread(_load, state, principal.tenant_id, name)
    await _check(state.settings, principal.tenant_id, body)

    def save() -> FunctionOut:
        with state.db.session() as session:
            row = session.get(FunctionRow, (principal.tenant_id, name))
            if row is None:
                raise not_found("function", name)
            row.description = body.description
            row.script_type = body.script_type
            row.script = body.script
            row.updated_at = utcnow()
            session.add(row)
            session.commit()
            session.refresh(row)
            return FunctionOut.model_validate(row)

    return await asyncio.to_thread(save)


@router.delete("/functions/{name}", summary="Deletes a function from the system.")
async def delete_function(name: str, state: StateDep, principal: PrincipalDep) -> str:
    def remove() -> None:
        with state.db.session() as session:
            row = session.get(FunctionRow, (principal.tenant_id, name))
            if row is None:
                raise not_found("function", name)
            users = session.exec(
                select(EventTriggerRow.name).where(
                    EventTriggerRow.tenant_id == principal.tenant_id,
                    EventTriggerRow.function_name == name,
                )
            ).all()
            if users:
                # A trigger left pointing at nothing would fail on every matching event.
                raise APIError(
                    409,
                    "function_in_use",
                    f"function {name!r} is run by trigger(s) {', '.join(sorted(users))}; "
                    "delete or change them first",
                )
            session.delete(row)
            session.commit()

    await asyncio.to_thread(remove)
    return "function removed"
