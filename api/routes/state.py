"""/state (what chainloom last saw of each backend) and /defaultmodel (seed 003).

A backend's error is shown in full to callers with manage on backends; everyone else reads
"unreachable" or "refused" (api/routes/backends.py says why).
"""

from typing import Any

from fastapi import APIRouter
from sqlmodel import col, select

from api.deps import PrincipalDep, StateDep, manages
from api.routes.backends import backend_json, shown_error
from core.backends.keys import provider_bindings
from core.models import BackendRow, BackendStateRow, as_utc, rfc3339, utcnow

router = APIRouter(tags=["state"])


@router.get("/state", summary="Retrieves the current runtime state of all LLM backends.")
def get_state(state: StateDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    with state.db.session() as session:
        rows = session.exec(
            select(BackendRow, BackendStateRow)
            .join(
                BackendStateRow,
                col(BackendStateRow.backend_id) == col(BackendRow.id),
                isouter=True,
            )
            .where(BackendRow.tenant_id == principal.tenant_id)
            .order_by(col(BackendRow.created_at))
        ).all()
    bindings = provider_bindings(state.db, principal.tenant_id)
    full = manages(state, principal, "backends")
    now = utcnow()
    result = []
    for backend, health in rows:
        down_until = health.down_until if health else None
        down_at = rfc3339(down_until) if down_until and as_utc(down_until) > now else None
        result.append(
            {
                "id": backend.id,
                "name": backend.name,
                "backend": backend_json(backend, bindings),
                "models": list(health.models) if health else [],
                "pulledModels": list(health.pulled_models) if health else [],
                "error": shown_error(health.last_error, full) if health else "",
                # Not checked yet counts as healthy: routing tries it and learns.
                "healthy": (health.healthy and not down_at) if health else True,
                "failures": health.failures if health else 0,
                "downUntil": down_at,
                "checkedAt": rfc3339(health.checked_at) if health and health.checked_at else None,
            }
        )
    return result


@router.get("/defaultmodel", summary="Returns the default model configured at start-up.")
def default_model(state: StateDep, _: PrincipalDep) -> dict[str, str]:
    return {"modelName": state.settings.default_model}
