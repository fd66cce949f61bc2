"""/hooks/remote, /hooks/schemas and /supported: remote hooks and the hook types (seed 003).

Header values are secrets (service tokens): stored encrypted and shown masked in every answer.
A PUT may send the masked value back unchanged to keep a header's secret, or leave `headers`
out to keep them all, as long as the hook stays where it points. A PUT that changes
`endpointUrl` drops every stored header value it does not send again in clear; keeping one
(its masked value) at the new URL needs manage on hooks, as that sends a secret somewhere new.
"""

import asyncio
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from fastapi import Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from api.deps import PrincipalDep, StateDep, manages, page_limit, parse_cursor
from api.errors import APIError, not_found
from api.routes.providers import BoxDep
from api.schemas import Camel, Timestamp, absent_when_none
from api.strict_json import json_router
from core.hooks.openapi import SchemaCache, SchemaError
from core.hooks.store import (
    LOCAL_HOOKS,
    HookExists,
    decrypt_headers,
    delete_hook,
    encrypt_headers,
    get_hook,
    get_hook_by_name,
    hook_names,
    list_hooks,
    local_openapi,
    masked_headers,
    save_hook,
    to_remote_hook,
    valid_hook_name,
)
from core.metering.request_log import note_change
from core.models import RemoteHookRow, utcnow
from core.secrets import SecretBox, mask

router = json_router(tags=["hooks"])

# Headers the HTTP layer or chainloom itself sets; a hook must not override them.
_FORBIDDEN_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "idempotency-key"}
)
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class InjectionArg(BaseModel):
    """A value the hook adds to every call, hidden from the model (seed InjectionArg)."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    in_: Literal["query", "path", "header", "body"] = Field(..., alias="in")
    name: str = Field(..., min_length=1, max_length=200)
    value: Any = None


class RemoteHookIn(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    name: str = Field(..., min_length=1, max_length=200)
    endpoint_url: str = Field(..., alias="endpointUrl", min_length=1, max_length=2000)
    timeout_ms: int = Field(10_000, alias="timeoutMs", ge=1, le=600_000)
    headers: dict[str, str] | None = Field(
        None, description="Header name to value; values are secrets and never returned."
    )
    properties: list[InjectionArg] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not valid_hook_name(value):
            raise ValueError(
                "name may hold letters, digits, '_' and '-' only (it prefixes tool names)"
            )
        if value in LOCAL_HOOKS:
            raise ValueError(f"{value!r} is a local hook; choose another name")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError("endpointUrl must be an http(s) URL, e.g. https://tools.example")
        return value.rstrip("/")

    @field_validator("headers", mode="before")
    @classmethod
    def _seed_header_string(cls, value: Any) -> Any:
        # The seed's examples write headers as "Name:value,Name:value".
        if isinstance(value, str):
            pairs = [part.split(":", 1) for part in value.split(",") if part.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("headers must be an object or 'Name:value,Name:value'")
            return {name.strip(): val.strip() for name, val in pairs}
        return value

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for name in value or {}:
            if not name or not set(name) <= _TOKEN_CHARS:
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in _FORBIDDEN_HEADERS:
                raise ValueError(f"header {name!r} is set by chainloom and cannot be configured")
        return value

    @field_validator("properties", mode="before")
    @classmethod
    def _single_property(cls, value: Any) -> Any:
        # The seed's examples show `properties` as a single object.
        if value is None:
            return []
        return [value] if isinstance(value, dict) else value


class InjectionArgOut(Camel):
    in_: str = Field(alias="in")
    name: str
    value: Any = None


class RemoteHookOut(Camel):
    """seed 003 hookrepo.RemoteHook, header values masked."""

    id: str
    name: str
    endpoint_url: str
    timeout_ms: int
    headers: dict[str, str] = Field(description="Header names; values masked.")
    properties: list[InjectionArgOut]
    created_at: Timestamp
    updated_at: Timestamp

    @classmethod
    def of(cls, box: SecretBox, row: RemoteHookRow) -> Self:
        return cls.from_row(row, headers=masked_headers(box, row), properties=row.properties or [])


class HookDocument(BaseModel):
    """A hook's OpenAPI document as it came (any keys), or `error` alone when it could not
    be fetched or read."""

    model_config = ConfigDict(extra="allow")

    paths: dict[str, Any] | None = absent_when_none("The operations: each one is a tool.")
    error: str | None = absent_when_none("Why there is no document.")


def _properties(body: RemoteHookIn) -> list[dict[str, Any]]:
    return [{"in": p.in_, "name": p.name, "value": p.value} for p in body.properties]


def _exists(name: str) -> APIError:
    return APIError(409, "already_exists", f"a remote hook named {name!r} exists", param="name")


def _load(state: StateDep, tenant_id: str, hook_id: str) -> RemoteHookRow:
    row = get_hook(state.db, tenant_id, hook_id)
    if row is None:
        raise not_found("remote hook", hook_id)
    return row


HookId = Annotated[str, Path(description="The unique identifier for the remote hook.")]


@router.get(
    "/hooks/remote",
    response_model=list[RemoteHookOut],
    response_model_by_alias=True,
    summary="Lists remote hooks, optionally filtering by a unique name.",
)
def list_remote_hooks(
    state: StateDep,
    principal: PrincipalDep,
    box: BoxDep,
    limit: str | None = None,
    cursor: str | None = Query(None, description="RFC3339Nano createdAt of the last item."),
    name: str | None = Query(None, description="Only the hook with this name."),
) -> list[RemoteHookOut]:
    after = parse_cursor(cursor)
    rows = list_hooks(
        state.db, principal.tenant_id, after=after, limit=page_limit(limit), name=name
    )
    return [RemoteHookOut.of(box, row) for row in rows]


@router.post(
    "/hooks/remote",
    status_code=201,
    response_model=RemoteHookOut,
    response_model_by_alias=True,
    summary="Creates a new remote hook configuration.",
    description="Remote hooks allow task-chains to trigger external HTTP services during "
    "execution: each operation of the service's OpenAPI document becomes a tool.",
)
def create_remote_hook(
    body: RemoteHookIn, state: StateDep, principal: PrincipalDep, box: BoxDep
) -> RemoteHookOut:
    row = RemoteHookRow(
        tenant_id=principal.tenant_id,
        name=body.name,
        endpoint_url=body.endpoint_url,
        timeout_ms=body.timeout_ms,
        headers_encrypted=encrypt_headers(box, body.headers or {}),
        properties=_properties(body),
    )
    try:
        save_hook(state.db, row)
    except HookExists as err:
        raise _exists(body.name) from err
    return RemoteHookOut.of(box, row)


@router.get(
    "/hooks/remote/by-name/{name}",
    response_model=RemoteHookOut,
    response_model_by_alias=True,
    summary="Retrieves a remote hook configuration by name.",
)
def get_remote_hook_by_name(
    name: Annotated[str, Path(description="The unique name for the remote hook.")],
    state: StateDep,
    principal: PrincipalDep,
    box: BoxDep,
) -> RemoteHookOut:
    row = get_hook_by_name(state.db, principal.tenant_id, name)
    if row is None:
        raise not_found("remote hook", name)
    return RemoteHookOut.of(box, row)


@router.get(
    "/hooks/remote/{id}",
    response_model=RemoteHookOut,
    response_model_by_alias=True,
    summary="Retrieves a specific remote hook configuration by ID.",
)
def get_remote_hook(
    id: HookId, state: StateDep, principal: PrincipalDep, box: BoxDep
) -> RemoteHookOut:
    return RemoteHookOut.of(box, _load(state, principal.tenant_id, id))


@router.put(
    "/hooks/remote/{id}",
    response_model=RemoteHookOut,
    response_model_by_alias=True,
    summary="Updates an existing remote hook configuration.",
    description="The ID from the URL path overrides any ID in the request body. Leave "
    "`headers` out to keep the stored ones; a header sent with its masked value keeps its "
    "stored value. A change of `endpointUrl` drops the stored header values not sent again "
    "in clear; keeping one (masked) at a new URL needs manage on hooks (403 otherwise).",
)
def update_remote_hook(
    id: HookId, body: RemoteHookIn, state: StateDep, principal: PrincipalDep, box: BoxDep
) -> RemoteHookOut:
    row = _load(state, principal.tenant_id, id)
    moved = body.endpoint_url != row.endpoint_url
    if body.headers is not None or moved:
        try:
            stored = decrypt_headers(box, row.headers_encrypted)
        except ValueError:
            stored = {}
        sent = body.headers or {}
        kept = [n for n, v in sent.items() if n in stored and v == mask(stored[n])]
        if moved and kept and not manages(state, principal, "hooks", id):
            raise APIError(
                403,
                "forbidden",
                f"only an admin (manage on hooks) may move hook {row.name!r} to a new "
                f"endpointUrl with its stored secret headers ({', '.join(sorted(kept))}): send "
                "their values again, or leave them out to drop them",
                param="headers",
            )
        headers = {name: stored[name] if name in kept else value for name, value in sent.items()}
        row.headers_encrypted = encrypt_headers(box, headers)
        if moved:
            note_change(f"endpointUrl {row.endpoint_url} -> {body.endpoint_url}")
            dropped = sorted(set(stored) - set(sent))
            if dropped:
                note_change(f"stored secret headers dropped: {', '.join(dropped)}")
            if kept:
                note_change(f"stored secret headers kept at the new URL: {', '.join(sorted(kept))}")
    row.name = body.name
    row.endpoint_url = body.endpoint_url
    row.timeout_ms = body.timeout_ms
    row.properties = _properties(body)
    row.updated_at = utcnow()
    try:
        save_hook(state.db, row)
    except HookExists as err:
        raise _exists(body.name) from err
    return RemoteHookOut.of(box, row)


@router.delete(
    "/hooks/remote/{id}",
    response_model=str,
    summary="Deletes a remote hook configuration by ID.",
)
def delete_remote_hook(id: HookId, state: StateDep, principal: PrincipalDep) -> str:
    if not delete_hook(state.db, principal.tenant_id, id):
        raise not_found("remote hook", id)
    return "deleted"


def _schema_cache(request: Request, state: StateDep) -> SchemaCache:
    cache: SchemaCache | None = getattr(request.app.state, "hook_schemas", None)
    if cache is None:
        cache = SchemaCache(state.settings.hook_schema_ttl)
        request.app.state.hook_schemas = cache
    return cache


@router.get(
    "/hooks/schemas",
    summary="Retrieves the JSON openAPI schemas for all supported hook types.",
    description="The OpenAPI document of every hook by name: each remote hook's (fetched "
    "through the outbound policy and cached for CHAINLOOM_HOOK_SCHEMA_TTL) and a generated one "
    'per local hook. A remote document that cannot be fetched shows as {"error": ...}.',
)
async def hook_schemas(
    request: Request, state: StateDep, principal: PrincipalDep, box: BoxDep
) -> dict[str, HookDocument]:
    rows = await asyncio.to_thread(list_hooks, state.db, principal.tenant_id, limit=10_000)
    cache = _schema_cache(request, state)
    allowlist = state.settings.outbound_allowlist

    async def one(row: RemoteHookRow) -> HookDocument:
        try:
            hook = to_remote_hook(box, row)
        except ValueError as err:
            return HookDocument(error=f"hook {row.name}: {err}")
        try:
            doc, _ = await cache.get(hook, allowlist)
        except SchemaError as err:
            return HookDocument(error=err.message)
        try:
            return HookDocument.model_validate(doc)
        except ValidationError as err:  # e.g. a document whose own `error` is not text
            return HookDocument(error=f"hook {row.name}: not an OpenAPI document: {err}")

    docs = await asyncio.gather(*(one(row) for row in rows))
    schemas = {name: HookDocument.model_validate(local_openapi(name)) for name in LOCAL_HOOKS}
    schemas.update({row.name: doc for row, doc in zip(rows, docs, strict=True)})
    return schemas


@router.get(
    "/supported",
    response_model=list[str],
    summary="Lists available task-chain hook types.",
    description="The local hooks (echo, print, webhook, js) and the tenant's remote hooks.",
)
def supported(state: StateDep, principal: PrincipalDep) -> list[str]:
    return [*LOCAL_HOOKS, *hook_names(state.db, principal.tenant_id)]
