"""Backend lookup shared by the API (status) and the LLM activities (routing)."""

from sqlmodel import col, select

from core.db import Database
from core.models import BackendRow
from core.providers import BackendRef


def backend_refs(db: Database, tenant_id: str) -> list[BackendRef]:
    with db.session() as session:
        rows = session.exec(
            select(BackendRow)
            .where(BackendRow.tenant_id == tenant_id)
            .order_by(col(BackendRow.created_at), col(BackendRow.id))
        ).all()
    return [to_ref(row) for row in rows]


def to_ref(row: BackendRow) -> BackendRef:
    return BackendRef(id=row.id, name=row.name, type=row.type, base_url=row.base_url)
