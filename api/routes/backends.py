"""/backends: connections to LLM services (seed 003)."""

import asyncio
import logging
from typing import Any, Literal
from urllib.parse import urlparse

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import IntegrityError
from temporalio.service import RPCError

from api.deps import PrincipalDep, StateDep, owned, tenant_page
from api.errors import APIError
from api.routes.groups import remove_memberships
from api.routes.providers import BoxDep
from core.backends.downloads import cancel_downloads
from core.backends.keys import provider_api_keys
from core.backends.providers import ProviderClients, ProviderError
from core.backends.refs import to_ref
from core.models import BackendRow, BackendStateRow, rfc3339, utcnow

router = APIRouter(tags=["backends"])
log = logging.getLogger(__name__)


class BackendIn(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    name: str = Field(..., min_length=1, max_length=200)
    base_url: str = Field(..., alias="baseUrl", max_length=2000)
    type: Literal["ollama", "openai", "vllm", "gemini"]

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("baseUrl must be an http(s) URL, e.g. http://localhost:11434")
        return value.rstrip("/")


class BackendOut(BaseModel):
    id: str
    name: str
    baseUrl: str
    type: str
    createdAt: str
    updatedAt: str


class BackendStatus(BackendOut):
    models: list[str] = []
    pulledModels: list[dict[str, Any]] = []
    error: str = ""


def backend_json(row: BackendRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "baseUrl": row.base_url,
        "type": row.type,
        "createdAt": rfc3339(row.created_at),
        "updatedAt": rfc3339(row.updated_at),
    }


def _probe_clients(request: Request) -> ProviderClients:
    clients: ProviderClients | None = getattr(request.app.state, "probe_clients", None)
    if clients is None:
        # Status probes must answer fast; a slow backend shows as an error, not a hang.
        clients = ProviderClients(timeout=3.0)
        request.app.state.probe_clients = clients
    return clients


async def _with_status(
    clients: ProviderClients, row: BackendRow, keys: dict[str, str]
) -> dict[str, Any]:
    data = backend_json(row)
    try:
        data["models"] = await clients.list_models(to_ref(row, keys))
        data["error"] = ""
    except ProviderError as err:
        data["models"], data["error"] = [], str(err)
    data["pulledModels"] = [{"model": name} for name in data["models"]]
    return data


@router.get(
    "/backends",
    response_model=list[BackendStatus],
    summary="Lists all configured backend connections with runtime status.",
)
async def list_backends(
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    box: BoxDep,
    limit: str | None = None,
    cursor: str | None = Query(None, description="RFC3339Nano createdAt of the last item."),
) -> list[dict[str, Any]]:
    query = tenant_page(BackendRow, principal.tenant_id, limit, cursor)

    def load() -> list[BackendRow]:
        with state.db.session() as session:
            return list(session.exec(query).all())

    rows = await asyncio.to_thread(load)
    keys = await asyncio.to_thread(provider_api_keys, state.db, box, principal.tenant_id)
    clients = _probe_clients(request)
    return list(await asyncio.gather(*(_with_status(clients, row, keys) for row in rows)))


@router.post(
    "/backends",
    status_code=201,
    response_model=BackendOut,
    summary="Creates a new backend connection to an LLM provider.",
)
def create_backend(body: BackendIn, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    row = BackendRow(
        tenant_id=principal.tenant_id, name=body.name, base_url=body.base_url, type=body.type
    )
    with state.db.session() as session:
        session.add(row)
        try:
            session.commit()
        except IntegrityError as err:
            raise APIError(409, "already_exists", f"a backend named {body.name!r} exists") from err
    return backend_json(row)


def _load(state: StateDep, tenant_id: str, backend_id: str) -> BackendRow:
    with state.db.session() as session:
        return owned(session, BackendRow, backend_id, tenant_id, "backend")


@router.get(
    "/backends/{id}",
    response_model=BackendStatus,
    summary="Retrieves complete information for a specific backend.",
)
async def get_backend(
    id: str, request: Request, state: StateDep, principal: PrincipalDep, box: BoxDep
) -> dict[str, Any]:
    row = await asyncio.to_thread(_load, state, principal.tenant_id, id)
    keys = await asyncio.to_thread(provider_api_keys, state.db, box, principal.tenant_id)
    return await _with_status(_probe_clients(request), row, keys)


@router.put(
    "/backends/{id}",
    response_model=BackendOut,
    summary="Updates an existing backend configuration.",
)
def update_backend(
    id: str, body: BackendIn, request: Request, state: StateDep, principal: PrincipalDep
) -> dict[str, Any]:
    row = _load(state, principal.tenant_id, id)
    row.name, row.base_url, row.type = body.name, body.base_url, body.type
    row.updated_at = utcnow()
    with state.db.session() as session:
        session.add(row)
        try:
            session.commit()
        except IntegrityError as err:
            raise APIError(409, "already_exists", f"a backend named {body.name!r} exists") from err
    _probe_clients(request).forget(id)
    return backend_json(row)


@router.delete("/backends/{id}", summary="Removes a backend connection.")
async def delete_backend(id: str, state: StateDep, principal: PrincipalDep) -> str:
    row = await asyncio.to_thread(_load, state, principal.tenant_id, id)
    if row.type == "ollama":
        # Its queued pulls would only fail with "backend no longer exists"; stop them now.
        try:
            client = await state.temporal.get()
            await cancel_downloads(client, principal.tenant_id, [id])
        except (APIError, RPCError) as err:
            log.warning("downloads of backend %s not cancelled: %s", id, err)

    def delete() -> None:
        with state.db.session() as session:
            remove_memberships(session, backend_id=id)
            health = session.get(BackendStateRow, id)
            if health is not None:
                session.delete(health)
            session.delete(session.merge(row))
            session.commit()

    await asyncio.to_thread(delete)
    return "backend removed"
