"""/queue: the model download queue (seed 003), backed by one ModelDownloadWorkflow per backend.

Seed routes: `GET /queue`, `DELETE /queue/cancel`, `GET /queue/inProgress` (SSE) and
`DELETE /queue/{model}`. chainloom extensions: `POST /queue` (pull a model on one backend, what
`chainloom models pull` uses) and the `model`, `backend` and `job` filters of
`/queue/inProgress`. Downloads exist for `ollama` backends only.
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any, Literal, Self

from fastapi import Query, Request
from pydantic import BaseModel, Field
from sqlmodel import col, select
from sse_starlette import EventSourceResponse, ServerSentEvent
from temporalio.client import Client
from temporalio.service import RPCError

from api.deps import AppState, PrincipalDep, StateDep
from api.errors import APIError, not_found
from api.schemas import Camel, absent_when_none, event_stream
from api.strict_json import json_router
from core.backends.downloads import (
    BackendQueue,
    cancel_downloads,
    download_missing,
    enqueue_download,
    queue_state,
)
from core.backends.providers import same_model
from core.backends.refs import to_ref
from core.models import BackendRow, GroupBackendRow
from workflows.download_types import DownloadOptions

log = logging.getLogger("chainloom.api.queue")
router = json_router(tags=["queue"])
# How long POST /queue waits for a worker to answer the queue query after queueing.
READ_BACK_SECONDS = 15.0

FINAL = ("success", "failed", "cancelled")
# How often /queue/inProgress reads the queues; progress itself arrives about once a second.
POLL_SECONDS = 0.5
# New backends show up in an open stream after at most this long.
BACKENDS_TTL = 5.0
# A followed job that cannot be found for this long is reported unknown and the stream ends.
JOB_GRACE = 10.0
# POST /models must answer promptly even when Temporal or a backend is slow or down.
DECLARE_TIMEOUT = 5.0
# The pull gives up retrying transient failures after this long (informational validUntil).
VALID_SECONDS = int(DownloadOptions().give_up_after)


class PullIn(BaseModel):
    model: str = Field(..., min_length=1, max_length=400, description="e.g. llama3.2:latest")
    backend: str = Field(..., min_length=1, description="Name or id of an ollama backend.")


class ModelJob(Camel):
    model: str
    url: str = Field(description="The backend's base URL.")


class DownloadProgress(Camel):
    """Where a running download is; null for what the pull has not reported yet."""

    status: str | None = Field(None, description="What the backend reports, e.g. pulling.")
    digest: str | None = None
    completed: int | None = Field(None, description="Bytes.")
    total: int | None = Field(None, description="Bytes.")
    attempt: int | None = Field(None, description="Which try of the pull this is (from 1).")
    started_at: str | None = Field(None, description="RFC 3339.")


class JobOut(Camel):
    """seed 003 downloadservice_Job, plus chainloom's status and backend fields."""

    id: str
    task_type: Literal["model_download"] = "model_download"
    model_job: ModelJob
    scheduled_for: int = Field(description="Epoch seconds.")
    valid_until: int = Field(description="Epoch seconds.")
    created_at: str = Field(description="RFC 3339.")
    status: str = Field(description="queued, downloading, success, failed or cancelled")
    backend: str
    backend_id: str
    progress: DownloadProgress | None = absent_when_none("While downloading.")
    error: str = ""
    finished_at: str | None = absent_when_none("RFC 3339, once it ended.")

    @classmethod
    def of(cls, row: BackendRow, job: dict[str, Any], status: str) -> Self:
        created = str(job.get("createdAt") or "")
        scheduled = _unix(created)
        out = cls(
            id=str(job.get("id") or ""),
            model_job=ModelJob(model=job["model"], url=row.base_url),
            scheduled_for=scheduled,
            valid_until=scheduled + VALID_SECONDS if scheduled else 0,
            created_at=created,
            status=status,
            backend=row.name,
            backend_id=row.id,
        )
        if status == "downloading":
            out.progress = DownloadProgress.model_validate(job)
            out.error = job.get("lastError") or ""
        elif status in FINAL:
            out.error = job.get("error") or ""
            out.finished_at = job.get("finishedAt")
        return out


class DownloadEvent(Camel):
    """The seed's /queue/inProgress event data, plus the backend's name and the job id."""

    status: str = Field(description="As in GET /queue, or success, failed or cancelled.")
    digest: str
    total: int
    completed: int
    model: str
    base_url: str
    backend: str
    backend_id: str
    id: str = Field(description="The job.")
    error: str | None = absent_when_none("Why it failed, or the last error it retries after.")

    @classmethod
    def of(cls, row: BackendRow, job: dict[str, Any], status: str) -> Self:
        failed = status in FINAL or job.get("lastError")
        return cls(
            status=status,
            digest=job.get("digest") or "",
            total=int(job.get("total") or 0),
            completed=int(job.get("completed") or 0),
            model=job["model"],
            base_url=row.base_url,
            backend=row.name,
            backend_id=row.id,
            id=str(job.get("id") or ""),
            error=(job.get("error") or job.get("lastError") or "") if failed else None,
        )


class UnknownJob(Camel):
    """The last event when the followed job cannot be found."""

    status: Literal["unknown"] = "unknown"
    id: str
    error: str


# --------------------------------------------------------------------------- helpers


def _backends(state: AppState, tenant_id: str, *, grouped_only: bool = False) -> list[BackendRow]:
    """The tenant's ollama backends, the only ones that download."""
    query = select(BackendRow).where(BackendRow.tenant_id == tenant_id, BackendRow.type == "ollama")
    if grouped_only:
        members = select(GroupBackendRow.backend_id).where(GroupBackendRow.tenant_id == tenant_id)
        query = query.where(col(BackendRow.id).in_(members))
    with state.db.session() as session:
        return list(session.exec(query.order_by(col(BackendRow.created_at))).all())


def _all_backends(state: AppState, tenant_id: str) -> list[BackendRow]:
    with state.db.session() as session:
        return list(
            session.exec(
                select(BackendRow)
                .where(BackendRow.tenant_id == tenant_id)
                .order_by(col(BackendRow.created_at))
            ).all()
        )


def _unix(stamp: str) -> int:
    try:
        return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def _data(event: Camel, sort_keys: bool = False) -> str:
    return json.dumps(event.model_dump(mode="json", by_alias=True), sort_keys=sort_keys)


async def _client(state: AppState) -> Client:
    return await state.temporal.get()


def _unavailable(err: RPCError) -> APIError:
    return APIError(503, "temporal_unavailable", f"cannot reach the download queues: {err.message}")


async def _states(client: Client, rows: Sequence[BackendRow]) -> list[BackendQueue]:
    try:
        return await queue_state(client, [r.id for r in rows])
    except RPCError as err:
        raise _unavailable(err) from err


def _find(queue: BackendQueue, model: str) -> tuple[dict[str, Any], str] | None:
    """The job for `model` in this queue: running, else queued, else the last finished one."""
    if queue.in_progress and same_model(queue.in_progress["model"], model):
        return queue.in_progress, "downloading"
    for job in queue.pending:
        if same_model(job["model"], model):
            return job, "queued"
    for job in reversed(queue.finished):
        if same_model(job["model"], model):
            return job, str(job["status"])
    return None


# --------------------------------------------------------------------------- hooks for /models


async def queue_declared_model(state: AppState, tenant_id: str, model: str) -> list[str]:
    """POST /models: pull the model on every ollama backend lacking it (with groups enabled,
    only backends in at least one group, seed 003). Never fails the request: when Temporal is
    down the state sync queues the downloads later. Returns the backend ids queued."""
    try:
        async with asyncio.timeout(DECLARE_TIMEOUT):
            rows = await asyncio.to_thread(
                _backends, state, tenant_id, grouped_only=state.settings.groups_enabled
            )
            if not rows:
                return []
            client = await _client(state)
            return await download_missing(
                client,
                state.settings.task_queue,
                tenant_id,
                [to_ref(r) for r in rows],
                model,
                allowlist=state.settings.backend_allowlist,
            )
    except Exception as err:
        log.warning("model %s declared, but its downloads were not started: %s", model, err)
        return []


async def purge_model_downloads(state: AppState, tenant_id: str, model: str) -> None:
    """DELETE /models/{id}?purge=true: drop the model from every queue, stop its pulls."""
    rows = await asyncio.to_thread(_backends, state, tenant_id)
    if not rows:
        return
    try:
        client = await _client(state)
        await cancel_downloads(client, tenant_id, [r.id for r in rows], model)
    except (APIError, RPCError) as err:
        raise APIError(
            503,
            "temporal_unavailable",
            f"model {model!r} was removed, but its downloads could not be cancelled "
            f"(retry DELETE /queue/{model}): {err}",
        ) from err


# --------------------------------------------------------------------------- routes


@router.get(
    "/queue",
    response_model=list[JobOut],
    summary="Retrieves the current model download queue state.",
    description="The download running on each ollama backend (status `downloading`, with "
    "`progress`) followed by the models waiting (status `queued`), oldest first.",
)
async def list_queue(state: StateDep, principal: PrincipalDep) -> list[JobOut]:
    rows = await asyncio.to_thread(_backends, state, principal.tenant_id)
    if not rows:
        return []
    by_id = {r.id: r for r in rows}
    jobs: list[JobOut] = []
    for queue in await _states(await _client(state), rows):
        row = by_id[queue.backend_id]
        if queue.in_progress:
            jobs.append(JobOut.of(row, queue.in_progress, "downloading"))
        jobs.extend(JobOut.of(row, job, "queued") for job in queue.pending)
    return jobs


@router.post(
    "/queue",
    status_code=201,
    response_model=JobOut,
    summary="Pulls a model onto one ollama backend (chainloom extension).",
    description="Queues the model on the backend's download queue, or returns the job already "
    "queued or running for it. Follow it with `GET /queue/inProgress?job=<id>`.",
)
async def pull_model(body: PullIn, state: StateDep, principal: PrincipalDep) -> JobOut:
    rows = await asyncio.to_thread(_all_backends, state, principal.tenant_id)
    row = next((r for r in rows if r.id == body.backend), None) or next(
        (r for r in rows if r.name == body.backend), None
    )
    if row is None:
        raise not_found("backend", body.backend)
    if row.type != "ollama":
        raise APIError(
            422,
            "unsupported_backend",
            f"backend {row.name!r} is of type {row.type}: only ollama backends download models",
            param="backend",
        )
    client = await _client(state)
    try:
        await enqueue_download(
            client,
            state.settings.task_queue,
            principal.tenant_id,
            row.id,
            body.model,
            backend_name=row.name,
        )
    except RPCError as err:
        raise _unavailable(err) from err
    # Queries see every signal already accepted, so the job is there (or was just finished),
    # once a worker answers: right after workers (re)start none may for a few seconds.
    deadline = time.monotonic() + READ_BACK_SECONDS
    while True:
        [queue] = await _states(client, [row])
        found = _find(queue, body.model)
        if found is not None or not queue.partial or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    if found is None:
        raise APIError(
            503,
            "queue_unreadable",
            f"the download of {body.model!r} is queued, but no worker answered within "
            f"{READ_BACK_SECONDS:g} s to show it; GET /queue lists it once a worker runs",
        )
    return JobOut.of(row, *found)


@router.delete(
    "/queue/cancel",
    summary="Cancels an in-progress model download.",
    description="`url`: cancel every download of the backend with that base URL; `model`: "
    "cancel that model's downloads on every backend; both: that model on that backend.",
)
async def cancel_queue(
    state: StateDep,
    principal: PrincipalDep,
    url: str | None = Query(None, description="Base URL of a backend."),
    model: str | None = Query(None, description="Model name, e.g. mistral:latest."),
) -> str:
    if not url and not model:
        raise APIError(
            422,
            "missing_parameter",
            "give `url` (a backend's base URL) or `model` (a model name), or both",
            param="model",
        )
    rows = await asyncio.to_thread(_backends, state, principal.tenant_id)
    if url:
        rows = [r for r in rows if r.base_url.rstrip("/") == url.rstrip("/")]
        if not rows:
            raise not_found("ollama backend with url", url)
    if rows:
        client = await _client(state)
        try:
            await cancel_downloads(client, principal.tenant_id, [r.id for r in rows], model)
        except RPCError as err:
            raise _unavailable(err) from err
    return "download cancelled"


@router.get(
    "/queue/inProgress",
    summary="Streams real-time download progress via Server-Sent Events (SSE).",
    description="`event: status` with data `{status, digest, total, completed, model, baseUrl, "
    "backend, backendId, id}` whenever a download's progress changes, and once more when it "
    "ends with status `success`, `failed` (with `error`) or `cancelled`. chainloom "
    "extensions: `model` and `backend` narrow the stream; `job` follows one job from the "
    "state it is in (`queued` first when it waits) and ends the stream when it is over.",
    response_class=EventSourceResponse,
    responses={
        200: event_stream(
            "`event: status` messages whose data is a DownloadEvent (or, following a job that "
            "cannot be found, an UnknownJob); a comment line every 15 s keeps it open.",
            DownloadEvent | UnknownJob,
            event="status",
        )
    },
)
async def in_progress(
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    model: str | None = Query(None, description="Only this model."),
    backend: str | None = Query(None, description="Only this backend (name or id)."),
    job: str | None = Query(None, description="Follow this job id until it ends."),
) -> EventSourceResponse:
    client = await _client(state)  # 503 now, before the stream starts, when Temporal is down
    tenant_id = principal.tenant_id

    async def load() -> list[BackendRow]:
        rows = await asyncio.to_thread(_backends, state, tenant_id)
        if backend:
            rows = [r for r in rows if backend in (r.id, r.name)]
        return rows

    rows = await load()
    if backend and not rows:
        raise not_found("ollama backend", backend)

    def wanted(item: dict[str, Any]) -> bool:
        if job:
            return item.get("id") == job
        return not model or same_model(str(item["model"]), model)

    async def events() -> AsyncIterator[ServerSentEvent]:
        nonlocal rows
        loop = asyncio.get_running_loop()
        loaded = loop.time()
        sent: dict[str, str] = {}  # backend id -> last progress sent
        seen: set[str] | None = None  # finished job ids already known
        missing_since: float | None = None  # when a followed job was last not found
        while not await request.is_disconnected():
            if loop.time() - loaded > BACKENDS_TTL:
                rows, loaded = await load(), loop.time()
            by_id = {r.id: r for r in rows}
            try:
                queues = await queue_state(client, list(by_id))
            except RPCError as err:
                log.warning("download progress unreadable: %s", err.message)
                await asyncio.sleep(POLL_SECONDS * 2)
                continue
            found = False
            finished_now: set[str] = set()
            for queue in queues:
                row = by_id[queue.backend_id]
                current = queue.in_progress
                if current and wanted(current):
                    found = True
                    data = DownloadEvent.of(
                        row, current, str(current.get("status") or "downloading")
                    )
                    text = _data(data, sort_keys=True)
                    if sent.get(row.id) != text:
                        sent[row.id] = text
                        yield ServerSentEvent(_data(data), event="status")
                if job:
                    for waiting in queue.pending:
                        if waiting.get("id") == job:
                            found = True
                            queued = DownloadEvent.of(row, waiting, "queued")
                            text = _data(queued, sort_keys=True)
                            if sent.get(row.id) != text:
                                sent[row.id] = text
                                yield ServerSentEvent(text, event="status")
                for done in queue.finished:
                    finished_now.add(done["id"])
                    if not wanted(done):
                        continue
                    if job or (seen is not None and done["id"] not in seen):
                        found = True
                        ended = DownloadEvent.of(row, done, str(done["status"]))
                        yield ServerSentEvent(_data(ended), event="status")
                        if job:
                            return
            seen = finished_now | (seen or set())
            # A queue nobody could query may hold the job: only a full read can miss it.
            if found or any(q.partial for q in queues):
                missing_since = None
            elif missing_since is None:
                missing_since = loop.time()
            if job and missing_since is not None and loop.time() - missing_since > JOB_GRACE:
                unknown = UnknownJob(id=job, error=f"no download job {job}")
                yield ServerSentEvent(_data(unknown), event="status")
                return
            await asyncio.sleep(POLL_SECONDS)

    return EventSourceResponse(events(), ping=15)


@router.delete(
    "/queue/{model:path}",
    summary="Removes a model from the download queue.",
    description="Removes the model from every backend's queue; a download in progress is "
    "cancelled.",
)
async def remove_from_queue(model: str, state: StateDep, principal: PrincipalDep) -> str:
    rows = await asyncio.to_thread(_backends, state, principal.tenant_id)
    if rows:
        client = await _client(state)
        try:
            await cancel_downloads(client, principal.tenant_id, [r.id for r in rows], model)
        except RPCError as err:
            raise _unavailable(err) from err
    return "model removed from queue"
