"""POST /tasks (run and wait, seed 003) and the asynchronous /runs API."""

import asyncio
from datetime import timedelta
from typing import Any, Literal

from fastapi import Body, Query, Response
from fastapi.responses import JSONResponse
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.service import RPCError

from api.deps import PrincipalDep, StateDep, page_limit
from api.errors import APIError, ErrorBody, error_body
from api.run_health import cancel, result_unless_stuck
from api.run_listing import list_page
from api.run_models import (
    ApprovalConflict,
    ApprovalRequest,
    ApprovalResult,
    CapturedStateUnit,
    RunCancelled,
    RunCreated,
    RunSummary,
    RunView,
    TaskChainFailure,
    TaskExecutionRequest,
    TaskExecutionResponse,
)
from api.run_service import (
    APPROVE_WAIT_SECONDS,
    approve,
    closed_run,
    failed_run,
    get_run_row,
    resolve_chain,
    run_view,
    start_run,
    whole_run,
)
from api.strict_json import json_router
from workflows.types import ApprovalDecision

router = json_router(tags=["runs"])

NEXT_CURSOR = "X-Next-Cursor"
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such run in the caller's tenant."}
}
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "The run is not in a state that allows this."}
}
_UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorBody, "description": "Temporal or a worker did not answer in time."}
}


@router.post(
    "/tasks",
    summary="Executes dynamic task-chain workflows.",
    description="Runs the chain and waits for its result (up to CHAINLOOM_TASKS_WAIT_TIMEOUT); "
    "a run still going after that answers 202 with the run id to poll on /runs/{id}. A run "
    "whose workflow task keeps failing is ended and answers 422 with the failure.",
    response_model=TaskExecutionResponse,
    responses={
        202: {"model": RunCreated, "description": "Still running: poll GET /runs/{id}."},
        422: {
            "model": TaskChainFailure,
            "description": "An invalid request, or a chain that failed or was cancelled "
            "(then `id`, `workflowId` and `state` say which run and how far it got).",
        },
    },
)
async def execute_task(body: TaskExecutionRequest, state: StateDep, principal: PrincipalDep) -> Any:
    chain = await resolve_chain(state, principal, body)
    run, handle = await start_run(state, principal, chain, body)
    client = await state.temporal.get()
    try:
        result = await result_unless_stuck(client, handle, state.settings.tasks_wait_timeout)
    except TimeoutError:
        created = RunCreated.model_validate(run)
        return JSONResponse(created.model_dump(mode="json", by_alias=True), status_code=202)
    except WorkflowFailureError as err:
        status, message, unit_state = await failed_run(state, run, err)
        failure = TaskChainFailure.model_validate(
            error_body(422, f"chain_{status}", message)
            | {
                "id": run.id,
                "workflowId": run.workflow_id,
                "state": [CapturedStateUnit.model_validate(u) for u in unit_state],
            }
        )
        return JSONResponse(failure.model_dump(mode="json", by_alias=True), status_code=422)
    whole = await whole_run(state, run, result)
    return TaskExecutionResponse(
        id=run.id, output=whole["output"], output_type=result["outputType"], state=whole["state"]
    )


@router.post(
    "/runs",
    status_code=202,
    summary="Starts a chain run without waiting.",
    response_model=RunCreated,
)
async def create_run(
    body: TaskExecutionRequest, state: StateDep, principal: PrincipalDep
) -> RunCreated:
    chain = await resolve_chain(state, principal, body)
    run, _ = await start_run(state, principal, chain, body)
    return RunCreated.model_validate(run)


@router.get(
    "/runs",
    summary="Lists runs: unfinished ones first (newest started first), then finished ones "
    "(most recently finished first).",
    description="Read from Temporal's visibility store in one call per page, so a run that "
    "just started or changed may take a moment to show. The `X-Next-Cursor` response header "
    "carries the cursor of the next page (absent after the last page; the page before it may "
    "be full); pass it back as `cursor` with the same `chainId` and `status`. A run that "
    "finishes while you page can show up twice, once unfinished and once finished.",
    response_model=list[RunSummary],
    responses={
        200: {
            "headers": {
                NEXT_CURSOR: {
                    "description": "The cursor of the next page, when there is one.",
                    "schema": {"type": "string"},
                }
            }
        },
        400: {"model": ErrorBody, "description": "A bad limit or cursor."},
        **_UNAVAILABLE,
    },
)
async def list_runs(
    state: StateDep,
    principal: PrincipalDep,
    response: Response,
    chain_id: str | None = Query(None, alias="chainId"),
    status: Literal["running", "waiting", "completed", "failed", "cancelled"] | None = None,
    limit: str | None = Query(None, description="Runs per page: 1 to 200, 50 by default."),
    cursor: str | None = Query(None, description="The X-Next-Cursor of the previous page."),
) -> list[RunSummary]:
    size = page_limit(limit, default=50, maximum=200)
    client = await state.temporal.get()
    runs, next_cursor = await list_page(
        state,
        client,
        principal.tenant_id,
        chain_id=chain_id,
        status=status,
        size=size,
        cursor=cursor,
    )
    if next_cursor:
        response.headers[NEXT_CURSOR] = next_cursor
    return runs


@router.get(
    "/runs/{id}",
    summary="A run's status, output, error and per-task state.",
    response_model=RunView,
    responses={**_NOT_FOUND, **_UNAVAILABLE},
)
async def get_run(id: str, state: StateDep, principal: PrincipalDep) -> RunView:
    row = await asyncio.to_thread(get_run_row, state, principal, id)
    client = await state.temporal.get()
    return await run_view(state, client, row)


@router.post(
    "/runs/{id}/approve",
    summary="Answers the approval task the run waits on.",
    description="The decision goes to the approval task the run is waiting on, and the answer "
    "says which. A run that is not waiting for an approval (it is on another task, or has "
    "finished) answers 409 and keeps nothing for later: send the decision once the run's "
    f"status is `waiting`. 503 when no worker takes the decision within "
    f"{APPROVE_WAIT_SECONDS:g} s.",
    response_model=ApprovalResult,
    responses={
        **_NOT_FOUND,
        409: {"model": ApprovalConflict, "description": "The run waits for no approval."},
        **_UNAVAILABLE,
    },
)
async def approve_run(
    id: str,
    state: StateDep,
    principal: PrincipalDep,
    body: ApprovalRequest = Body(default_factory=ApprovalRequest),
) -> ApprovalResult:
    row = await asyncio.to_thread(get_run_row, state, principal, id)
    client = await state.temporal.get()
    decision = ApprovalDecision(
        approved=body.approved, comment=body.comment, payload=body.payload, by=principal.key_id
    )
    return await approve(client, row, decision)


@router.post(
    "/runs/{id}/cancel",
    summary="Cancels a running chain run.",
    description="Answers `cancelled` once the run has stopped, or `cancelling` while it still "
    "winds down (e.g. an activity acknowledging the cancel). A run whose workflow task keeps "
    "failing cannot stop by itself: it is terminated, and shows as cancelled with the reason.",
    response_model=RunCancelled,
    responses={**_NOT_FOUND, **_CONFLICT, **_UNAVAILABLE},
)
async def cancel_run(id: str, state: StateDep, principal: PrincipalDep) -> RunCancelled:
    row = await asyncio.to_thread(get_run_row, state, principal, id)
    client = await state.temporal.get()
    handle = client.get_workflow_handle(row.workflow_id)
    try:
        # Temporal accepts a cancel request for a closed workflow without complaint.
        desc = await handle.describe(rpc_timeout=timedelta(seconds=10))
        if desc.status != WorkflowExecutionStatus.RUNNING:
            raise APIError(409, "run_not_running", f"run {id!r} has already finished")
        status = await cancel(client, handle)
    except RPCError as err:
        raise closed_run(err, id) from err
    return RunCancelled(id=row.id, status=status)
