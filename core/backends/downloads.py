"""Starting, cancelling and reading model downloads (ModelDownloadWorkflow), for the API, the
`POST /models` hook and the state-sync activity.

Each Ollama backend has one download queue, the workflow `download-<backend id>`. Enqueueing is
a signal-with-start: it starts the queue when none runs and only signals it otherwise, in one
atomic server call, so two API processes (or the API and the state sync) can never start two
queues for one backend.
"""

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
)
from temporalio.service import RPCError, RPCStatusCode

from core.backends.providers import BackendRef, ollama_client, same_model
from core.backends.transport import backend_allowlist
from workflows.contracts import (
    CANCEL_SIGNAL,
    DOWNLOAD_WORKFLOW,
    ENQUEUE_SIGNAL,
    OLLAMA_PULL,
    QUEUE_QUERY,
    TENANT_ID,
    search_attributes,
)
from workflows.download_types import (
    DownloadOptions,
    DownloadQueueInput,
    DownloadRequest,
    download_workflow_id,
)

log = logging.getLogger(__name__)

RUN_KIND_DOWNLOAD = "download"
# Reading a queue must not hang a request or an SSE poll when no worker answers queries.
READ_TIMEOUT = timedelta(seconds=3)
# Listing a backend's models before queueing: a slow backend just gets the download queued.
LIST_TIMEOUT = 3.0


@dataclass
class BackendQueue:
    """What one backend's download queue holds right now (empty when no queue ever ran)."""

    backend_id: str
    running: bool = False
    # True when the queue could not be queried (no worker answered): only the running pull's
    # heartbeat is known, not the waiting and finished jobs.
    partial: bool = False
    # {id, model, status, digest, completed, total, createdAt, startedAt, attempt, lastError}
    in_progress: dict[str, Any] | None = None
    # [{id, model, createdAt}], oldest first
    pending: list[dict[str, Any]] = field(default_factory=list)
    # [{id, model, status, error, digest, completed, total, createdAt, finishedAt}], newest last
    finished: list[dict[str, Any]] = field(default_factory=list)


async def enqueue_download(
    client: Client,
    task_queue: str,
    tenant_id: str,
    backend_id: str,
    model: str,
    *,
    options: DownloadOptions | None = None,
    backend_name: str = "",
) -> None:
    """Queue a pull of `model` on the backend; a model already queued or pulling is ignored."""
    await client.start_workflow(
        DOWNLOAD_WORKFLOW,
        DownloadQueueInput(
            tenant_id=tenant_id, backend_id=backend_id, options=options or DownloadOptions()
        ),
        id=download_workflow_id(backend_id),
        task_queue=task_queue,
        start_signal=ENQUEUE_SIGNAL,
        start_signal_args=[DownloadRequest(model=model)],
        search_attributes=search_attributes(tenant_id, RUN_KIND_DOWNLOAD),
        static_summary=f"model downloads on backend {backend_name or backend_id}",
    )


async def cancel_downloads(
    client: Client,
    tenant_id: str,
    backend_ids: Sequence[str] | None,
    model: str | None = None,
) -> int:
    """Drop `model` (every model when None) from the queues of these backends (every queue of
    the tenant when None) and stop its running pull. Returns how many queues were signalled."""
    if backend_ids is None:
        query = (
            f"WorkflowType = '{DOWNLOAD_WORKFLOW}' AND ExecutionStatus = 'Running' "
            f"AND {TENANT_ID.name} = '{_quote(tenant_id)}'"
        )
        workflow_ids = [wf.id async for wf in client.list_workflows(query)]
    else:
        workflow_ids = [download_workflow_id(b) for b in backend_ids]

    async def one(workflow_id: str) -> bool:
        try:
            await client.get_workflow_handle(workflow_id).signal(CANCEL_SIGNAL, model or "")
        except RPCError as err:
            if err.status == RPCStatusCode.NOT_FOUND:  # no queue, or it completed: nothing to do
                return False
            raise
        return True

    results = await asyncio.gather(*(one(w) for w in dict.fromkeys(workflow_ids)))
    return sum(results)


async def queue_state(client: Client, backend_ids: Sequence[str]) -> list[BackendQueue]:
    """Each backend's queue, with the running pull's live progress from its last heartbeat."""
    return list(await asyncio.gather(*(_one_queue(client, b) for b in backend_ids)))


async def download_missing(
    client: Client,
    task_queue: str,
    tenant_id: str,
    backends: Sequence[BackendRef],
    model: str,
    allowlist: str | None = None,
) -> list[str]:
    """Queue `model` on every ollama backend that does not serve it; returns their ids.

    A backend that cannot be asked gets the download queued anyway: the pull retries until it
    is back, and declaring a model is a promise that it will be there. `allowlist` is
    CHAINLOOM_BACKEND_ALLOWLIST (None reads it from the environment).
    """
    allowed = backend_allowlist(allowlist)
    wanted: list[BackendRef] = []
    for backend in backends:
        if backend.type != "ollama":
            continue
        try:
            async with ollama_client(backend.base_url, LIST_TIMEOUT, allowed) as api:
                listing = await api.list()
            if any(same_model(m.model or "", model) for m in listing.models):
                continue
        except Exception as err:  # unreachable or odd answer: queue it, the pull will retry
            log.info("could not list models of %s (%s); queueing %s", backend.name, err, model)
        wanted.append(backend)
    for backend in wanted:
        await enqueue_download(
            client, task_queue, tenant_id, backend.id, model, backend_name=backend.name
        )
    return [b.id for b in wanted]


async def _one_queue(client: Client, backend_id: str) -> BackendQueue:
    handle = client.get_workflow_handle(download_workflow_id(backend_id))
    try:
        desc = await handle.describe(rpc_timeout=READ_TIMEOUT)
    except RPCError as err:
        if err.status == RPCStatusCode.NOT_FOUND:
            return BackendQueue(backend_id)
        raise
    if desc.status == WorkflowExecutionStatus.COMPLETED:
        # An idle queue completes; its result is its last state, finished jobs included.
        try:
            result = await handle.result(rpc_timeout=READ_TIMEOUT)
        except Exception as err:  # a new run started in between: the next read sees it
            log.debug("cannot read the result of %s: %s", handle.id, err)
            return BackendQueue(backend_id)
        return _from_state(backend_id, result, running=False)
    if desc.status != WorkflowExecutionStatus.RUNNING:
        return BackendQueue(backend_id)
    progress = await _heartbeat(client, desc.raw_description.pending_activities)
    try:
        state = await handle.query(QUEUE_QUERY, rpc_timeout=READ_TIMEOUT)
    except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError) as err:
        # No worker answers right now (one was just killed): the heartbeat still tells what
        # is being pulled, which is what a progress display needs.
        log.debug("cannot query %s: %s", handle.id, err)
        queue = BackendQueue(backend_id, running=True, partial=True)
        if progress:
            job_id = progress.pop("jobId", "")
            queue.in_progress = {"id": job_id, "createdAt": "", "startedAt": "", **progress}
        return queue
    queue = _from_state(backend_id, state, running=True)
    current = queue.in_progress
    if current and progress and same_model(str(progress.get("model", "")), current["model"]):
        current.update({k: v for k, v in progress.items() if k not in ("model", "jobId")})
    return queue


async def _heartbeat(client: Client, pending: Sequence[Any]) -> dict[str, Any] | None:
    """The pull's last progress, from the pending activity's heartbeat details."""
    for activity in pending:
        if activity.activity_type.name != OLLAMA_PULL:
            continue
        info: dict[str, Any] = {"attempt": activity.attempt}
        if activity.attempt > 1 and activity.HasField("last_failure"):
            info["lastError"] = activity.last_failure.message
        if activity.HasField("heartbeat_details"):
            values = await client.data_converter.decode_wrapper(activity.heartbeat_details)
            if values and isinstance(values[0], dict):
                info.update(values[0])
        return info
    return None


def _from_state(backend_id: str, state: Any, *, running: bool) -> BackendQueue:
    if not isinstance(state, dict):
        return BackendQueue(backend_id, running=running)
    current = state.get("inProgress")
    return BackendQueue(
        backend_id,
        running=running,
        in_progress=dict(current) if isinstance(current, dict) else None,
        pending=list(state.get("pending") or []),
        finished=list(state.get("finished") or []),
    )


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")
