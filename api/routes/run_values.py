"""GET /runs/{id}/values/{seq}: one value a chain run stored because it was too large for
Temporal history, for views that show it as a link (docs/chains.md, "Long and large chains")."""

import asyncio
from typing import Any

from api.deps import PrincipalDep, StateDep
from api.errors import not_found
from api.run_service import get_run_row
from api.strict_json import json_router
from core.runstate import records
from workflows import values

router = json_router(tags=["runs"])


@router.get("/runs/{id}/values/{seq}", summary="A stored value of a run, read back in full.")
async def get_run_value(id: str, seq: int, state: StateDep, principal: PrincipalDep) -> Any:
    row = await asyncio.to_thread(get_run_row, state, principal, id)

    def load() -> Any:
        reader = records.Reader(state.db, row.tenant_id)
        return reader.load(values.handle(row.workflow_id, seq, 0, "json"))

    try:
        value = await asyncio.to_thread(load)
    except records.StoredValueError as err:
        raise not_found("stored value", str(seq)) from err
    return {"id": row.id, "seq": seq, "value": value}
