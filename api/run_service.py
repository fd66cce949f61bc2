"""Chain runs as the API shows them: starting one, reading one, answering its approval task.

A run's status is read from Temporal every time (describe, the progress query, the result);
nothing here writes it back. Listing lives in api/run_listing.py.
"""

import asyncio
from datetime import timedelta
from typing import Any

from sqlmodel import select
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ApplicationError, CancelledError, TerminatedError
from temporalio.service import RPCError, RPCStatusCode

from api.chain_validation import validate_chain
from api.deps import AppState, Principal
from api.errors import APIError, not_found
from api.run_health import CANCELLED_PREFIX, stuck_reason
from api.run_models import ApprovalResult, RunView, TaskExecutionRequest
from chains.spec import ChainDefinition
from core.metering.request_log import note_run
from core.models import RunRow, TaskChainRow
from core.runs import RunInputTooLarge, start_chain_run
from core.runstate import records
from workflows import values
from workflows.contracts import APPROVE_UPDATE, PROGRESS_QUERY, RUN_NOT_WAITING
from workflows.types import ApprovalAccepted, ApprovalDecision

FINAL = {"completed", "failed", "cancelled"}
# How long POST /runs/{id}/approve waits for a worker to take the decision.
APPROVE_WAIT_SECONDS = 15.0


async def resolve_chain(
    state: AppState, principal: Principal, body: TaskExecutionRequest
) -> ChainDefinition:
    raw: Any = body.chain  # the JSON as sent: validate_chain checks it
    if raw is not None and body.chain_id:
        raise APIError(400, "ambiguous_chain", "send either `chain` or `chainId`, not both")
    if raw is not None:
        return validate_chain(raw)
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
    try:
        run, handle = await start_chain_run(
            state.db,
            client,
            state.settings,
            principal.tenant_id,
            chain,
            body.input,
            input_type=body.input_type,
        )
    except RunInputTooLarge as err:
        raise APIError(413, "run_input_too_large", str(err), param="input") from err
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
        if cause.message.startswith(CANCELLED_PREFIX):
            # POST /runs/{id}/cancel ended a run that could not stop by itself.
            return "cancelled", cause.message, []
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


STATUS_NAMES = {
    WorkflowExecutionStatus.RUNNING: "running",
    WorkflowExecutionStatus.COMPLETED: "completed",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.CANCELED: "cancelled",
    WorkflowExecutionStatus.TERMINATED: "failed",
    WorkflowExecutionStatus.TIMED_OUT: "failed",
    WorkflowExecutionStatus.CONTINUED_AS_NEW: "running",
}


async def run_view(state: AppState, client: Client, row: RunRow) -> RunView:
    handle = client.get_workflow_handle(row.workflow_id)
    fields: dict[str, Any] = {
        "id": row.id,
        "workflow_id": row.workflow_id,
        "chain_id": row.chain_id,
        "created_at": row.created_at,
    }
    try:
        desc = await handle.describe(rpc_timeout=timedelta(seconds=10))
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return RunView.model_validate(
                fields
                | {
                    "status": "failed",
                    "error": "the workflow of this run no longer exists in Temporal (retention)",
                }
            )
        raise APIError(503, "temporal_unavailable", f"cannot read the run: {err.message}") from err
    status = STATUS_NAMES.get(desc.status or WorkflowExecutionStatus.RUNNING, "running")
    try:
        reason = await stuck_reason(client, desc)
    except RPCError:
        reason = None
    if status == "running" and reason is not None:
        # Its query would replay into the same failure and time out: the reason says it all.
        fields["error"] = f"the run is stuck: {reason}"
    elif status == "running":
        try:
            progress = await handle.query(PROGRESS_QUERY, rpc_timeout=timedelta(seconds=5))
            status = progress.get("status", "running")
            if status in FINAL:
                # It finished between describe and query; the next read carries the result.
                status = "running"
            whole = await whole_run(state, row, {**progress, "output": None})
            fields["state"] = whole["state"]
            fields["current_task"] = progress.get("currentTask") or None
        except RPCError:
            pass  # no worker is polling right now; the status alone is still right
    elif status == "completed":
        result = await handle.result(rpc_timeout=timedelta(seconds=10))
        whole = await whole_run(state, row, result)
        fields.update(
            output=whole["output"], output_type=result["outputType"], state=whole["state"]
        )
    else:
        try:
            await handle.result(rpc_timeout=timedelta(seconds=10))
        except WorkflowFailureError as err:
            status, message, unit_state = await failed_run(state, row, err)
            fields.update(error=message, state=unit_state)
    return RunView.model_validate(fields | {"status": status})


async def approve(client: Client, row: RunRow, decision: ApprovalDecision) -> ApprovalResult:
    """Hand `decision` to the approval task the run waits on, through the approve update.

    The workflow's validator refuses the update unless the run waits on an approval task, so
    a decision sent early is answered 409 and never kept for a later task.
    """
    handle = client.get_workflow_handle(row.workflow_id)
    try:
        async with asyncio.timeout(APPROVE_WAIT_SECONDS):
            accepted = await handle.execute_update(
                APPROVE_UPDATE, decision, result_type=ApprovalAccepted
            )
    except WorkflowUpdateFailedError as err:
        raise _refused(err, row.id) from err
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError) as err:
        raise APIError(
            503,
            "no_worker",
            f"no worker took the decision for run {row.id!r} within "
            f"{APPROVE_WAIT_SECONDS:g} s, so it was not confirmed (a worker that picks it up "
            "soon may still apply it): check GET /runs/{id} before sending it again",
        ) from err
    except RPCError as err:
        raise closed_run(err, row.id) from err
    return ApprovalResult(
        id=row.id,
        task_id=accepted.task_id,
        approved=accepted.approved,
        comment=accepted.comment,
        payload=accepted.payload,
        by=accepted.by,
    )


def _refused(err: WorkflowUpdateFailedError, run_id: str) -> APIError:
    cause = err.cause
    if isinstance(cause, ApplicationError) and cause.type == RUN_NOT_WAITING:
        details = cause.details[0] if cause.details else None
        task = details.get("currentTask") if isinstance(details, dict) else None
        where = f"it is on task {task!r}" if task else "it is on no task"
        return APIError(
            409,
            "run_not_waiting",
            f"run {run_id!r} is not waiting for an approval: {where}",
            extra={"currentTask": task},
        )
    return APIError(409, "approval_refused", f"run {run_id!r} refused the decision: {cause}")


def closed_run(err: RPCError, run_id: str) -> APIError:
    if err.status == RPCStatusCode.NOT_FOUND:
        return APIError(409, "run_not_running", f"run {run_id!r} has already finished")
    return APIError(503, "temporal_unavailable", err.message)
