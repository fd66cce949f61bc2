"""ModelDownloadWorkflow: the download queue of one Ollama backend.

One long-lived workflow per backend (id `download-<backend id>`) owns a FIFO of models to
pull. Enqueueing is a signal-with-start, so whoever asks first starts the queue and everybody
else just adds to it, atomically, without a lock of our own. The workflow pulls one model at a
time (so a backend's disk and link are never shared by two pulls), ignores a model that is
already queued or pulling, completes after a quiet minute and continues-as-new after many jobs.

Only the pull activity sees progress; it heartbeats it, and the API reads the pending
activity's heartbeat details back, so progress costs no history events.
"""

import asyncio
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    CancelledError,
)

with workflow.unsafe.imports_passed_through():
    from workflows.contracts import (
        CANCEL_SIGNAL,
        DOWNLOAD_WORKFLOW,
        ENQUEUE_SIGNAL,
        OLLAMA_PULL,
        PULL_FAILED,
        QUEUE_QUERY,
        failure_message,
    )
    from workflows.download_types import (
        DownloadJob,
        DownloadQueueInput,
        DownloadRequest,
        FinishedJob,
        PullInput,
        PullResult,
    )


def same_model(a: str, b: str) -> bool:
    """Ollama treats 'name' and 'name:latest' as one model (core.backends.providers.same_model,
    which this module may not import: it pulls in the HTTP clients)."""
    return a == b or a.removesuffix(":latest") == b.removesuffix(":latest")


def _now() -> str:
    return workflow.now().isoformat().replace("+00:00", "Z")


@workflow.defn(name=DOWNLOAD_WORKFLOW)
class ModelDownloadWorkflow:
    @workflow.init
    def __init__(self, params: DownloadQueueInput) -> None:
        # Set up before the start signal is handled, so a carried-over queue dedupes it.
        self._params = params
        self._pending: list[DownloadJob] = list(params.pending)
        self._finished: list[FinishedJob] = list(params.finished)
        self._current: DownloadJob | None = None
        self._started_at = ""
        self._activity: workflow.ActivityHandle[PullResult] | None = None
        # True when our own `cancel` signal (not a workflow cancel) stopped the running pull.
        self._cancelling = False

    @workflow.signal(name=ENQUEUE_SIGNAL)
    def enqueue(self, request: DownloadRequest) -> None:
        model = request.model.strip()
        if not model or self._known(model):
            return
        self._pending.append(DownloadJob(id=str(workflow.uuid4()), model=model, created_at=_now()))
        self._show()

    @workflow.signal(name=CANCEL_SIGNAL)
    def cancel(self, model: str) -> None:
        """Drop `model` from the queue or stop its pull; an empty name cancels everything."""
        kept: list[DownloadJob] = []
        for job in self._pending:
            if not model or same_model(job.model, model):
                self._finish(job, "cancelled", error="cancelled before the download started")
            else:
                kept.append(job)
        self._pending = kept
        current = self._current
        if current and self._activity and (not model or same_model(current.model, model)):
            self._cancelling = True
            self._activity.cancel()
        self._show()

    @workflow.query(name=QUEUE_QUERY)
    def queue(self) -> dict[str, Any]:
        return self._state()

    @workflow.run
    async def run(self, params: DownloadQueueInput) -> dict[str, Any]:
        done = 0
        self._show()
        while True:
            if not self._pending:
                try:
                    await workflow.wait_condition(
                        lambda: bool(self._pending), timeout=params.options.idle_seconds
                    )
                except TimeoutError:
                    # A signal that raced the timer is in this same activation: look again.
                    if not self._pending:
                        break
                continue
            info = workflow.info()
            if done >= params.options.jobs_per_run or info.is_continue_as_new_suggested():
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(
                    DownloadQueueInput(
                        tenant_id=params.tenant_id,
                        backend_id=params.backend_id,
                        options=params.options,
                        pending=self._pending,
                        finished=self._finished,
                    )
                )
            await self._pull(self._pending.pop(0))
            done += 1
        await workflow.wait_condition(workflow.all_handlers_finished)
        # The result keeps the finished jobs readable after the queue went idle and completed.
        return self._state()

    async def _pull(self, job: DownloadJob) -> None:
        opts = self._params.options
        self._current = job
        self._started_at = _now()
        self._cancelling = False
        self._show()
        self._activity = workflow.start_activity(
            OLLAMA_PULL,
            PullInput(
                tenant_id=self._params.tenant_id,
                backend_id=self._params.backend_id,
                model=job.model,
                job_id=job.id,
            ),
            result_type=PullResult,
            start_to_close_timeout=timedelta(seconds=opts.pull_timeout),
            schedule_to_close_timeout=timedelta(seconds=opts.give_up_after),
            heartbeat_timeout=timedelta(seconds=opts.heartbeat_timeout),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1),
                maximum_interval=timedelta(seconds=opts.retry_max_interval),
                non_retryable_error_types=[PULL_FAILED],
            ),
            # The queue moves on only once the pull really stopped: never two at a time.
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            summary=f"pull {job.model}",
        )
        try:
            result = await self._activity
            self._finish(
                job,
                "success",
                digest=result.digest,
                total=result.total,
                completed=result.completed,
            )
        except ActivityError as err:
            if isinstance(err.cause, CancelledError):
                self._finish(job, "cancelled", error="cancelled while downloading")
                self._reraise_workflow_cancel()
            else:
                self._finish(job, "failed", error=failure_message(err))
        except asyncio.CancelledError:
            # The pull finished in the same moment it was cancelled: it counts as cancelled.
            self._finish(job, "cancelled", error="cancelled while downloading")
            self._reraise_workflow_cancel()
        finally:
            self._current = None
            self._activity = None
            self._show()

    def _reraise_workflow_cancel(self) -> None:
        if self._cancelling:
            return
        # Not our signal: the workflow itself was cancelled (Temporal UI, CLI). Everything
        # queued goes with it.
        for job in self._pending:
            self._finish(job, "cancelled", error="the download queue was cancelled")
        self._pending = []
        raise asyncio.CancelledError()

    def _known(self, model: str) -> bool:
        if self._current and same_model(self._current.model, model):
            return True
        return any(same_model(job.model, model) for job in self._pending)

    def _finish(self, job: DownloadJob, status: str, **extra: Any) -> None:
        self._finished.append(
            FinishedJob(
                id=job.id,
                model=job.model,
                status=status,
                created_at=job.created_at,
                finished_at=_now(),
                **extra,
            )
        )
        extra_jobs = len(self._finished) - max(self._params.options.keep_finished, 1)
        if extra_jobs > 0:
            del self._finished[:extra_jobs]

    def _state(self) -> dict[str, Any]:
        current = self._current
        return {
            "tenantId": self._params.tenant_id,
            "backendId": self._params.backend_id,
            "inProgress": {
                "id": current.id,
                "model": current.model,
                # Progress lives in the activity's heartbeats; the API merges it in.
                "status": "downloading",
                "digest": "",
                "completed": 0,
                "total": 0,
                "createdAt": current.created_at,
                "startedAt": self._started_at,
            }
            if current
            else None,
            "pending": [
                {"id": job.id, "model": job.model, "createdAt": job.created_at}
                for job in self._pending
            ],
            "finished": [
                {
                    "id": job.id,
                    "model": job.model,
                    "status": job.status,
                    "error": job.error,
                    "digest": job.digest,
                    "total": job.total,
                    "completed": job.completed,
                    "createdAt": job.created_at,
                    "finishedAt": job.finished_at,
                }
                for job in self._finished
            ],
        }

    def _show(self) -> None:
        """What the Temporal UI shows for this workflow (its current details)."""
        lines: list[str] = []
        if self._current:
            lines.append(f"**pulling** `{self._current.model}` since {self._started_at}")
        else:
            lines.append("idle")
        if self._pending:
            names = ", ".join(f"`{job.model}`" for job in self._pending[:10])
            more = f" and {len(self._pending) - 10} more" if len(self._pending) > 10 else ""
            lines.append(f"**queued** {names}{more}")
        if self._finished:
            last = self._finished[-1]
            lines.append(f"**last** `{last.model}`: {last.status} {last.error}".rstrip())
        workflow.set_current_details("\n\n".join(lines))
