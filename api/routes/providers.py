"""/providers: API keys of hosted LLM providers (seed 003 runtimestate_ProviderConfig).

Keys are encrypted at rest and never returned in clear: every answer shows them masked.
The seed has no route that sets a key; POST /providers/{providerType}/configure follows the
upstream contenox runtime.

A key is bound to a base URL (`baseUrl`, by default the provider's public API): backends at
that URL receive it, others only when an admin approved them (docs/backends.md). The binding
changes only together with the key, so whoever moves it knows the key already.
"""

import threading
from typing import Annotated, Self
from urllib.parse import urlparse

from fastapi import Depends, Path, Query, Request, Response
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from api.deps import PrincipalDep, StateDep, page_limit, parse_cursor
from api.errors import APIError, not_found
from api.schemas import Camel, Timestamp
from api.strict_json import json_router
from core.backends.keys import (
    DEFAULT_BASE_URLS,
    PROVIDER_TYPES,
    ProviderConfigExists,
    delete_provider_key,
    get_provider_config,
    list_provider_configs,
    masked_key,
    normalize_provider_type,
    set_provider_key,
)
from core.metering.request_log import note_change
from core.models import ProviderConfigRow
from core.secrets import SecretBox

router = json_router(tags=["providers"])

# SecretBox.from_settings may generate the key file: two first requests at once must not each
# write a different key (data encrypted with the loser's key would be unreadable).
_box_lock = threading.Lock()


def get_secret_box(request: Request, state: StateDep) -> SecretBox:
    box: SecretBox | None = getattr(request.app.state, "secret_box", None)
    if box is None:
        with _box_lock:
            box = getattr(request.app.state, "secret_box", None)
            if box is None:
                box = SecretBox.from_settings(state.settings)
                request.app.state.secret_box = box
    return box


BoxDep = Annotated[SecretBox, Depends(get_secret_box)]

ProviderTypePath = Annotated[
    str,
    Path(
        description="The provider type: " + ", ".join(PROVIDER_TYPES) + ".",
        json_schema_extra={"enum": list(PROVIDER_TYPES)},
    ),
]


def _provider_type(value: str) -> str:
    kind = normalize_provider_type(value)
    if kind is None:
        raise APIError(
            422,
            "invalid_provider_type",
            f"provider type {value!r} is not supported; use one of {', '.join(PROVIDER_TYPES)}",
            param="providerType",
        )
    return kind


class ProviderConfigureIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # "APIKey" is the seed's spelling of the field in answers; accept it on the way in too.
    api_key: str = Field(
        ...,
        min_length=1,
        max_length=2000,
        validation_alias=AliasChoices("apiKey", "APIKey"),
    )
    upsert: bool = False
    base_url: str | None = Field(
        None,
        max_length=2000,
        validation_alias=AliasChoices("baseUrl", "BaseURL"),
        description="The URL the key is bound to: backends with this baseUrl receive it. "
        "Defaults to the provider's public API ("
        + ", ".join(f"{kind}: {url}" for kind, url in DEFAULT_BASE_URLS.items())
        + "); vllm and ollama keys have none, so only backends an admin approved get them. "
        '"" binds the key to no URL.',
    )

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return value
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError("baseUrl must be an http(s) URL, e.g. https://api.openai.com/v1")
        return value.rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("apiKey must not be blank")
        return value


class ProviderConfigOut(Camel):
    """seed 003 providerapi config: the key is masked, never returned in clear."""

    api_key: str = Field(alias="APIKey", description="The key, masked.")
    type: str = Field(alias="Type")
    base_url: str = Field(description='The URL the key is bound to ("" for none).')
    created_at: Timestamp
    updated_at: Timestamp

    @classmethod
    def of(cls, box: SecretBox, row: ProviderConfigRow) -> Self:
        return cls.from_row(row, api_key=masked_key(box, row))


@router.get(
    "/providers/configs",
    response_model=list[ProviderConfigOut],
    summary="Lists all configured external providers with pagination support.",
)
def list_configs(
    state: StateDep,
    principal: PrincipalDep,
    box: BoxDep,
    limit: str | None = None,
    cursor: str | None = Query(None, description="RFC3339Nano createdAt of the last item."),
) -> list[ProviderConfigOut]:
    after = parse_cursor(cursor)
    rows = list_provider_configs(
        state.db, principal.tenant_id, after=after, limit=page_limit(limit)
    )
    return [ProviderConfigOut.of(box, row) for row in rows]


@router.post(
    "/providers/{providerType}/configure",
    status_code=201,
    response_model=ProviderConfigOut,
    summary="Stores the API key of an external provider.",
    description=(
        "201 when created, 200 when an existing key was replaced (`upsert: true`); "
        "409 when a key exists and `upsert` is false."
    ),
)
def configure_provider(
    providerType: ProviderTypePath,
    body: ProviderConfigureIn,
    response: Response,
    state: StateDep,
    principal: PrincipalDep,
    box: BoxDep,
) -> ProviderConfigOut:
    kind = _provider_type(providerType)
    try:
        row, created = set_provider_key(
            state.db,
            box,
            principal.tenant_id,
            kind,
            body.api_key,
            upsert=body.upsert,
            base_url=body.base_url,
        )
    except ProviderConfigExists as err:
        raise APIError(
            409,
            "already_exists",
            f"provider {kind!r} is already configured; send upsert: true to replace its key",
            param="upsert",
        ) from err
    if not created:
        response.status_code = 200
    note_change(
        f"{kind} key {'set' if created else 'replaced'}, bound to {row.base_url or 'no URL'}"
    )
    return ProviderConfigOut.of(box, row)


@router.get(
    "/providers/{providerType}/config",
    response_model=ProviderConfigOut,
    summary="Retrieves configuration details for a specific external provider.",
)
def get_config(
    providerType: ProviderTypePath, state: StateDep, principal: PrincipalDep, box: BoxDep
) -> ProviderConfigOut:
    kind = _provider_type(providerType)
    row = get_provider_config(state.db, principal.tenant_id, kind)
    if row is None:
        raise not_found("provider config", kind)
    return ProviderConfigOut.of(box, row)


@router.delete(
    "/providers/{providerType}/config",
    response_model=str,
    summary="Removes provider configuration from the system.",
)
def delete_config(providerType: ProviderTypePath, state: StateDep, principal: PrincipalDep) -> str:
    kind = _provider_type(providerType)
    if not delete_provider_key(state.db, principal.tenant_id, kind):
        raise not_found("provider config", kind)
    return "provider config removed"
