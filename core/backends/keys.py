"""Hosted providers' API keys (OpenAI, Gemini, ...): stored encrypted, decrypted only at use.

The API writes keys here; the LLM activity reads them at call time, so a key never travels as a
workflow argument and never lands in Temporal history.

Each key is bound to a base URL (the provider's public API by default): a backend of the key's
type receives the key when its baseUrl is that URL, or when an admin approved the backend
(core/backends/refs.py decides; docs/backends.md).
"""

import logging
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import urlsplit

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from core.db import Database
from core.models import ProviderConfigRow, utcnow
from core.secrets import SecretBox, mask

log = logging.getLogger("chainloom.provider_keys")

PROVIDER_TYPES: tuple[str, ...] = ("openai", "gemini", "vllm", "ollama")
# Where a key goes when its configuration names no URL. vllm and ollama servers have no
# public home: their keys reach approved backends only.
DEFAULT_BASE_URLS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "gemini": "https://generativelanguage.googleapis.com/v1beta/openai",
}
# The backend types whose client sends the key (the ollama client never sends one).
KEYED_TYPES = frozenset({"openai", "gemini", "vllm"})


@dataclass(frozen=True)
class ProviderKey:
    api_key: str = field(repr=False)
    base_url: str  # the bound URL; "" for none


def endpoint(url: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, path) of a base URL, for comparing two of them; None for a URL
    that cannot be compared safely (user info, query, fragment, not http(s))."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        return None
    default = 443 if scheme == "https" else 80
    host = parts.hostname.rstrip(".").lower()
    return scheme, host, port or default, parts.path.rstrip("/")


def same_endpoint(a: str, b: str) -> bool:
    """Whether two base URLs name the same place (case, default port, trailing "/" aside)."""
    left = endpoint(a)
    return left is not None and left == endpoint(b)


class ProviderConfigExists(Exception):
    """A key is already stored for this provider and the caller asked not to replace it."""


def normalize_provider_type(value: str) -> str | None:
    """The canonical spelling of a provider type, or None when it is not one we know."""
    kind = value.strip().lower()
    return kind if kind in PROVIDER_TYPES else None


def get_provider_config(
    db: Database, tenant_id: str, provider_type: str
) -> ProviderConfigRow | None:
    with db.session() as session:
        return session.get(ProviderConfigRow, (tenant_id, provider_type))


def list_provider_configs(
    db: Database, tenant_id: str, *, after: datetime | None = None, limit: int = 100
) -> list[ProviderConfigRow]:
    query = select(ProviderConfigRow).where(ProviderConfigRow.tenant_id == tenant_id)
    if after is not None:
        query = query.where(col(ProviderConfigRow.created_at) > after)
    query = query.order_by(col(ProviderConfigRow.created_at)).limit(limit)
    with db.session() as session:
        return list(session.exec(query).all())


def set_provider_key(
    db: Database,
    box: SecretBox,
    tenant_id: str,
    provider_type: str,
    api_key: str,
    *,
    upsert: bool = True,
    base_url: str | None = None,
) -> tuple[ProviderConfigRow, bool]:
    """Store (encrypted) a provider's key, bound to `base_url` (None: the provider's public
    API, DEFAULT_BASE_URLS); returns the row and whether it was created.

    Raises ProviderConfigExists when a key is stored and `upsert` is false.
    """
    token = box.encrypt(api_key)
    bound = DEFAULT_BASE_URLS.get(provider_type, "") if base_url is None else base_url
    with db.session() as session:
        row = session.get(ProviderConfigRow, (tenant_id, provider_type))
        if row is None:
            row = ProviderConfigRow(
                tenant_id=tenant_id, type=provider_type, api_key_encrypted=token, base_url=bound
            )
            session.add(row)
            try:
                session.commit()
                return row, True
            except IntegrityError:
                # Another request created it between our read and our insert.
                session.rollback()
                row = session.get(ProviderConfigRow, (tenant_id, provider_type))
                if row is None:
                    raise
        if not upsert:
            raise ProviderConfigExists(provider_type)
        row.api_key_encrypted = token
        row.base_url = bound
        row.updated_at = utcnow()
        session.add(row)
        session.commit()
        return row, False


def delete_provider_key(db: Database, tenant_id: str, provider_type: str) -> bool:
    """Remove a provider's key; False when none was stored."""
    with db.session() as session:
        row = session.get(ProviderConfigRow, (tenant_id, provider_type))
        if row is None:
            return False
        session.delete(row)
        session.commit()
        return True


def decrypt_row(box: SecretBox, row: ProviderConfigRow) -> str | None:
    """The clear key, or None (logged) when the stored token was made with another secret key."""
    try:
        return box.decrypt(row.api_key_encrypted)
    except ValueError as err:
        # One unreadable key must not break routing for every other backend of the tenant.
        log.warning(
            "provider %s key of tenant %s cannot be decrypted: %s", row.type, row.tenant_id, err
        )
        return None


def masked_key(box: SecretBox, row: ProviderConfigRow) -> str:
    """What the API shows for a stored key: recognisable, never usable."""
    clear = decrypt_row(box, row)
    return mask(clear) if clear is not None else "****"


def provider_api_key(
    db: Database, box: SecretBox, tenant_id: str, provider_type: str
) -> str | None:
    """The clear API key for a provider, or None when none is stored (or it cannot be read)."""
    row = get_provider_config(db, tenant_id, provider_type)
    return decrypt_row(box, row) if row is not None else None


def provider_api_keys(db: Database, box: SecretBox, tenant_id: str) -> dict[str, str]:
    """Every readable key of a tenant by provider type, in clear."""
    return {kind: key.api_key for kind, key in provider_keys(db, box, tenant_id).items()}


def provider_keys(db: Database, box: SecretBox, tenant_id: str) -> dict[str, ProviderKey]:
    """Every readable key of a tenant by provider type, with its bound URL, in one query (for
    routing views: core.backends.refs decides which backend gets which)."""
    keys: dict[str, ProviderKey] = {}
    for row in list_provider_configs(db, tenant_id, limit=len(PROVIDER_TYPES) + 100):
        clear = decrypt_row(box, row)
        if clear is not None:
            keys[row.type] = ProviderKey(clear, row.base_url)
    return keys


def provider_bindings(db: Database, tenant_id: str) -> dict[str, str]:
    """The bound URL of every stored key by provider type (nothing is decrypted)."""
    query = select(ProviderConfigRow.type, ProviderConfigRow.base_url).where(
        ProviderConfigRow.tenant_id == tenant_id
    )
    with db.session() as session:
        return {kind: url for kind, url in session.exec(query).all()}
