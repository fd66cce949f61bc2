"""Hosted providers' API keys (OpenAI, Gemini, ...): stored encrypted, decrypted only at use.

The API writes keys here; the LLM activity reads them at call time, so a key never travels as a
workflow argument and never lands in Temporal history.
"""

import logging
from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from core.db import Database
from core.models import ProviderConfigRow, utcnow
from core.secrets import SecretBox, mask

log = logging.getLogger("chainloom.provider_keys")

PROVIDER_TYPES: tuple[str, ...] = ("openai", "gemini", "vllm", "ollama")


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
) -> tuple[ProviderConfigRow, bool]:
    """Store (encrypted) a provider's key; returns the row and whether it was created.

    Raises ProviderConfigExists when a key is stored and `upsert` is false.
    """
    token = box.encrypt(api_key)
    with db.session() as session:
        row = session.get(ProviderConfigRow, (tenant_id, provider_type))
        if row is None:
            row = ProviderConfigRow(
                tenant_id=tenant_id, type=provider_type, api_key_encrypted=token
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
    """Every readable key of a tenant by provider type, in one query (for routing views)."""
    keys: dict[str, str] = {}
    for row in list_provider_configs(db, tenant_id, limit=len(PROVIDER_TYPES) + 100):
        clear = decrypt_row(box, row)
        if clear is not None:
            keys[row.type] = clear
    return keys
