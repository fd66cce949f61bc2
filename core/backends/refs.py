"""Backend lookup shared by the API (status), the state sync and the LLM activities (routing).

Hosted providers need their API key for every call, model listings included, so refs are
built with the tenant's provider keys; the keys are read here, never passed through workflows.
"""

from collections.abc import Mapping

from sqlmodel import col, select

from core.backends.keys import provider_api_keys
from core.backends.providers import BackendRef
from core.db import Database
from core.models import BackendRow
from core.secrets import SecretBox


def backend_refs(db: Database, tenant_id: str, box: SecretBox | None = None) -> list[BackendRef]:
    with db.session() as session:
        rows = session.exec(
            select(BackendRow)
            .where(BackendRow.tenant_id == tenant_id)
            .order_by(col(BackendRow.created_at), col(BackendRow.id))
        ).all()
    keys = provider_api_keys(db, box, tenant_id) if box is not None else {}
    return [to_ref(row, keys) for row in rows]


def to_ref(row: BackendRow, keys: Mapping[str, str] | None = None) -> BackendRef:
    """`keys` maps provider type to API key (core.backends.keys.provider_api_keys)."""
    return BackendRef(
        id=row.id,
        name=row.name,
        type=row.type,
        base_url=row.base_url,
        api_key=(keys or {}).get(row.type, ""),
    )
