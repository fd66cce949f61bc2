"""/backends: connections to LLM services (seed 003).

A backend's baseUrl decides where the tenant's provider key of its type goes, so pointing one
somewhere the key is not bound to (creating it, or changing its baseUrl or type) needs manage
on backends, and only then does the backend receive the key (core/backends/refs.py). Status
answers show upstream errors to those with manage, "unreachable"/"refused" to everyone else.
"""

import asyncio
import logging
from typing import Any, Literal, Self
from urllib.parse import urlparse

from fastapi import Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import IntegrityError
from temporalio.service import RPCError

from api.deps import AppState, PrincipalDep, StateDep, manages, owned, tenant_page
from api.errors import APIError
from api.routes.groups import remove_memberships
from api.routes.providers import BoxDep
from api.schemas import Camel, Timestamp
from api.strict_json import json_router
from core.backends.downloads import cancel_downloads
from core.backends.keys import KEYED_TYPES, provider_bindings, provider_keys
from core.backends.providers import ProviderClients, ProviderError, public_error
from core.backends.refs import approval_target, key_at_stake, key_grant, to_ref
from core.metering.request_log import note_change
from core.models import BackendRow, BackendStateRow, utcnow

router = json_router(tags=["backends"])
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


class BackendOut(Camel):
    id: str
    name: str
    base_url: str
    type: str
    provider_key: Literal["bound", "approved", "none"] = Field(
        description="Whether the backend receives its type's provider key: `bound` (its "
        "baseUrl is the key's bound URL), `approved` (an admin approved it at this baseUrl) "
        "or `none`."
    )
    created_at: Timestamp
    updated_at: Timestamp

    @classmethod
    def of(cls, row: BackendRow, bindings: dict[str, str] | None = None) -> Self:
        """`bindings` (provider type to bound URL, from core.backends.keys.provider_bindings)
        fill in providerKey."""
        grant = key_grant(row, (bindings or {}).get(row.type)) or "none"
        return cls.from_row(row, provider_key=grant)


class PulledModel(BaseModel):
    """seed 003 pulledModels entry: `model` always; what else the backend tells of the model
    (ollama: name, size, digest, modifiedAt, details) is passed on as it came."""

    model_config = ConfigDict(extra="allow")

    model: str


class BackendStatus(BackendOut):
    models: list[str] = Field(description="The models the backend serves now.")
    pulled_models: list[PulledModel]
    error: str = Field(description="Why the backend could not be asked; empty when it was.")


def shown_error(detail: str, full: bool) -> str:
    """A backend error as the caller may see it: all of it with manage on backends."""
    return detail if full else public_error(detail)


def _probe_clients(request: Request, state: AppState) -> ProviderClients:
    clients: ProviderClients | None = getattr(request.app.state, "probe_clients", None)
    if clients is None:
        # Status probes must answer fast; a slow backend shows as an error, not a hang.
        clients = ProviderClients(timeout=3.0, allowlist=state.settings.backend_allowlist)
        request.app.state.probe_clients = clients
    return clients


async def _status_context(
    state: AppState, principal: PrincipalDep, box: BoxDep
) -> tuple[dict[str, Any], bool]:
    def load() -> tuple[dict[str, Any], bool]:
        keys = provider_keys(state.db, box, principal.tenant_id)
        return keys, manages(state, principal, "backends")

    return await asyncio.to_thread(load)


async def _with_status(
    clients: ProviderClients, row: BackendRow, keys: dict[str, Any], full: bool
) -> BackendStatus:
    backend = BackendOut.of(row, {kind: key.base_url for kind, key in keys.items()})
    try:
        models, error = await clients.list_models(to_ref(row, keys)), ""
    except ProviderError as err:
        models, error = [], shown_error(str(err), full)
    pulled = [PulledModel(model=name) for name in models]
    return BackendStatus(**dict(backend), models=models, pulled_models=pulled, error=error)


def _admit(
    state: AppState,
    principal: PrincipalDep,
    body: "BackendIn",
    before: BackendRow | None,
) -> tuple[bool, dict[str, str]]:
    """Refuses (403) pointing a backend where a stored key would go unbound without manage on
    backends; answers whether the caller approves the backend, and the key bindings."""
    bindings = provider_bindings(state.db, principal.tenant_id)
    admin = manages(state, principal, "backends", before.id if before else None)
    moved = before is None or (before.type, before.base_url) != (body.type, body.base_url)
    if moved and not admin and key_at_stake(body.type, body.base_url, bindings):
        bound = bindings[body.type]
        where = f"bound to {bound}" if bound else "bound to no URL"
        raise APIError(
            403,
            "forbidden",
            f"only an admin (manage on backends) may point a backend of type {body.type} at "
            f"{body.base_url}: the tenant's {body.type} provider key is {where}, and only an "
            "admin may send it elsewhere",
            param="baseUrl",
        )
    return admin, bindings


def _approve(row: BackendRow, principal: PrincipalDep, admin: bool, moved: bool) -> None:
    """An admin saving a backend approves it where it points; anyone else re-pointing it
    withdraws the approval (it could only do so where no unbound key was at stake)."""
    target = approval_target(row.type, row.base_url)
    if admin:
        row.approved_by, row.approved_for = principal.identity, target
        if row.type in KEYED_TYPES:
            note_change(f"approved {target} to receive the {row.type} provider key")
    elif moved and row.approved_by:
        note_change(f"approval by {row.approved_by} withdrawn")
        row.approved_by, row.approved_for = "", ""


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
) -> list[BackendStatus]:
    query = tenant_page(BackendRow, principal.tenant_id, limit, cursor)

    def load() -> list[BackendRow]:
        with state.db.session() as session:
            return list(session.exec(query).all())

    rows = await asyncio.to_thread(load)
    keys, full = await _status_context(state, principal, box)
    clients = _probe_clients(request, state)
    return list(await asyncio.gather(*(_with_status(clients, row, keys, full) for row in rows)))


@router.post(
    "/backends",
    status_code=201,
    response_model=BackendOut,
    summary="Creates a new backend connection to an LLM provider.",
)
def create_backend(body: BackendIn, state: StateDep, principal: PrincipalDep) -> BackendOut:
    admin, bindings = _admit(state, principal, body, None)
    row = BackendRow(
        tenant_id=principal.tenant_id, name=body.name, base_url=body.base_url, type=body.type
    )
    _approve(row, principal, admin, moved=True)
    with state.db.session() as session:
        session.add(row)
        try:
            session.commit()
        except IntegrityError as err:
            raise APIError(409, "already_exists", f"a backend named {body.name!r} exists") from err
    return BackendOut.of(row, bindings)


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
) -> BackendStatus:
    row = await asyncio.to_thread(_load, state, principal.tenant_id, id)
    keys, full = await _status_context(state, principal, box)
    return await _with_status(_probe_clients(request, state), row, keys, full)


@router.put(
    "/backends/{id}",
    response_model=BackendOut,
    summary="Updates an existing backend configuration.",
)
def update_backend(
    id: str, body: BackendIn, request: Request, state: StateDep, principal: PrincipalDep
) -> BackendOut:
    row = _load(state, principal.tenant_id, id)
    admin, bindings = _admit(state, principal, body, row)
    moved = (row.type, row.base_url) != (body.type, body.base_url)
    if moved:
        note_change(f"re-pointed from {row.type} {row.base_url} to {body.type} {body.base_url}")
    row.name, row.base_url, row.type = body.name, body.base_url, body.type
    _approve(row, principal, admin, moved)
    row.updated_at = utcnow()
    with state.db.session() as session:
        session.add(row)
        try:
            session.commit()
        except IntegrityError as err:
            raise APIError(409, "already_exists", f"a backend named {body.name!r} exists") from err
    _probe_clients(request, state).forget(id)
    return BackendOut.of(row, bindings)


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
