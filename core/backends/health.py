"""Backend health and last-seen model lists (the backend_state table).

Routing marks a backend down when it fails transiently and healthy when it answers; the state
sync schedule refreshes every backend. `/state` reads the same rows.
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import col, select

from core.db import Database
from core.models import (
    AffinityGroupRow,
    BackendStateRow,
    GroupBackendRow,
    GroupModelRow,
    ModelRow,
    as_utc,
    utcnow,
)


@dataclass
class Health:
    healthy: bool = True
    failures: int = 0
    last_error: str = ""
    down_until: datetime | None = None
    models: list[str] = field(default_factory=list)

    def is_down(self, now: datetime) -> bool:
        return self.down_until is not None and as_utc(self.down_until) > now


def load_health(db: Database, tenant_id: str) -> dict[str, Health]:
    with db.session() as session:
        rows = session.exec(
            select(BackendStateRow).where(BackendStateRow.tenant_id == tenant_id)
        ).all()
    return {
        row.backend_id: Health(
            healthy=row.healthy,
            failures=row.failures,
            last_error=row.last_error,
            down_until=row.down_until,
            models=list(row.models or []),
        )
        for row in rows
    }


def _row(session: Any, tenant_id: str, backend_id: str) -> BackendStateRow:
    row = session.get(BackendStateRow, backend_id)
    if row is None:
        row = BackendStateRow(backend_id=backend_id, tenant_id=tenant_id)
    return row


def mark_down(db: Database, tenant_id: str, backend_id: str, error: str, seconds: float) -> Health:
    with db.session() as session:
        row = _row(session, tenant_id, backend_id)
        row.healthy = False
        row.failures = (row.failures or 0) + 1
        row.last_error = error[:2000]
        row.down_until = utcnow() + timedelta(seconds=seconds)
        row.checked_at = utcnow()
        session.add(row)
        session.commit()
        return Health(False, row.failures, row.last_error, row.down_until, list(row.models or []))


def note_error(db: Database, tenant_id: str, backend_id: str, error: str) -> None:
    """Keeps a permanent failure's detail for admins (GET /state) without marking it down:
    the backend answered, the request was wrong (unknown model, prompt too long, ...)."""
    with db.session() as session:
        row = _row(session, tenant_id, backend_id)
        row.last_error = error[:2000]
        row.checked_at = utcnow()
        session.add(row)
        session.commit()


def mark_up(
    db: Database,
    tenant_id: str,
    backend_id: str,
    models: list[str] | None = None,
    pulled: list[dict[str, Any]] | None = None,
) -> None:
    with db.session() as session:
        row = _row(session, tenant_id, backend_id)
        row.healthy = True
        row.failures = 0
        row.last_error = ""
        row.down_until = None
        row.checked_at = utcnow()
        if models is not None:
            row.models = models
        if pulled is not None:
            row.pulled_models = pulled
        session.add(row)
        session.commit()


def group_pairs(db: Database, tenant_id: str) -> set[tuple[str, str]]:
    """(backend id, model name) pairs that share at least one affinity group."""
    with db.session() as session:
        backends = session.exec(
            select(GroupBackendRow.group_id, GroupBackendRow.backend_id)
            .join(AffinityGroupRow, col(AffinityGroupRow.id) == col(GroupBackendRow.group_id))
            .where(GroupBackendRow.tenant_id == tenant_id)
        ).all()
        models = session.exec(
            select(GroupModelRow.group_id, ModelRow.model)
            .join(ModelRow, col(ModelRow.id) == col(GroupModelRow.model_id))
            .where(GroupModelRow.tenant_id == tenant_id)
        ).all()
    by_group: dict[str, list[str]] = {}
    for group_id, model in models:
        by_group.setdefault(group_id, []).append(model)
    return {
        (backend_id, model)
        for group_id, backend_id in backends
        for model in by_group.get(group_id, [])
    }
