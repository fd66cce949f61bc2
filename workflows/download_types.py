"""Arguments and state of model downloads, shared by the workflow, the activity and the API.

Plain dataclasses without postponed annotations, like workflows/types.py: Temporal decodes
them on every signal, query and activity result.
"""

from dataclasses import dataclass, field
from typing import Any


def download_workflow_id(backend_id: str) -> str:
    """One queue per backend: the id is what makes enqueueing through signal-with-start atomic."""
    return f"download-{backend_id}"


@dataclass
class DownloadOptions:
    """Timeouts fixed when the queue starts, so workflow code never reads the environment."""

    # A worker killed mid-pull is noticed after this long and the pull moves to another worker.
    heartbeat_timeout: float = 5.0
    # One attempt may take this long (a 70B model over a slow link takes hours).
    pull_timeout: float = 6 * 3600.0
    # Transient failures (backend down, connection lost) are retried for this long in total.
    give_up_after: float = 24 * 3600.0
    retry_max_interval: float = 60.0
    # An empty queue waits this long for new work, then the workflow completes.
    idle_seconds: float = 60.0
    # Pulls per run before continue_as_new, which keeps the history small.
    jobs_per_run: int = 100
    # Finished jobs kept in state, newest last.
    keep_finished: int = 50


@dataclass
class DownloadRequest:
    """The `enqueue` signal's argument."""

    model: str


@dataclass
class DownloadJob:
    id: str
    model: str
    created_at: str


@dataclass
class FinishedJob:
    id: str
    model: str
    status: str  # success | failed | cancelled
    created_at: str
    finished_at: str
    error: str = ""
    digest: str = ""
    total: int = 0
    completed: int = 0


@dataclass
class DownloadQueueInput:
    tenant_id: str
    backend_id: str
    options: DownloadOptions = field(default_factory=DownloadOptions)
    # Carried over by continue_as_new.
    pending: list[DownloadJob] = field(default_factory=list)
    finished: list[FinishedJob] = field(default_factory=list)


@dataclass
class PullInput:
    """What the pull activity gets: ids only, the backend's address is read at run time."""

    tenant_id: str
    backend_id: str
    model: str
    job_id: str = ""


@dataclass
class PullResult:
    model: str
    status: str
    digest: str = ""
    total: int = 0
    completed: int = 0


def progress_details(
    job_id: str, model: str, status: str, digest: str = "", completed: int = 0, total: int = 0
) -> dict[str, Any]:
    """The heartbeat details of a pull: what the API shows as live progress (and, while no
    worker answers queries, what tells which job is running)."""
    return {
        "jobId": job_id,
        "model": model,
        "status": status,
        "digest": digest,
        "completed": completed,
        "total": total,
    }
