"""The contract between workflows, activities and their callers: names, error types, search
attributes, and how a chain run is identified and started.

Workflows and activities are registered and called by name; each name is written here once so
a rename cannot leave a caller behind. Error types are what activities raise and workflows
(and retry policies) look for. Nothing here does I/O: starting a run goes through
``start_chain_workflow`` with a client the caller owns (``core.runs.start_chain_run`` is the
one door that also records the run).
"""

import uuid
from datetime import timedelta
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ApplicationError, FailureError
from temporalio.exceptions import TimeoutError as TemporalTimeoutError

# --------------------------------------------------------------------------- workflows

CHAIN_WORKFLOW = "ChainWorkflow"
FUNCTION_WORKFLOW = "FunctionWorkflow"
STATE_SYNC_WORKFLOW = "StateSyncWorkflow"
DOWNLOAD_WORKFLOW = "ModelDownloadWorkflow"

# ChainWorkflow's query and update. The update shares its name with the `approve` signal that
# older histories carry (the SDK and the server keep signal and update names apart).
PROGRESS_QUERY = "progress"
APPROVE_UPDATE = "approve"
# ModelDownloadWorkflow's signals and query.
ENQUEUE_SIGNAL = "enqueue"
CANCEL_SIGNAL = "cancel"
QUEUE_QUERY = "queue"

# --------------------------------------------------------------------------- activities

LLM_CHAT = "llm_chat"
LLM_EMBED = "llm_embed"
HOOK_TOOLS = "hook_tools"
HOOK_CALL = "hook_call"
JS_RUN = "js_run"
SYNC_BACKENDS = "sync_backends"
OLLAMA_PULL = "ollama_pull"
# A chain run's records (state units, values too large for history): write, read back.
RUN_STORE = "run_store"
RUN_LOAD = "run_load"

# --------------------------------------------------------------------------- error types

# A chain or function run that failed; its details carry the per-task state.
CHAIN_FAILED = "ChainFailed"
FUNCTION_FAILED = "FunctionFailed"
# A model call a retry cannot fix (unknown model, 4xx, prompt over the token limit).
PERMANENT_LLM_ERROR = "PermanentLLMError"
# The tenant's monthly token quota is used up.
QUOTA_EXCEEDED = "QuotaExceeded"
# No backend could serve the call right now; Temporal retries.
BACKEND_UNAVAILABLE = "BackendUnavailable"
# A hook or JS call a retry cannot fix (bad script, a limit hit, 4xx, refused address).
PERMANENT_TOOL_ERROR = "PermanentToolError"
# A hook answered 408/429/5xx or could not be reached; Temporal retries.
TOOL_UNAVAILABLE = "ToolUnavailable"
# A JS host process died under a call for a reason other than the script; retried.
JS_HOST_CRASHED = "JSHostCrashed"
# A JS call that never ran: its tenant's queue at the pool was full, or its turn did not come
# within its wall time; retried.
JS_BUSY = "JSBusy"
# A stored value that cannot be read back: missing, another tenant's, or too large to load.
STORED_VALUE_ERROR = "StoredValueError"
# A model pull that can never succeed (unknown model, backend gone): not retried.
PULL_FAILED = "ModelPullFailed"
# An approval sent to a chain run that is not waiting on an approval task; its details carry
# {"currentTask": <task id or null>}.
RUN_NOT_WAITING = "RunNotWaiting"

# --------------------------------------------------------------------------- search attributes

CHAIN_ID = SearchAttributeKey.for_keyword("ChainId")
TENANT_ID = SearchAttributeKey.for_keyword("TenantId")
RUN_KIND = SearchAttributeKey.for_keyword("RunKind")
# "waiting" while a chain run waits for an approval, "running" once it moves on (unset before
# its first approval task); lets GET /runs filter in one visibility query.
RUN_PHASE = SearchAttributeKey.for_keyword("RunPhase")

ALL_SEARCH_ATTRIBUTES = (CHAIN_ID, TENANT_ID, RUN_KIND, RUN_PHASE)


def search_attributes(tenant_id: str, kind: str, chain_id: str = "") -> TypedSearchAttributes:
    pairs: list[SearchAttributePair[Any]] = [
        SearchAttributePair(TENANT_ID, tenant_id),
        SearchAttributePair(RUN_KIND, kind),
    ]
    if chain_id:
        pairs.append(SearchAttributePair(CHAIN_ID, chain_id))
    return TypedSearchAttributes(pairs)


# --------------------------------------------------------------------------- chain runs

# The run id (what the API calls a run) travels in the workflow's memo, so a visibility
# listing names it without a database read.
RUN_ID_MEMO = "runId"


def chain_workflow_id(chain_id: str, suffix: str | None = None) -> str:
    """`chain-<chain id>-<uuid>`: readable in the Temporal UI, unique per run."""
    return f"chain-{chain_id}-{suffix or uuid.uuid4()}"


async def start_chain_workflow(
    client: Client,
    params: Any,
    *,
    workflow_id: str,
    run_id: str,
    tenant_id: str,
    chain_id: str,
    task_queue: str,
    summary: str = "",
    task_timeout: float | None = None,
) -> WorkflowHandle[Any, Any]:
    """Start ChainWorkflow with the id, search attributes and memo every chain run carries.

    `task_timeout`: how long a workflow task taken by a worker that then died stays lost
    before it is handed out again (Temporal's default is 10 s)."""
    return await client.start_workflow(
        CHAIN_WORKFLOW,
        params,
        id=workflow_id,
        task_queue=task_queue,
        task_timeout=timedelta(seconds=task_timeout) if task_timeout else None,
        search_attributes=search_attributes(tenant_id, "chain", chain_id),
        memo={RUN_ID_MEMO: run_id},
        static_summary=summary or f"chain {chain_id}",
    )


# --------------------------------------------------------------------------- failures


def failure_message(err: BaseException) -> str:
    """The most telling message of a failed activity, child or workflow: the innermost
    application error (it names the backend, hook or function and what went wrong); a timeout
    also carries the last attempt's error."""
    cause: BaseException | None = getattr(err, "cause", None) or err.__cause__
    while isinstance(cause, FailureError) and not isinstance(cause, ApplicationError):
        if isinstance(cause, TemporalTimeoutError) and isinstance(cause.cause, FailureError):
            return f"{cause.message}: {cause.cause.message}"
        if cause.cause is None:
            break
        cause = cause.cause
    if cause is None:
        return str(err)
    return getattr(cause, "message", None) or str(cause)
