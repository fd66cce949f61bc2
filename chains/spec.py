"""The chain language: one pydantic model, the source of truth for YAML/JSON chains.

Field names follow seed 003 (contenox ``taskengine``) so a chain written for contenox loads
unchanged. Lists that contenox documents as JSON-encoded strings (``hooks``, ``models``, ...)
are accepted both as real lists and as such strings.
"""

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

TERM_END = "end"
DEFAULT_MAX_STEPS = 100

# Handlers that call a model (their work is an activity); the rest are deterministic.
LLM_PROMPT_HANDLERS = frozenset(
    {
        "prompt_to_string",
        "prompt_to_condition",
        "prompt_to_int",
        "prompt_to_float",
        "prompt_to_range",
        "condition_key",
        "parse_number",
        "parse_score",
        "parse_range",
        "raw_string",
    }
)
CHAT_HANDLERS = frozenset({"chat_completion", "model_execution"})
EMBED_HANDLERS = frozenset({"text_to_embedding", "embedding"})
DETERMINISTIC_HANDLERS = frozenset(
    {
        "noop",
        "raise_error",
        "parse_command",
        "parse_key_value",
        "convert_to_openai_chat_response",
    }
)
TOOL_HANDLERS = frozenset({"hook", "execute_tool_calls", "js"})
SIGNAL_HANDLERS = frozenset({"approval"})
HANDLERS = (
    LLM_PROMPT_HANDLERS
    | CHAT_HANDLERS
    | EMBED_HANDLERS
    | DETERMINISTIC_HANDLERS
    | TOOL_HANDLERS
    | SIGNAL_HANDLERS
)

# Older contenox handler names and the handler they behave as.
HANDLER_ALIASES = {
    "condition_key": "prompt_to_condition",
    "parse_number": "prompt_to_int",
    "parse_score": "prompt_to_float",
    "parse_range": "prompt_to_range",
    "raw_string": "prompt_to_string",
    "embedding": "text_to_embedding",
    "model_execution": "chat_completion",
}

Operator = Literal[
    "equals", "contains", "starts_with", "ends_with", "gt", "lt", "in_range", "default"
]
ComposeStrategy = Literal["override", "merge_chat_histories", "append_string_to_chat_history"]


def canonical_handler(name: str) -> str:
    return HANDLER_ALIASES.get(name, name)


def _json_string_list(value: Any) -> Any:
    """contenox documents list fields as JSON-encoded strings; accept both forms."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                return value
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def _json_object(value: Any) -> Any:
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


class _Spec(BaseModel):
    # Unknown keys are errors: a typo in a chain file must not be silently ignored.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ExecuteConfig(_Spec):
    model: str = Field("", description="Preferred model name (e.g. 'mistral:instruct').")
    models: list[str] = Field(
        default_factory=list, description="Fallback models, tried in order after `model`."
    )
    provider: str = Field("", description="Restrict routing to backends of this type.")
    providers: list[str] = Field(default_factory=list, description="Allowed backend types.")
    temperature: float | None = Field(None, ge=0, le=2)
    hooks: list[str] = Field(default_factory=list, description="Hooks whose tools are offered.")
    hide_tools: list[str] = Field(default_factory=list, description="Tools not to offer.")
    pass_clients_tools: bool = False

    _lists = field_validator("models", "providers", "hooks", "hide_tools", mode="before")(
        _json_string_list
    )


class HookCall(_Spec):
    name: str = Field(..., min_length=1, description="Registered hook (or JS function) name.")
    tool_name: str = ""
    args: dict[str, Any] = Field(default_factory=dict)

    _args = field_validator("args", mode="before")(_json_object)


class TransitionBranch(_Spec):
    operator: Operator = "equals"
    when: str = ""
    goto: str = Field("", description="Target task id; empty or 'end' ends the chain.")

    @field_validator("when", mode="before")
    @classmethod
    def _when_as_text(cls, value: Any) -> Any:
        # YAML turns `when: true` or `when: 5` into bool/int; branches compare text.
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return str(value)
        return value


class TaskTransition(_Spec):
    on_failure: str = Field("", description="Task to jump to when this task fails.")
    branches: list[TransitionBranch] = Field(default_factory=list)

    @field_validator("branches", mode="before")
    @classmethod
    def _single_branch(cls, value: Any) -> Any:
        # The seed's examples show `branches` as a single object.
        return [value] if isinstance(value, dict) else value


class ComposeTask(_Spec):
    with_var: str = ""
    strategy: ComposeStrategy | None = None


class TaskDefinition(_Spec):
    id: str = Field(..., min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$")
    description: str = ""
    handler: str = Field(..., min_length=1)
    system_instruction: str = ""
    valid_conditions: dict[str, bool] = Field(default_factory=dict)
    execute_config: ExecuteConfig | None = None
    hook: HookCall | None = None
    prompt_template: str = ""
    output_template: str = ""
    print: str = ""
    input_var: str = ""
    transition: TaskTransition = Field(default_factory=TaskTransition)
    compose: ComposeTask | None = None
    timeout: str = Field(
        "", pattern=r"^$|^(\d+(\.\d+)?(ns|us|ms|s|m|h))+$", description="Go duration, e.g. 30s."
    )
    retry_on_failure: int = Field(0, ge=0, le=100)

    _conditions = field_validator("valid_conditions", mode="before")(_json_object)


class ChainDefinition(_Spec):
    id: str = Field(..., min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    description: str = ""
    debug: bool = False
    token_limit: int = Field(0, ge=0)
    max_steps: int = Field(
        DEFAULT_MAX_STEPS, ge=1, le=100_000, description="A run fails after this many steps."
    )
    tasks: list[TaskDefinition] = Field(..., min_length=1)

    def task(self, task_id: str) -> TaskDefinition | None:
        for task in self.tasks:
            if task.id == task_id:
                return task
        return None


def parse_duration(text: str) -> float | None:
    """Go-style duration ("1m30s", "250ms") to seconds; None for empty."""
    if not text:
        return None
    units = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    total = 0.0
    number = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = text[i : i + 2] if text[i : i + 2] in units else ch
        if unit not in units or not number:
            raise ValueError(f"invalid duration {text!r}")
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    if number:
        raise ValueError(f"invalid duration {text!r}: missing unit")
    return total
