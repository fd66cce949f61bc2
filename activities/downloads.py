"""The pull activity: stream Ollama's /api/pull and heartbeat its progress.

The heartbeat details are the progress (model, status, digest, completed, total): the Temporal
UI shows them on the pending activity, the API reads them back for /queue/inProgress, and a
retry on another worker (the first one was killed) starts by reporting them again. The retry
simply pulls again: Ollama keeps partial blobs and resumes them on the server side.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import ollama
from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.backends.providers import ProviderError, classify, ollama_client
from core.backends.refs import to_ref
from core.backends.transport import backend_allowlist
from core.db import Database
from core.models import BackendRow
from core.outbound import Allowlist
from workflows.contracts import OLLAMA_PULL, PULL_FAILED
from workflows.download_types import PullInput, PullResult, progress_details

# How often progress is reported even when Ollama says nothing (e.g. while verifying a large
# blob), so a cancel request is picked up and a live worker is never taken for dead.
BEAT_SECONDS = 0.5
# Ollama's words for a pull that can never succeed: retrying cannot help.
PERMANENT_HINTS = (
    "file does not exist",
    "manifest unknown",
    "invalid model name",
    "model not found",
    "pull model manifest: 4",
)
# A pull is one long response; only a connection that stays silent this long is broken.
READ_TIMEOUT = 600.0


class DownloadActivities:
    def __init__(self, db: Database, allowlist: "str | Allowlist | None" = None) -> None:
        self._db = db
        # Pulls reach the backend under the outbound policy, like every model call.
        self._allowlist = backend_allowlist(allowlist)

    def _backend(self, req: PullInput) -> BackendRow:
        with self._db.session() as session:
            row = session.get(BackendRow, req.backend_id)
        if row is None or row.tenant_id != req.tenant_id:
            raise ApplicationError(
                f"backend {req.backend_id} no longer exists", type=PULL_FAILED, non_retryable=True
            )
        if row.type != "ollama":
            raise ApplicationError(
                f"backend {row.name} is of type {row.type}: only ollama backends pull models",
                type=PULL_FAILED,
                non_retryable=True,
            )
        return row

    @activity.defn(name=OLLAMA_PULL)
    async def pull(self, req: PullInput) -> PullResult:
        info = activity.info()
        # Looked up at run time: a backend's address (and any secret) never enters history.
        row = await asyncio.to_thread(self._backend, req)
        progress: dict[str, Any] = progress_details(req.job_id, req.model, "starting")
        if info.attempt > 1 and info.heartbeat_details:
            last = info.heartbeat_details[0]
            if isinstance(last, dict):
                progress.update(last, status=f"resuming after: {last.get('status', '')}")
                activity.logger.info(
                    "resuming pull of %s on %s at %s/%s bytes (attempt %d)",
                    req.model,
                    row.name,
                    last.get("completed"),
                    last.get("total"),
                    info.attempt,
                )
        activity.heartbeat(progress)

        async def beat() -> None:
            while True:
                await asyncio.sleep(BEAT_SECONDS)
                activity.heartbeat(dict(progress))

        client = ollama_client(
            row.base_url, httpx.Timeout(30.0, read=READ_TIMEOUT), self._allowlist
        )
        layers: dict[str, tuple[int, int]] = {}
        beater = asyncio.create_task(beat())
        try:
            stream: AsyncIterator[ollama.ProgressResponse] = await client.pull(
                req.model, stream=True
            )
            # Closing the stream on cancel drops the connection, which stops Ollama's pull.
            async with contextlib.aclosing(stream) as lines:  # type: ignore[type-var]
                async for line in lines:
                    status = line.status or ""
                    progress.update(status=status)
                    if line.digest:
                        progress.update(
                            digest=line.digest,
                            completed=line.completed or 0,
                            total=line.total or 0,
                        )
                        layers[line.digest] = (line.completed or 0, line.total or 0)
                    activity.heartbeat(dict(progress))
                    if status == "success":
                        return PullResult(
                            model=req.model,
                            status="success",
                            digest=str(progress["digest"]),
                            completed=sum(c for c, _ in layers.values()),
                            total=sum(t for _, t in layers.values()),
                        )
        except Exception as err:
            # The upstream text stays out of history (anyone who reads the queue sees that).
            raise _failure(err, row, req.model) from None
        finally:
            beater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beater
            await client.close()
        raise ApplicationError(
            f"backend {row.name}: the pull of {req.model} ended before Ollama said success",
            type="PullInterrupted",
        )


def _failure(err: Exception, row: BackendRow, model: str) -> ApplicationError:
    """The pull's error for the queue: the backend's own words only when they are one of
    Ollama's known answers for a model that cannot be pulled (docs/backends.md)."""
    error = classify(err, to_ref(row))
    text = str(error)
    activity.logger.warning("pull of %s on %s failed: %s", model, row.name, text)
    lowered = text.lower()
    hint = next((h for h in PERMANENT_HINTS if h in lowered), None)
    permanent = hint is not None or (
        isinstance(error, ProviderError)
        and error.status is not None
        and 400 <= error.status < 500
        and error.status not in (408, 425, 429)
    )
    if permanent:
        why = hint or error.public  # one of Ollama's known answers, or "unreachable"
        return ApplicationError(f"cannot pull {model}: {why}", type=PULL_FAILED, non_retryable=True)
    return ApplicationError(f"pull of {model} interrupted: {error.public}", type="PullInterrupted")
