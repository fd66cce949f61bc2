"""Runs whose workflow task keeps failing: how to tell, and how cancel and /tasks end them.

Temporal retries a failing workflow task forever: workflow code raising something that is not
a Temporal failure (and not one of worker.WORKFLOW_FAILURE_TYPES), a task that trips the SDK's
deadlock detector, or a completion carrying a payload over the server's size limit. Such a run
stays `running` and cannot even act on a cancel request, since that request is handled by the
very workflow task that fails. Describe shows the pending workflow task's attempt; the failure
itself is the newest WorkflowTaskFailed event of the history (Temporal records only the first
failure of a streak, later attempts are not written).
"""

import asyncio
from datetime import timedelta
from typing import Any

from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.workflowservice.v1 import GetWorkflowExecutionHistoryReverseRequest
from temporalio.client import (
    Client,
    WorkflowExecutionDescription,
    WorkflowExecutionStatus,
    WorkflowHandle,
)
from temporalio.service import RPCError

# Termination reasons that start with this show the run as cancelled (api.run_service).
CANCELLED_PREFIX = "cancelled: "
# POST /runs/{id}/cancel waits this long for the workflow to close by itself.
CANCEL_GRACE = 5.0
# POST /tasks gives up on a run whose workflow task failed this many attempts in a row (a
# second attempt may still succeed on another worker; Temporal retries every ~10 s after it).
STUCK_ATTEMPTS = 3
# How often POST /tasks looks at the run it waits for.
STUCK_POLL = 5.0

_RPC = timedelta(seconds=10)
_FINISHED = {
    WorkflowExecutionStatus.COMPLETED: "completed",
    WorkflowExecutionStatus.CANCELED: "cancelled",
}
_TASK_EVENTS = {
    EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT,
    EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
}


async def _last_task_failure(client: Client, workflow_id: str) -> str | None:
    """The message of the workflow task failure the history ends on, if it ends on one."""
    request = GetWorkflowExecutionHistoryReverseRequest(
        namespace=client.namespace,
        execution=WorkflowExecution(workflow_id=workflow_id),
        maximum_page_size=100,
    )
    response = await client.workflow_service.get_workflow_execution_history_reverse(
        request, timeout=_RPC
    )
    for event in response.history.events:
        if event.event_type not in _TASK_EVENTS:
            continue
        if event.event_type != EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED:
            return None  # it timed out (a worker went away) or got through
        failure = event.workflow_task_failed_event_attributes.failure
        message = " ".join(failure.message.split()) or "no message"
        return message if len(message) <= 500 else message[:500] + "..."
    return None


async def stuck_reason(
    client: Client, desc: WorkflowExecutionDescription, min_attempts: int = 2
) -> str | None:
    """Why the run cannot move, when its workflow task is failing; None when it is not."""
    if desc.status != WorkflowExecutionStatus.RUNNING:
        return None
    attempt = desc.raw_description.pending_workflow_task.attempt
    if attempt < min_attempts:
        return None
    failure = await _last_task_failure(client, desc.id)
    if failure is None:
        return None
    return f"its workflow task keeps failing (attempt {attempt}): {failure}"


async def cancel(client: Client, handle: WorkflowHandle[Any, Any]) -> str:
    """Request cancellation; end the run by terminating it if its workflow task is failing.

    Answers the run's status: "cancelled", "cancelling" (still closing after the grace
    period, e.g. an activity acknowledging the cancel), or how it finished meanwhile.
    """
    await handle.cancel(rpc_timeout=_RPC)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CANCEL_GRACE
    while True:
        desc = await handle.describe(rpc_timeout=_RPC)
        if desc.status != WorkflowExecutionStatus.RUNNING:
            return _FINISHED.get(desc.status or WorkflowExecutionStatus.FAILED, "failed")
        reason = await stuck_reason(client, desc)
        if reason is not None:
            await handle.terminate(
                reason=f"{CANCELLED_PREFIX}the run could not stop by itself: {reason}",
                rpc_timeout=_RPC,
            )
            return "cancelled"
        if loop.time() >= deadline:
            return "cancelling"
        await asyncio.sleep(0.2)


async def result_unless_stuck(
    client: Client, handle: WorkflowHandle[Any, Any], wait_seconds: float
) -> Any:
    """`handle.result()` within `wait_seconds` (TimeoutError past it). A run found stuck meanwhile
    is terminated with the reason, so the result raises at once instead of never coming."""
    waiter = asyncio.ensure_future(handle.result())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    try:
        while True:
            left = deadline - loop.time()
            done, _ = await asyncio.wait({waiter}, timeout=max(min(STUCK_POLL, left), 0))
            if done:
                return waiter.result()
            if left <= 0:
                raise TimeoutError
            try:
                desc = await handle.describe(rpc_timeout=_RPC)
                reason = await stuck_reason(client, desc, STUCK_ATTEMPTS)
                if reason is not None:
                    await handle.terminate(reason=reason, rpc_timeout=_RPC)
            except RPCError:
                continue  # Temporal is busy or the run just closed: the waiter tells

    finally:
        waiter.cancel()
