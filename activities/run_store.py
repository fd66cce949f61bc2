"""The activities that keep a chain run's records: `run_store` writes state units and values
too large for history, `run_load` reads values back for the workflow (core/runstate)."""

import asyncio
from collections.abc import Callable
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.db import Database
from core.runstate import records
from workflows import values
from workflows.contracts import RUN_LOAD, RUN_STORE, STORED_VALUE_ERROR
from workflows.types import LoadRequest, StoreAs, StoreRequest


async def read_back(db: Database, tenant_id: str, value: Any, error_type: str) -> Any:
    """`value` with the handles in it read back, for an activity given a chain's handles; a
    handle that names no record of this tenant fails the call for good as `error_type`."""
    if not records.mentions_refs(value):
        return value  # the usual case: no thread hop, no database
    try:
        return await asyncio.to_thread(records.expand, db, tenant_id, value)
    except records.StoredValueError as err:
        raise ApplicationError(str(err), type=error_type, non_retryable=True) from err


async def keep_result(
    db: Database, tenant_id: str, workflow_id: str, store: StoreAs | None, value: Any
) -> Any:
    """An activity's result for its chain: itself, or over `store.above` bytes, the handle
    of the record it was written to (records.keep)."""
    if store is None or values.size_of(value) <= store.above:
        return value
    return await asyncio.to_thread(records.keep, db, tenant_id, workflow_id, store, value)


class RunStoreActivities:
    def __init__(self, db: Database) -> None:
        self.db = db

    def activities(self) -> list[Callable[..., Any]]:
        return [self.store, self.load]

    @activity.defn(name=RUN_STORE)
    async def store(self, req: StoreRequest) -> None:
        await asyncio.to_thread(records.write, self.db, req.tenant_id, req.workflow_id, req.records)

    @activity.defn(name=RUN_LOAD)
    async def load(self, req: LoadRequest) -> list[Any]:
        def work() -> list[Any]:
            reader = records.Reader(self.db, req.tenant_id)
            return [reader.expand(ref) for ref in req.refs]

        try:
            found = await asyncio.to_thread(work)
        except records.StoredValueError as err:
            raise ApplicationError(str(err), type=STORED_VALUE_ERROR, non_retryable=True) from err
        size = values.size_of(found)
        if size > req.max_bytes:
            # The workflow checks sizes before it asks; this guards history if a record grew.
            raise ApplicationError(
                f"the stored values asked for are {size} bytes, over the {req.max_bytes} a "
                "workflow may read back",
                type=STORED_VALUE_ERROR,
                non_retryable=True,
            )
        return found
