"""POST /tasks (run and wait, seed 003) and the asynchronous /runs API."""

import asyncio
from datetime import datetime, timedelta
from typing import Any, Literal

from fastapi import APIRouter, Body, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlmodel import col, select
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import PrincipalDep, StateDep, page_limit, parse_cursor
from api.errors import APIError, error_body
from api.run_service import (
    FINAL,
    RunCreated,
    TaskExecutionRequest,
    failed_run,
    get_run_row,
    resolve_chain,
    run_view,
    start_run,
    whole_run,
)
from core.models import RunRow, as_utc, rfc3339
from workflows.types import ApprovalDecision

router = APIRouter(tags=["runs"])


@router.post(
    "/tasks",
    summary="Executes dynamic task-chain workflows.",
    description="Runs the chain and waits for its result (up to CHAINLOOM_TASKS_WAIT_TIMEOUT); "
    "a run still going after that answers 202 with the run id to poll on /runs/{id}.",
)
async def execute_task(body: TaskExecutionRequest, state: StateDep, principal: PrincipalDep) -> Any:
    chain = await resolve_chain(state, principal, body)
    run, handle = await start_run(state, principal, chain, body)
    try:
        result = await asyncio.wait_for(handle.result(), state.settings.tasks_wait_timeout)
    except TimeoutError:
        created = RunCreated(id=run.id, workflow_id=run.workflow_id, status="running")
        return JSONResponse(created.model_dump(by_alias=True), status_code=202)
    except WorkflowFailureError as err:
        status, message, unit_state = await failed_run(state, run, err)
        body_ = error_body(422, f"chain_{status}", message)
        body_.update(id=run.id, workflowId=run.workflow_id, state=unit_state)
        return JSONResponse(body_, status_code=422)
    whole = await whole_run(state, run, result)
    return {
        "id": run.id,
        "output": whole["output"],
        "outputType": result["outputType"],
        "state": whole["state"],
    }


@router.post("/runs", status_code=202, summary="Starts a chain run without waiting.")
async def create_run(
    body: TaskExecutionRequest, state: StateDep, principal: PrincipalDep
) -> dict[str, Any]:
    chain = await resolve_chain(state, principal, body)
    run, _ = await start_run(state, principal, chain, body)
    return RunCreated(id=run.id, workflow_id=run.workflow_id, status="running").model_dump(
        by_alias=True
    )


# At most this many pages of unfinished runs are read for one page of "running" or "waiting".
_MAX_BATCHES = 10


@router.get("/runs", summary="Lists runs, newest first.")
async def list_runs(
    state: StateDep,
    principal: PrincipalDep,
    chain_id: str | None = Query(None, alias="chainId"),
    status: Literal["running", "waiting", "completed", "failed", "cancelled"] | None = None,
    limit: str | None = None,
    cursor: str | None = Query(None, description="createdAt of the last run seen."),
) -> list[dict[str, Any]]:
    before = parse_cursor(cursor)
    size = page_limit(limit, default=50, maximum=200)

    def load(after: datetime | None) -> list[RunRow]:
        query = select(RunRow).where(RunRow.tenant_id == principal.tenant_id)
        if chain_id:
            query = query.where(RunRow.chain_id == chain_id)
        if status in FINAL:
            query = query.where(RunRow.status == status)
        elif status:
            query = query.where(col(RunRow.status).not_in(list(FINAL)))
        if after is not None:
            query = query.where(col(RunRow.created_at) < after)
        query = query.order_by(col(RunRow.created_at).desc(), col(RunRow.id)).limit(size)
        with state.db.session() as session:
            return list(session.exec(query).all())

    client = await state.temporal.get()
    found: list[dict[str, Any]] = []
    # "running" and "waiting" are both unfinished rows; only the workflow knows which, so a
    # page of rows can hold fewer matches than asked for: read on until the page is full.
    for _ in range(_MAX_BATCHES):
        rows = await asyncio.to_thread(load, before)
        views = await asyncio.gather(*(_summary(state, client, row) for row in rows))
        found += [v for v in views if status is None or v["status"] == status]
        if len(rows) < size or len(found) >= size:
            break
        before = as_utc(rows[-1].created_at)
    return found[:size]


async def _summary(state: Any, client: Any, row: RunRow) -> dict[str, Any]:
    if row.status in FINAL:
        return {
            "id": row.id,
            "workflowId": row.workflow_id,
            "chainId": row.chain_id,
            "status": row.status,
            "createdAt": rfc3339(row.created_at),
        }
    view = await run_view(state, client, row)
    return {k: view[k] for k in ("id", "workflowId", "chainId", "status", "createdAt")}


@router.get("/runs/{id}", summary="A run's status, output, error and per-task state.")
async def get_run(id: str, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    row = await asyncio.to_thread(get_run_row, state, principal, id)
    client = await state.temporal.get()
    return await run_view(state, client, row)


class ApprovalBody(BaseModel):
    approved: bool = True
    comment: str = ""
    payload: Any = None


@router.post("/runs/{id}/approve", summary="Answers a waiting approval task.")
async def approve_run(
    id: str,
    state: StateDep,
    principal: PrincipalDep,
    body: ApprovalBody = Body(default_factory=ApprovalBody),
) -> dict[str, Any]:
    row = await asyncio.to_thread(get_run_row, state, principal, id)
    client = await state.temporal.get()
    handle = client.get_workflow_handle(row.workflow_id)
    decision = ApprovalDecision(
        approved=body.approved, comment=body.comment, payload=body.payload, by=principal.key_id
    )
    try:
        await handle.signal("approve", decision, rpc_timeout=timedelta(seconds=10))
    except RPCError as err:
        raise _closed(err, id) from err
    return {"id": row.id, "approved": body.approved}


@router.post("/runs/{id}/cancel", summary="Cancels a running chain run.")
async def cancel_run(id: str, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    row = await asyncio.to_thread(get_run_row, state, principal, id)
    client = await state.temporal.get()
    handle = client.get_workflow_handle(row.workflow_id)
    try:
        # Temporal accepts a cancel request for a closed workflow without complaint.
        desc = await handle.describe(rpc_timeout=timedelta(seconds=10))
        if desc.status != WorkflowExecutionStatus.RUNNING:
            raise APIError(409, "run_not_running", f"run {id!r} has already finished")
        await handle.cancel(rpc_timeout=timedelta(seconds=10))
    except RPCError as err:
        raise _closed(err, id) from err
    return {"id": row.id, "status": "cancelling"}


def _closed(err: RPCError, run_id: str) -> APIError:
    if err.status == RPCStatusCode.NOT_FOUND:
        return APIError(409, "run_not_running", f"run {run_id!r} has already finished")
    return APIError(503, "temporal_unavailable", err.message)
