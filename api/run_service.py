"""Starting chain runs as workflows and reading them back."""

import asyncio
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import select
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.exceptions import ApplicationError, CancelledError, TerminatedError
from temporalio.service import RPCError, RPCStatusCode

from api.chain_validation import validate_chain
from api.deps import AppState, Principal
from api.errors import APIError, not_found
from chains.spec import ChainDefinition
from core.metering.request_log import note_run
from core.models import RunRow, TaskChainRow, rfc3339, utcnow
from core.runs import start_chain_run
from core.runstate import records
from workflows import values
from workflows.contracts import PROGRESS_QUERY

FINAL = {"completed", "failed", "cancelled"}


class TaskExecutionRequest(BaseModel):
    """seed 003 execapi_taskExecutionRequest, plus `chainId` to run a stored chain."""

    model_config = ConfigDict(populate_by_name=True)

    chain: dict[str, Any] | None = Field(None, description="An inline chain definition.")
    chain_id: str | None = Field(None, alias="chainId", description="Id of a stored chain.")
    input: Any = None
    input_type: str = Field("string", alias="inputType")


class RunCreated(BaseModel):
    id: str
    workflow_id: str = Field(serialization_alias="workflowId")
    status: str


async def resolve_chain(
    state: AppState, principal: Principal, body: TaskExecutionRequest
) -> ChainDefinition:
    if body.chain is not None and body.chain_id:
        raise APIError(400, "ambiguous_chain", "send either `chain` or `chainId`, not both")
    if body.chain is not None:
        return validate_chain(body.chain)
    if not body.chain_id:
        raise APIError(
            422,
            "missing_chain",
            "the request needs `chain` (a definition) or `chainId` (a stored chain)",
            param="chain",
        )

    def load() -> dict[str, Any] | None:
        with state.db.session() as session:
            row = session.get(TaskChainRow, (principal.tenant_id, body.chain_id))
            return row.definition if row else None

    data = await asyncio.to_thread(load)
    if data is None:
        raise not_found("task chain", body.chain_id or "")
    return validate_chain(data)


async def start_run(
    state: AppState, principal: Principal, chain: ChainDefinition, body: TaskExecutionRequest
) -> tuple[RunRow, WorkflowHandle[Any, Any]]:
    client = await state.temporal.get()
    run, handle = await start_chain_run(
        state.db,
        client,
        state.settings,
        principal.tenant_id,
        chain,
        body.input,
        input_type=body.input_type,
    )
    note_run(run.id)
    return run, handle


def get_run_row(state: AppState, principal: Principal, run_id: str) -> RunRow:
    with state.db.session() as session:
        row = session.exec(
            select(RunRow).where(RunRow.id == run_id, RunRow.tenant_id == principal.tenant_id)
        ).first()
    if row is None:
        raise not_found("run", run_id)
    return row


def failure_view(err: WorkflowFailureError) -> tuple[str, str, list[dict[str, Any]]]:
    """(status, message, state) of a run that did not complete."""
    cause = err.cause
    if isinstance(cause, CancelledError):
        return "cancelled", "the run was cancelled", []
    if isinstance(cause, TerminatedError):
        return "failed", f"the run was terminated: {cause.message}", []
    if isinstance(cause, ApplicationError):
        state: list[dict[str, Any]] = []
        if cause.details and isinstance(cause.details[0], dict):
            state = list(cause.details[0].get("state") or [])
        return "failed", cause.message, state
    return "failed", str(cause or err), []


async def whole_run(state: AppState, row: RunRow, data: dict[str, Any]) -> dict[str, Any]:
    """{"output", "state"} of a run's result, progress or failure details with the state
    units written to the run's records and its stored values read back (docs/chains.md,
    "Long and large chains"); past CHAINLOOM_RUN_VIEW_MAX_BYTES values stay handles that
    link GET /runs/{id}/values/{seq}."""

    def link(ref: dict[str, Any]) -> dict[str, Any]:
        workflow_id, seq = values.ref_key(ref)
        if workflow_id != row.workflow_id:
            return ref
        return {**ref, "href": f"/runs/{row.id}/values/{seq}"}

    def work() -> dict[str, Any]:
        return records.whole_result(
            state.db,
            row.tenant_id,
            row.workflow_id,
            data,
            budget=state.settings.run_view_max_bytes,
            on_skip=link,
        )

    return await asyncio.to_thread(work)


async def failed_run(
    state: AppState, row: RunRow, err: WorkflowFailureError
) -> tuple[str, str, list[dict[str, Any]]]:
    """failure_view with the whole state of the run."""
    status, message, unit_state = failure_view(err)
    cause = err.cause
    details = cause.details[0] if isinstance(cause, ApplicationError) and cause.details else {}
    stored = details.get("stateStored", 0) if isinstance(details, dict) else 0
    whole = await whole_run(state, row, {"state": unit_state, "stateStored": stored})
    return status, message, whole["state"]


_STATUS = {
    WorkflowExecutionStatus.RUNNING: "running",
    WorkflowExecutionStatus.COMPLETED: "completed",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.CANCELED: "cancelled",
    WorkflowExecutionStatus.TERMINATED: "failed",
    WorkflowExecutionStatus.TIMED_OUT: "failed",
    WorkflowExecutionStatus.CONTINUED_AS_NEW: "running",
}


async def run_view(state: AppState, client: Client, row: RunRow) -> dict[str, Any]:
    handle = client.get_workflow_handle(row.workflow_id)
    view: dict[str, Any] = {
        "id": row.id,
        "workflowId": row.workflow_id,
        "chainId": row.chain_id,
        "createdAt": rfc3339(row.created_at),
        "status": row.status,
        "output": None,
        "outputType": None,
        "state": [],
        "error": None,
        "currentTask": None,
    }
    try:
        desc = await handle.describe(rpc_timeout=timedelta(seconds=10))
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            view["status"] = "failed"
            view["error"] = "the workflow of this run no longer exists in Temporal (retention)"
            return view
        raise APIError(503, "temporal_unavailable", f"cannot read the run: {err.message}") from err
    status = _STATUS.get(desc.status or WorkflowExecutionStatus.RUNNING, "running")
    if status == "running":
        try:
            progress = await handle.query(PROGRESS_QUERY, rpc_timeout=timedelta(seconds=5))
            status = progress.get("status", "running")
            if status in FINAL:
                # It finished between describe and query; the next read carries the result.
                status = "running"
            whole = await whole_run(state, row, {**progress, "output": None})
            view["state"] = whole["state"]
            view["currentTask"] = progress.get("currentTask") or None
        except RPCError:
            pass  # no worker is polling right now; the status alone is still right
    elif status == "completed":
        result = await handle.result(rpc_timeout=timedelta(seconds=10))
        whole = await whole_run(state, row, result)
        view.update(output=whole["output"], outputType=result["outputType"], state=whole["state"])
    else:
        try:
            await handle.result(rpc_timeout=timedelta(seconds=10))
        except WorkflowFailureError as err:
            status, message, unit_state = await failed_run(state, row, err)
            view.update(error=message, state=unit_state)
    view["status"] = status
    if status in FINAL and row.status != status:
        await asyncio.to_thread(_mark_final, state, row.id, status)
    return view


def _mark_final(state: AppState, run_id: str, status: str) -> None:
    with state.db.session() as session:
        row = session.get(RunRow, run_id)
        if row is not None:
            row.status = status
            row.finished_at = utcnow()
            session.add(row)
            session.commit()
