"""Arguments and results that cross the workflow/activity boundary.

Plain dataclasses without postponed annotations: Temporal decodes them on every activity
result, and string annotations would be re-evaluated each time.
"""

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunOptions:
    """Settings fixed when a run starts, so workflow code never reads the environment."""

    llm_max_attempts: int = 5
    llm_timeout: float = 300.0
    llm_heartbeat_timeout: float = 20.0
    # Limits on templates, task outputs and the run's result (docs/chains.md, "Limits").
    template_max_output_bytes: int = 512 * 1024
    template_max_operations: int = 100_000
    task_output_max_bytes: int = 512 * 1024
    run_result_max_bytes: int = 2_000_000
    # Long and large chains (docs/chains.md): a run continues as new after this many steps;
    # values over value_limit bytes of JSON live in the run's records, not in history; a js
    # task may hand back a stored result of up to output_max_bytes.
    steps_per_run: int = 1000
    value_limit: int = 64 * 1024
    output_max_bytes: int = 16 << 20
    # The defaults of fields added later are what runs started before them did, so a run
    # recorded then still issues the same commands: no heartbeat timeout on hook and JS
    # calls, a 1 s first retry interval.
    tool_heartbeat_timeout: float = 0.0
    retry_initial_interval: float = 1.0


@dataclass
class ChainResume:
    """What a chain run hands to the run it continues as: where it stood, and nothing large
    (values over the limit travel as handles, finished state units are in the records)."""

    task: str
    variables: dict[str, Any]
    previous: Any
    steps: int
    # State units 0..stored-1 are in the run's records; the last record number used.
    stored: int
    seq: int
    # Approval decisions received and not used yet (ApprovalDecision fields).
    decisions: list[dict[str, Any]] = field(default_factory=list)
    runs: int = 1
    # `previous` is this variable's value (not carried twice).
    previous_var: str = ""


@dataclass
class ChainRunInput:
    chain: dict[str, Any]
    input: Any = None
    input_type: str = "string"
    tenant_id: str = "default"
    options: RunOptions = field(default_factory=RunOptions)
    resume: ChainResume | None = None


@dataclass
class StoreAs:
    """Lets an activity keep its own result out of history: a result of more than `above`
    bytes of JSON is written as the run's value record `seq`, and its handle returned."""

    seq: int
    above: int
    max_bytes: int = 0


@dataclass
class ModelChoice:
    """What execute_config says about which model and backend may serve a call."""

    model: str = ""
    models: list[str] = field(default_factory=list)
    provider: str = ""
    providers: list[str] = field(default_factory=list)


@dataclass
class ToolSpec:
    """One tool as offered to a model. `name` is "hook.tool"; the LLM activity maps it to a
    wire-safe name and back, so histories keep the readable form."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass
class LLMRequest:
    tenant_id: str
    workflow_id: str
    task_id: str
    choice: ModelChoice
    messages: list[dict[str, Any]]
    temperature: float | None = None
    token_limit: int = 0
    tools: list[ToolSpec] = field(default_factory=list)


@dataclass
class LLMResult:
    content: str
    model: str
    backend: str
    input_tokens: int = 0
    output_tokens: int = 0
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    # Backends tried first that failed transiently within this attempt.
    failed_over: list[str] = field(default_factory=list)


@dataclass
class EmbedRequest:
    tenant_id: str
    workflow_id: str
    task_id: str
    choice: ModelChoice
    text: str


@dataclass
class EmbedResult:
    vector: list[float]
    model: str
    backend: str
    failed_over: list[str] = field(default_factory=list)
    tokens: int = 0


@dataclass
class ApprovalDecision:
    approved: bool
    comment: str = ""
    payload: Any = None
    by: str = ""


@dataclass
class ApprovalAccepted:
    """What the approve update answers: the decision and the approval task it went to."""

    task_id: str
    approved: bool
    comment: str = ""
    payload: Any = None
    by: str = ""


@dataclass
class ToolsRequest:
    """Which hooks' tools to offer a model (execute_config.hooks minus hide_tools)."""

    tenant_id: str
    hooks: list[str]
    hide_tools: list[str] = field(default_factory=list)


@dataclass
class ToolCallRequest:
    tenant_id: str
    workflow_id: str
    task_id: str
    hook: str
    tool: str
    args: dict[str, Any]
    # Stable across retries of this call, sent as Idempotency-Key so a retry is safe.
    idempotency_key: str
    store: StoreAs | None = None


@dataclass
class ToolCallResult:
    output: Any
    status: int = 200


@dataclass
class StoredRecord:
    """One row of a run's records: a state unit or a value (or a part of its JSON text)."""

    kind: str
    seq: int
    data: Any = None
    text: str = ""
    part: int = 0


@dataclass
class StoreRequest:
    tenant_id: str
    workflow_id: str
    records: list[StoredRecord]


@dataclass
class LoadRequest:
    """Read stored values (handles or placeholders) back, at most max_bytes in all."""

    tenant_id: str
    refs: list[dict[str, Any]]
    max_bytes: int


@dataclass
class FunctionRunInput:
    """Run a stored JS function: from a chain's `js` task, a trigger, or the API."""

    tenant_id: str
    function: str
    input: Any = None
    # How many trigger hops led here; dispatch stops at a limit so self-triggering loops end.
    depth: int = 0
    trigger: str = ""
    workflow_id: str = ""
    store: StoreAs | None = None


@dataclass
class FunctionRunResult:
    result: Any = None
    logs: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
