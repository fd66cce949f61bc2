"""/state (what chainloom last saw of each backend) and /defaultmodel (seed 003).

A backend's error is shown in full to callers with manage on backends; everyone else reads
"unreachable" or "refused" (api/routes/backends.py says why).
"""

from datetime import datetime

from pydantic import Field
from sqlmodel import col, select

from api.deps import PrincipalDep, StateDep, manages
from api.routes.backends import BackendOut, PulledModel, shown_error
from api.schemas import Camel, Timestamp
from api.strict_json import json_router
from core.backends.keys import provider_bindings
from core.models import BackendRow, BackendStateRow, as_utc, utcnow

router = json_router(tags=["state"])


class BackendRuntimeState(Camel):
    """seed 003 statetype.BackendRuntimeState: a backend and what was last seen of it."""

    id: str
    name: str
    backend: BackendOut
    models: list[str]
    pulled_models: list[PulledModel]
    error: str
    healthy: bool = Field(description="Not checked yet counts as healthy.")
    failures: int = Field(description="Failed calls in a row.")
    down_until: Timestamp | None = Field(description="Routing skips it until then.")
    checked_at: Timestamp | None


class DefaultModel(Camel):
    model_name: str


@router.get("/state", summary="Retrieves the current runtime state of all LLM backends.")
def get_state(state: StateDep, principal: PrincipalDep) -> list[BackendRuntimeState]:
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
        down_until: datetime | None = health.down_until if health else None
        if down_until is not None and as_utc(down_until) <= now:
            down_until = None
        result.append(
            BackendRuntimeState(
                id=backend.id,
                name=backend.name,
                backend=BackendOut.of(backend, bindings),
                models=list(health.models) if health else [],
                pulled_models=[PulledModel.model_validate(m) for m in health.pulled_models]
                if health
                else [],
                error=shown_error(health.last_error, full) if health else "",
                healthy=(health.healthy and not down_until) if health else True,
                failures=health.failures if health else 0,
                down_until=down_until,
                checked_at=health.checked_at if health else None,
            )
        )
    return result


@router.get("/defaultmodel", summary="Returns the default model configured at start-up.")
def default_model(state: StateDep, _: PrincipalDep) -> DefaultModel:
    return DefaultModel(model_name=state.settings.default_model)
