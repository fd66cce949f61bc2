"""Request and response bodies of POST /tasks and the /runs routes.

One model per shape, used for both the OpenAPI document and the body the route sends, so a
generated client gets the fields the API really answers with. Field names follow seed 003
(execapi_taskExecutionRequest, execapi_taskExecutionResponse, taskengine_CapturedStateUnit).
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation

from api.errors import ErrorBody
from api.schemas import Camel, Timestamp, absent_when_none
from chains.spec import ChainDefinition

RunStatus = Literal["running", "waiting", "completed", "failed", "cancelled"]

# --------------------------------------------------------------------------- requests


class TaskExecutionRequest(Camel):
    """seed 003 execapi_taskExecutionRequest, plus `chainId` to run a stored chain."""

    # Documented as a chain definition but checked by the chain loader (api/chain_validation),
    # whose 422 names every problem by JSON pointer and lints gotos as well.
    chain: SkipValidation[ChainDefinition | None] = Field(
        None, description="An inline chain definition (send this or `chainId`)."
    )
    chain_id: str | None = Field(None, description="Id of a stored chain (POST /taskchains).")
    input: Any = Field(None, description="The chain's input: text, a chat history or any JSON.")
    input_type: str = Field("string", description="What the input is, e.g. string or chat_history.")


class ApprovalRequest(Camel):
    approved: bool = True
    comment: str = ""
    payload: Any = Field(None, description="Anything the approval task should hand on.")


# --------------------------------------------------------------------------- state units


class TaskError(BaseModel):
    """seed 003 taskengine_ErrorResponse: empty when the task succeeded."""

    error: str


class StoredValue(BaseModel):
    """A value too large to show inline (past CHAINLOOM_RUN_VIEW_MAX_BYTES): read it from
    `href` (GET /runs/{id}/values/{seq}). docs/chains.md, "Long and large chains"."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    stored: dict[str, Any] = Field(
        alias="$stored", description="workflow, seq, bytes and type of the stored value."
    )
    href: str | None = Field(None, exclude_if=lambda v: v is None)


class CapturedStateUnit(BaseModel):
    """seed 003 taskengine_CapturedStateUnit: what one task did in a run."""

    # Later versions may record more per task; a client keeps what it does not know.
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    task_id: str = Field(alias="taskID")
    task_handler: str = Field(alias="taskHandler")
    input_var: str = Field(alias="inputVar", description="Which variable was used as input.")
    input: str | StoredValue
    input_type: str = Field(alias="inputType")
    output: Any
    output_type: str = Field(alias="outputType")
    transition: str | StoredValue
    duration: int = Field(description="In nanoseconds.")
    error: TaskError
    attempt: int | None = absent_when_none("Which try of retry_on_failure this was (from 1).")
    started_at: str | None = Field(
        None, alias="startedAt", description="RFC 3339.", exclude_if=lambda v: v is None
    )
    model: str | None = absent_when_none("The model that answered (model tasks).")
    backend: str | None = absent_when_none("The backend that answered (model tasks).")
    input_tokens: int | None = Field(None, alias="inputTokens", exclude_if=lambda v: v is None)
    output_tokens: int | None = Field(None, alias="outputTokens", exclude_if=lambda v: v is None)
    failed_over: list[str] | None = Field(
        None,
        alias="failedOver",
        description="Backends tried first that failed.",
        exclude_if=lambda v: v is None,
    )
    print_: str | None = Field(
        None, alias="print", description="The rendered `print`.", exclude_if=lambda v: v is None
    )
    logs: list[str] | None = absent_when_none("console output of a js task.")
    debug: dict[str, Any] | None = absent_when_none(
        "With `debug: true`: the rendered messages and the raw answer."
    )


# --------------------------------------------------------------------------- responses


class TaskExecutionResponse(Camel):
    """seed 003 execapi_taskExecutionResponse, plus the run id."""

    id: str
    output: Any
    output_type: str
    state: list[CapturedStateUnit]


class RunCreated(Camel):
    """A run that was started: poll GET /runs/{id}."""

    id: str
    workflow_id: str
    status: Literal["running"] = "running"


class TaskChainFailure(ErrorBody):
    """A 422: the request was invalid, or (with `id`, `workflowId` and `state`) the chain ran
    and failed or was cancelled."""

    model_config = ConfigDict(populate_by_name=True)

    id: str | None = Field(None, description="The failed run.", exclude_if=lambda v: v is None)
    workflow_id: str | None = Field(None, alias="workflowId", exclude_if=lambda v: v is None)
    state: list[CapturedStateUnit] | None = Field(
        None, description="The tasks that ran.", exclude_if=lambda v: v is None
    )


class ApprovalConflict(ErrorBody):
    """A 409 from POST /runs/{id}/approve: `run_not_waiting` (then `currentTask` names the
    task the run is on, null before its first task) or `run_not_running`."""

    model_config = ConfigDict(populate_by_name=True)

    current_task: str | None = Field(None, alias="currentTask")


class RunSummary(Camel):
    id: str
    workflow_id: str
    chain_id: str
    status: RunStatus
    created_at: Timestamp


class RunView(RunSummary):
    output: Any = None
    output_type: str | None = None
    state: list[CapturedStateUnit] = []
    error: str | None = None
    current_task: str | None = Field(None, description="The task the run is on, while it runs.")


class ApprovalResult(Camel):
    """The decision the run's approval task received."""

    id: str = Field(description="The run.")
    task_id: str = Field(description="The approval task that received the decision.")
    approved: bool
    comment: str
    payload: Any
    by: str = Field(description="Who decided (the API key or user id).")


class RunCancelled(Camel):
    id: str
    # "cancelled" once the run stopped (a run whose workflow task kept failing is terminated),
    # "cancelling" while it still winds down, else how it finished in the meantime.
    status: Literal["cancelled", "cancelling", "completed", "failed"] = "cancelling"
