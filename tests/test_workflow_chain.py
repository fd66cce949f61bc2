"""ChainWorkflow on a real Temporal dev server, with the LLM activities mocked by name.

Every test gets its own task queue and worker; the mocks answer from the last message of each
request and record every call, so tests can check both what the chain produced and what it
asked the model.
"""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from core.devserver import temporal_binary
from worker import PASSTHROUGH
from workflows.chain import ChainWorkflow
from workflows.types import (
    ApprovalDecision,
    ChainRunInput,
    EmbedRequest,
    EmbedResult,
    LLMRequest,
    LLMResult,
    RunOptions,
)

RUNNER = SandboxedWorkflowRunner(
    restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
)
OPTIONS = RunOptions(llm_max_attempts=2, llm_heartbeat_timeout=5)
RUN_TIMEOUT = timedelta(seconds=30)

Reply = str | LLMResult | Exception | Callable[[LLMRequest], str]


@pytest.fixture(scope="module")
async def env() -> AsyncIterator[WorkflowEnvironment]:
    args: list[str] = []
    for key in (
        "history.transferProcessorMaxPollRPS",
        "history.timerProcessorMaxPollRPS",
        "history.visibilityProcessorMaxPollRPS",
    ):
        args += ["--dynamic-config-value", f"{key}=10000"]
    for name in ("ChainId", "TenantId", "RunKind"):
        args += ["--search-attribute", f"{name}=Keyword"]
    environment = await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(), dev_server_extra_args=args
    )
    yield environment
    await environment.shutdown()


class MockLLM:
    """Answers `llm_chat` by the first rule whose needle is in the last message.

    A rule's reply is a string, a whole LLMResult, an exception to raise, a function of the
    request, or a list of those consumed one per call (the last one repeats).
    """

    def __init__(self, rules: dict[str, Reply | list[Reply]] | None = None, default: str = "ok"):
        self.rules = {
            needle: list(r) if isinstance(r, list) else [r] for needle, r in (rules or {}).items()
        }
        self.default = default
        self.requests: list[LLMRequest] = []
        self.embeds: list[EmbedRequest] = []

    def _reply(self, request: LLMRequest) -> str | LLMResult:
        last = str(request.messages[-1].get("content") or "") if request.messages else ""
        reply: Reply = self.default
        for needle, replies in self.rules.items():
            if needle in last:
                reply = replies.pop(0) if len(replies) > 1 else replies[0]
                break
        if isinstance(reply, Exception):
            raise reply
        return reply(request) if callable(reply) else reply

    def activities(self) -> list[Callable[..., Any]]:
        @activity.defn(name="llm_chat")
        async def llm_chat(request: LLMRequest) -> LLMResult:
            self.requests.append(request)
            content = self._reply(request)
            if isinstance(content, LLMResult):
                return content
            return LLMResult(
                content=content,
                model="mock-model",
                backend="mock-backend",
                input_tokens=10 * len(request.messages),
                output_tokens=len(content.split()),
            )

        @activity.defn(name="llm_embed")
        async def llm_embed(request: EmbedRequest) -> EmbedResult:
            self.embeds.append(request)
            return EmbedResult(
                vector=[float(len(request.text)), 0.5, -1.0],
                model="mock-embed",
                backend="mock-embed-backend",
            )

        return [llm_chat, llm_embed]

    def prompts(self) -> list[str]:
        return [str(r.messages[-1]["content"]) for r in self.requests]


def task(task_id: str, handler: str, **fields: Any) -> dict[str, Any]:
    return {"id": task_id, "handler": handler, **fields}


def goto(target: str, operator: str = "default", when: str = "") -> dict[str, Any]:
    return {"branches": [{"operator": operator, "when": when, "goto": target}]}


def chain(*tasks: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"id": "test-chain", "tasks": list(tasks), **fields}


def run_input(definition: dict[str, Any], value: Any, tenant_id: str = "default") -> ChainRunInput:
    return ChainRunInput(chain=definition, input=value, tenant_id=tenant_id, options=OPTIONS)


def new_id() -> str:
    return f"chain-test-{uuid.uuid4().hex}"


@contextlib.asynccontextmanager
async def running_worker(env: WorkflowEnvironment, llm: MockLLM) -> AsyncIterator[str]:
    queue = f"chain-tests-{uuid.uuid4().hex}"
    async with Worker(
        env.client,
        task_queue=queue,
        workflows=[ChainWorkflow],
        activities=llm.activities(),
        workflow_runner=RUNNER,
    ):
        yield queue


async def run_chain(
    env: WorkflowEnvironment,
    definition: dict[str, Any],
    value: Any = None,
    llm: MockLLM | None = None,
    tenant_id: str = "default",
    workflow_id: str | None = None,
) -> dict[str, Any]:
    async with running_worker(env, llm or MockLLM()) as queue:
        result: dict[str, Any] = await env.client.execute_workflow(
            "ChainWorkflow",
            run_input(definition, value, tenant_id),
            id=workflow_id or new_id(),
            task_queue=queue,
            execution_timeout=RUN_TIMEOUT,
            result_type=dict,
        )
    return result


async def fail_chain(
    env: WorkflowEnvironment,
    definition: dict[str, Any],
    value: Any = None,
    llm: MockLLM | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """Run a chain that must fail; return the ChainFailed message and the state so far."""
    with pytest.raises(WorkflowFailureError) as info:
        await run_chain(env, definition, value, llm)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError), cause
    assert cause.type == "ChainFailed"
    assert cause.non_retryable
    return cause.message, cause.details[0]["state"]


def units(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {unit["taskID"]: unit for unit in result["state"]}


async def wait_for_status(handle: WorkflowHandle[Any, Any], status: str) -> dict[str, Any]:
    for _ in range(200):
        progress: dict[str, Any] = await handle.query("progress", result_type=dict)
        if progress["status"] == status:
            return progress
        await asyncio.sleep(0.05)
    raise AssertionError(f"workflow never reached status {status!r}")


# --- prompt handlers ---------------------------------------------------------------------


async def test_prompt_to_string(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Greet": "  Hello, Ada!  \n"})
    definition = chain(
        task(
            "greet",
            "prompt_to_string",
            system_instruction="You are terse. Audience: {{ input }}",
            prompt_template="Greet {{ input }}",
        )
    )
    result = await run_chain(env, definition, "Ada", llm)
    assert result["output"] == "Hello, Ada!"
    assert result["outputType"] == "string"
    assert llm.requests[0].messages == [
        {"role": "system", "content": "You are terse. Audience: Ada"},
        {"role": "user", "content": "Greet Ada"},
    ]
    unit = result["state"][0]
    assert unit["transition"] == "Hello, Ada!"
    assert unit["inputTokens"] == 20
    assert unit["outputTokens"] == 2


SENTIMENT = {"positive": True, "negative": False}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("positive", True),
        ("Positive.", True),
        ("`NEGATIVE`", False),
        ("Positive. The customer is happy.", True),
    ],
)
async def test_prompt_to_condition(env: WorkflowEnvironment, answer: str, expected: bool) -> None:
    llm = MockLLM({"Classify": answer})
    definition = chain(
        task(
            "mood",
            "prompt_to_condition",
            prompt_template="Classify: {{ input }}",
            valid_conditions=SENTIMENT,
            transition={
                "branches": [
                    {"operator": "equals", "when": "true", "goto": "happy"},
                    {"operator": "equals", "when": "false", "goto": "sad"},
                ]
            },
        ),
        task("happy", "noop", output_template="happy"),
        task("sad", "noop", output_template="sad"),
    )
    result = await run_chain(env, definition, "I love it", llm)
    mood = units(result)["mood"]
    assert mood["output"] is expected
    assert mood["outputType"] == "bool"
    assert mood["transition"] == ("true" if expected else "false")
    assert result["output"] == ("happy" if expected else "sad")


async def test_prompt_to_condition_invalid_answer_fails(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Classify": "maybe, hard to say"})
    definition = chain(
        task(
            "mood",
            "prompt_to_condition",
            prompt_template="Classify: {{ input }}",
            valid_conditions=SENTIMENT,
        )
    )
    message, state = await fail_chain(env, definition, "meh", llm)
    assert "'mood'" in message
    assert "not one of the valid conditions: negative, positive" in message
    assert state[0]["error"]["error"].startswith("answer 'maybe, hard to say'")
    assert state[0]["output"] == ""
    assert len(llm.requests) == 1


async def test_prompt_to_int(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Count": "There are 42 apples."})
    result = await run_chain(
        env, chain(task("n", "prompt_to_int", prompt_template="Count {{ input }}")), "apples", llm
    )
    assert result["output"] == 42
    assert result["outputType"] == "int"
    assert result["state"][0]["transition"] == "42"


async def test_prompt_to_float(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Score": "Score: 7.5 out of 10"})
    result = await run_chain(
        env, chain(task("s", "prompt_to_float", prompt_template="Score {{ input }}")), "x", llm
    )
    assert result["output"] == 7.5
    assert result["outputType"] == "float"
    assert result["state"][0]["transition"] == "7.5"


@pytest.mark.parametrize(("answer", "expected"), [("5 - 3", "3-5"), ("about 2 to 4.5", "2-4.5")])
async def test_prompt_to_range(env: WorkflowEnvironment, answer: str, expected: str) -> None:
    llm = MockLLM({"Range": answer})
    result = await run_chain(
        env, chain(task("r", "prompt_to_range", prompt_template="Range {{ input }}")), "x", llm
    )
    assert result["output"] == expected
    assert result["outputType"] == "string"


async def test_prompt_to_int_without_number_fails(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Count": "no idea"})
    message, _ = await fail_chain(
        env, chain(task("n", "prompt_to_int", prompt_template="Count")), "x", llm
    )
    assert "expected an integer" in message


@pytest.mark.parametrize(
    ("handler", "answer", "expected", "output_type"),
    [
        ("condition_key", "Yes.", True, "bool"),
        ("parse_number", "7 items", 7, "int"),
        ("parse_score", "0.25", 0.25, "float"),
        ("parse_range", "1..4", "1-4", "string"),
        ("raw_string", "  hi there ", "hi there", "string"),
    ],
)
async def test_prompt_handler_aliases(
    env: WorkflowEnvironment, handler: str, answer: str, expected: Any, output_type: str
) -> None:
    llm = MockLLM({"Q:": answer})
    definition = chain(
        task(
            "t",
            handler,
            prompt_template="Q: {{ input }}",
            valid_conditions={"yes": True, "no": False},
        )
    )
    result = await run_chain(env, definition, "x", llm)
    assert result["output"] == expected
    assert result["outputType"] == output_type
    assert result["state"][0]["taskHandler"] == handler
    assert len(llm.requests) == 1


# --- chat, embeddings, deterministic handlers ----------------------------------------------


async def test_chat_completion_from_string_then_openai_response(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"What is Temporal": "A durable execution platform."})
    definition = chain(
        task(
            "chat",
            "chat_completion",
            system_instruction="You help {{ input }} readers.",
            transition=goto("respond"),
        ),
        task("respond", "convert_to_openai_chat_response"),
    )
    workflow_id = new_id()
    result = await run_chain(env, definition, "What is Temporal?", llm, workflow_id=workflow_id)
    chat = units(result)["chat"]
    assert chat["outputType"] == "chat_history"
    assert chat["output"]["messages"] == [
        {"role": "system", "content": "You help What is Temporal? readers."},
        {"role": "user", "content": "What is Temporal?"},
        {"role": "assistant", "content": "A durable execution platform."},
    ]
    assert chat["output"]["model"] == "mock-model"
    assert chat["output"]["inputTokens"] == 20
    assert chat["output"]["outputTokens"] == 4
    assert chat["transition"] == "A durable execution platform."
    assert llm.requests[0].messages == chat["output"]["messages"][:2]

    response = result["output"]
    assert result["outputType"] == "json"
    assert response["object"] == "chat.completion"
    assert response["id"].startswith("chatcmpl-") and response["id"].endswith("-respond")
    assert isinstance(response["created"], int) and response["created"] > 0
    assert response["model"] == "mock-model"
    assert response["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "A durable execution platform."},
            "finish_reason": "stop",
        }
    ]
    assert response["usage"] == {"prompt_tokens": 20, "completion_tokens": 4, "total_tokens": 24}


async def test_chat_completion_continues_history(env: WorkflowEnvironment) -> None:
    history: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "Existing system prompt."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how are you?"},
        ],
        "inputTokens": 5,
        "outputTokens": 1,
    }
    llm = MockLLM({"how are you": "fine, thanks"})
    definition = chain(
        task("chat", "model_execution", system_instruction="Must not be added twice.")
    )
    result = await run_chain(env, definition, history, llm)
    messages = result["output"]["messages"]
    assert messages == [*history["messages"], {"role": "assistant", "content": "fine, thanks"}]
    assert llm.requests[0].messages == history["messages"]
    assert result["output"]["inputTokens"] == 5 + 40
    assert result["output"]["outputTokens"] == 1 + 2
    assert result["state"][0]["inputType"] == "chat_history"
    assert result["state"][0]["input"] == "how are you?"
    assert result["state"][0]["taskHandler"] == "model_execution"


async def test_chat_completion_tool_calls_in_openai_response(env: WorkflowEnvironment) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
    }
    reply = LLMResult(
        content="", model="tool-model", backend="b", input_tokens=3, tool_calls=[call]
    )
    llm = MockLLM({"weather": reply})
    definition = chain(
        task("chat", "chat_completion", transition=goto("respond")),
        task("respond", "convert_to_openai_chat_response"),
    )
    result = await run_chain(env, definition, "weather in Oslo?", llm)
    assert units(result)["chat"]["output"]["messages"][-1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [call],
    }
    choice = result["output"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"] == [call]
    assert result["output"]["model"] == "tool-model"


async def test_convert_to_openai_chat_response_needs_history(env: WorkflowEnvironment) -> None:
    message, _ = await fail_chain(
        env, chain(task("respond", "convert_to_openai_chat_response")), "plain text"
    )
    assert "needs a chat history" in message


@pytest.mark.parametrize("handler", ["text_to_embedding", "embedding"])
async def test_text_to_embedding(env: WorkflowEnvironment, handler: str) -> None:
    llm = MockLLM()
    definition = chain(
        task("raw", handler, transition=goto("templated")),
        task("templated", handler, input_var="input", prompt_template="doc: {{ input }}"),
    )
    result = await run_chain(env, definition, "hello world", llm, tenant_id="acme")
    raw, templated = units(result)["raw"], units(result)["templated"]
    assert raw["output"] == [11.0, 0.5, -1.0]
    assert raw["outputType"] == "vector"
    assert raw["transition"] == "ok"
    assert raw["model"] == "mock-embed"
    assert raw["backend"] == "mock-embed-backend"
    assert templated["output"] == [16.0, 0.5, -1.0]
    assert [e.text for e in llm.embeds] == ["hello world", "doc: hello world"]
    assert [e.task_id for e in llm.embeds] == ["raw", "templated"]
    assert all(e.tenant_id == "acme" for e in llm.embeds)
    assert llm.requests == []


async def test_noop_passes_input_through(env: WorkflowEnvironment) -> None:
    result = await run_chain(env, chain(task("n", "noop")), {"a": 1})
    assert result["output"] == {"a": 1}
    assert result["outputType"] == "json"
    assert result["state"][0]["transition"] == '{"a": 1}'


async def test_raise_error_on_failure_exposes_error(env: WorkflowEnvironment) -> None:
    definition = chain(
        task(
            "boom",
            "raise_error",
            prompt_template="bad thing: {{ input }}",
            transition={"on_failure": "handle", "branches": [{"goto": "never"}]},
        ),
        task("never", "noop", output_template="unreachable"),
        task("handle", "noop", output_template="handled <{{ error }}> after {{ previous_output }}"),
    )
    result = await run_chain(env, definition, "x")
    assert result["output"] == "handled <bad thing: x> after x"
    boom = units(result)["boom"]
    assert boom["error"] == {"error": "bad thing: x"}
    assert boom["transition"] == ""
    assert boom["output"] == ""
    assert [u["taskID"] for u in result["state"]] == ["boom", "handle"]


async def test_raise_error_without_on_failure_fails_chain(env: WorkflowEnvironment) -> None:
    message, state = await fail_chain(env, chain(task("boom", "raise_error")), "x")
    assert message == "task 'boom' (raise_error) failed: task 'boom' raised an error"
    assert state[0]["error"] == {"error": "task 'boom' raised an error"}


@pytest.mark.parametrize(
    ("text", "command", "args", "target"),
    [("/deploy prod  now", "deploy", ["prod", "now"], "deploy"), ("just text", "", [], "chat")],
)
async def test_parse_command(
    env: WorkflowEnvironment, text: str, command: str, args: list[str], target: str
) -> None:
    definition = chain(
        task(
            "cmd",
            "parse_command",
            transition={
                "branches": [
                    {"operator": "default", "goto": "chat"},
                    {"operator": "equals", "when": "deploy", "goto": "deploy"},
                ]
            },
        ),
        task("deploy", "noop", output_template="deploy {{ cmd.args | join(',') }}"),
        task("chat", "noop", output_template="chat {{ cmd.text }}"),
    )
    result = await run_chain(env, definition, text)
    cmd = units(result)["cmd"]
    assert cmd["output"] == {"command": command, "args": args, "text": text.strip()}
    assert cmd["transition"] == command
    assert result["state"][-1]["taskID"] == target


async def test_parse_key_value(env: WorkflowEnvironment) -> None:
    definition = chain(
        task("kv", "parse_key_value", transition=goto("show")),
        task("show", "noop", input_var="kv", output_template="{{ name }} is {{ role }}"),
    )
    result = await run_chain(env, definition, "- name = Ada\n* role: admin\n\n`team`: core")
    kv = units(result)["kv"]
    assert kv["output"] == {"name": "Ada", "role": "admin", "team": "core"}
    assert kv["outputType"] == "json"
    assert kv["transition"] == "ok"
    assert result["output"] == "Ada is admin"


async def test_parse_key_value_without_pairs_fails(env: WorkflowEnvironment) -> None:
    message, _ = await fail_chain(env, chain(task("kv", "parse_key_value")), "nothing here")
    assert "no key=value" in message


async def test_unavailable_handler_fails_clearly(env: WorkflowEnvironment) -> None:
    message, _ = await fail_chain(env, chain(task("h", "teleport")), "x")
    assert "not available" in message


# --- transitions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operator", "when", "value", "hit"),
    [
        ("equals", "Yes", " yes ", True),
        ("equals", "no", "yes", False),
        ("contains", "ERROR", "an error occurred", True),
        ("contains", "error", "all fine", False),
        ("starts_with", "ok", "OK, done", True),
        ("starts_with", "ok", "not ok", False),
        ("ends_with", "done", "all Done", True),
        ("ends_with", "done", "done already", False),
        ("gt", "5", "7", True),
        ("gt", "5", "5", False),
        ("gt", "5", "not a number", False),
        ("lt", "5", "4.5", True),
        ("lt", "5", "10", False),
        ("in_range", "1-5", "5", True),
        ("in_range", "1-5", "9", False),
        ("in_range", "1-5", "2-4", True),
        ("default", "", "anything", True),
    ],
)
async def test_operators(
    env: WorkflowEnvironment, operator: str, when: str, value: str, hit: bool
) -> None:
    branches = [{"operator": operator, "when": when, "goto": "hit"}]
    if operator != "default":
        branches.append({"operator": "default", "goto": "miss"})
    definition = chain(
        task("check", "noop", transition={"branches": branches}),
        task("hit", "noop", output_template="hit"),
        task("miss", "noop", output_template="miss"),
    )
    result = await run_chain(env, definition, value)
    assert result["output"] == ("hit" if hit else "miss")
    assert units(result)["check"]["transition"] == value


async def test_default_branch_first_is_tried_last(env: WorkflowEnvironment) -> None:
    definition = chain(
        task(
            "check",
            "noop",
            transition={
                "branches": [
                    {"operator": "default", "goto": "fallback"},
                    {"operator": "equals", "when": "special", "goto": "special"},
                ]
            },
        ),
        task("special", "noop", output_template="special"),
        task("fallback", "noop", output_template="fallback"),
    )
    assert (await run_chain(env, definition, "special"))["output"] == "special"
    assert (await run_chain(env, definition, "other"))["output"] == "fallback"


async def test_goto_end_stops_the_chain(env: WorkflowEnvironment) -> None:
    definition = chain(
        task("first", "noop", output_template="done", transition=goto("end")),
        task("second", "noop", output_template="should not run"),
    )
    result = await run_chain(env, definition, "x")
    assert result["output"] == "done"
    assert [u["taskID"] for u in result["state"]] == ["first"]


async def test_task_without_branches_ends_the_chain(env: WorkflowEnvironment) -> None:
    definition = chain(
        task("only", "noop", output_template="last"),
        task("second", "noop", output_template="should not run"),
    )
    result = await run_chain(env, definition, "x")
    assert result["output"] == "last"
    assert len(result["state"]) == 1


async def test_no_matching_branch_fails(env: WorkflowEnvironment) -> None:
    definition = chain(
        task("check", "noop", transition=goto("next", "equals", "yes")),
        task("next", "noop"),
    )
    message, state = await fail_chain(env, definition, "no")
    assert message == (
        "task 'check': no branch matches transition value 'no' and there is no default branch"
    )
    assert [u["taskID"] for u in state] == ["check"]


async def test_unknown_goto_target_fails(env: WorkflowEnvironment) -> None:
    message, _ = await fail_chain(env, chain(task("a", "noop", transition=goto("ghost"))), "x")
    assert message == "task 'a' jumps to unknown task 'ghost'"


async def test_max_steps(env: WorkflowEnvironment) -> None:
    definition = chain(task("loop", "noop", transition=goto("loop")), max_steps=5)
    message, state = await fail_chain(env, definition, "x")
    assert "max_steps=5" in message
    assert "'loop'" in message
    assert len(state) == 5


# --- failures and retries ------------------------------------------------------------------


async def test_retry_on_failure(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Classify": ["I refuse to answer", "negative"]})
    definition = chain(
        task(
            "mood",
            "prompt_to_condition",
            prompt_template="Classify {{ input }}",
            valid_conditions=SENTIMENT,
            retry_on_failure=2,
        )
    )
    result = await run_chain(env, definition, "x", llm)
    assert result["output"] is False
    unit = result["state"][0]
    assert unit["attempt"] == 2
    assert unit["error"] == {"error": ""}
    assert len(llm.requests) == 2


async def test_retry_on_failure_exhausted(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Classify": "garbage"})
    definition = chain(
        task(
            "mood",
            "prompt_to_condition",
            prompt_template="Classify {{ input }}",
            valid_conditions=SENTIMENT,
            retry_on_failure=1,
        )
    )
    message, state = await fail_chain(env, definition, "x", llm)
    assert "not one of the valid conditions" in message
    assert state[0]["attempt"] == 2
    assert len(llm.requests) == 2


async def test_on_failure_after_permanent_llm_error(env: WorkflowEnvironment) -> None:
    error = ApplicationError(
        "model refused the prompt", type="PermanentLLMError", non_retryable=True
    )
    llm = MockLLM({"Summarize": error})
    definition = chain(
        task(
            "summary",
            "prompt_to_string",
            prompt_template="Summarize {{ input }}",
            transition={"on_failure": "fallback"},
        ),
        task("fallback", "noop", output_template="fallback: {{ error }}"),
    )
    result = await run_chain(env, definition, "x", llm)
    assert result["output"] == "fallback: model refused the prompt"
    assert units(result)["summary"]["error"] == {"error": "model refused the prompt"}
    assert len(llm.requests) == 1  # non-retryable: Temporal did not retry the activity


async def test_transient_llm_error_is_retried_by_temporal(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Summarize": [RuntimeError("connection reset"), "short"]})
    definition = chain(task("summary", "prompt_to_string", prompt_template="Summarize"))
    result = await run_chain(env, definition, "x", llm)
    assert result["output"] == "short"
    assert result["state"][0]["attempt"] == 1  # the activity retried, not the task
    assert len(llm.requests) == 2


async def test_llm_error_after_max_attempts_fails_task(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Summarize": RuntimeError("backend down")})
    definition = chain(task("summary", "prompt_to_string", prompt_template="Summarize"))
    message, state = await fail_chain(env, definition, "x", llm)
    assert message == "task 'summary' (prompt_to_string) failed: backend down"
    assert state[0]["error"] == {"error": "backend down"}
    assert len(llm.requests) == OPTIONS.llm_max_attempts


async def test_template_error_fails_task(env: WorkflowEnvironment) -> None:
    llm = MockLLM()
    message, _ = await fail_chain(
        env, chain(task("p", "prompt_to_string", prompt_template="{{ missing }}")), "x", llm
    )
    assert "template error" in message
    assert "'missing' is undefined" in message
    assert llm.requests == []


# --- compose, variables, templates ---------------------------------------------------------


async def test_compose_override_merges_dicts(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Patch": "b=20\nc=30"})
    definition = chain(
        task("base", "parse_key_value", transition=goto("patch")),
        task("patch", "prompt_to_string", prompt_template="Patch", transition=goto("merged")),
        task(
            "merged",
            "parse_key_value",
            compose={"with_var": "base", "strategy": "override"},
        ),
    )
    result = await run_chain(env, definition, "a=1\nb=2", llm)
    assert result["output"] == {"a": "1", "b": "20", "c": "30"}


async def test_compose_merge_chat_histories(env: WorkflowEnvironment) -> None:
    # Task "two" reads the chain input again, so both histories start from the same text.
    llm = MockLLM({"first and second": ["reply one", "reply two"]})
    definition = chain(
        task("one", "chat_completion", transition=goto("two")),
        task(
            "two",
            "chat_completion",
            input_var="input",
            compose={"with_var": "one", "strategy": "merge_chat_histories"},
        ),
    )
    result = await run_chain(env, definition, "first and second", llm)
    assert [m["content"] for m in result["output"]["messages"]] == [
        "first and second",
        "reply two",
        "first and second",
        "reply one",
    ]
    assert result["outputType"] == "chat_history"


async def test_compose_append_string_to_chat_history(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"hello": "hi!", "Add a note": "a note"})
    definition = chain(
        task("chat", "chat_completion", transition=goto("note")),
        task(
            "note",
            "prompt_to_string",
            prompt_template="Add a note",
            compose={"with_var": "chat", "strategy": "append_string_to_chat_history"},
        ),
    )
    result = await run_chain(env, definition, "hello", llm)
    assert result["outputType"] == "chat_history"
    assert result["output"]["messages"] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi!"},
        {"role": "assistant", "content": "a note"},
    ]


async def test_compose_merge_needs_two_histories(env: WorkflowEnvironment) -> None:
    definition = chain(
        task("a", "noop", transition=goto("b")),
        task("b", "noop", compose={"with_var": "a", "strategy": "merge_chat_histories"}),
    )
    message, _ = await fail_chain(env, definition, "x")
    assert "merge_chat_histories needs two chat histories" in message


async def test_input_var(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Shout": "LOUD"})
    definition = chain(
        task(
            "shout",
            "prompt_to_string",
            prompt_template="Shout {{ input }}",
            transition=goto("orig"),
        ),
        task("orig", "noop", input_var="input", transition=goto("again")),
        task("again", "noop", input_var="shout"),
    )
    result = await run_chain(env, definition, "quiet", llm)
    by_id = units(result)
    assert by_id["orig"]["input"] == "quiet"
    assert by_id["orig"]["inputVar"] == "input"
    assert by_id["again"]["input"] == "LOUD"
    assert by_id["shout"]["inputVar"] == "previous_output"
    assert result["output"] == "LOUD"


async def test_templates_go_style_and_previous_outputs(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Name:": "Ada Lovelace", "Summary": "done"})
    definition = chain(
        task(
            "first",
            "prompt_to_string",
            prompt_template="Name: {{.input}}",
            transition=goto("second"),
        ),
        task(
            "second",
            "prompt_to_string",
            prompt_template=(
                "Summary of {{ .first }} / {{.}} / {{ previous_output }} for {{.input}}"
            ),
        ),
    )
    result = await run_chain(env, definition, "ada", llm)
    assert llm.prompts() == [
        "Name: ada",
        "Summary of Ada Lovelace / Ada Lovelace / Ada Lovelace for ada",
    ]
    assert result["output"] == "done"


async def test_print_field(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Count": "3"})
    definition = chain(
        task(
            "n",
            "prompt_to_int",
            prompt_template="Count {{ input }}",
            print="Got {{ n }} ({{ previous_output }}) for {{ input }}",
        )
    )
    result = await run_chain(env, definition, "apples", llm)
    assert result["state"][0]["print"] == "Got 3 (3) for apples"


async def test_output_template(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Score": "8"})
    definition = chain(
        task(
            "score",
            "prompt_to_int",
            prompt_template="Score {{ input }}",
            output_template="score={{ output }} for {{ input }}",
            transition=goto("high", "starts_with", "score=8"),
        ),
        task("high", "noop"),
    )
    result = await run_chain(env, definition, "essay", llm)
    score = units(result)["score"]
    assert score["output"] == "score=8 for essay"
    assert score["outputType"] == "string"
    assert score["transition"] == "score=8 for essay"
    assert result["output"] == "score=8 for essay"


# --- approval ------------------------------------------------------------------------------

APPROVAL_CHAIN = chain(
    task(
        "draft", "prompt_to_string", prompt_template="Draft {{ input }}", transition=goto("review")
    ),
    task(
        "review",
        "approval",
        timeout="1s",
        transition={
            "branches": [
                {"operator": "equals", "when": "approved", "goto": "publish"},
                {"operator": "equals", "when": "rejected", "goto": "revise"},
            ]
        },
    ),
    task("publish", "noop", input_var="draft", print="Published: {{ draft }}"),
    task("revise", "noop", output_template="revise: {{ review.reason }}"),
)


async def test_approval_signal(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Draft": "Big news"})
    definition = {**APPROVAL_CHAIN, "tasks": [dict(t) for t in APPROVAL_CHAIN["tasks"]]}
    definition["tasks"][1]["timeout"] = "20s"
    async with running_worker(env, llm) as queue:
        handle = await env.client.start_workflow(
            "ChainWorkflow",
            run_input(definition, "launch"),
            id=new_id(),
            task_queue=queue,
            execution_timeout=RUN_TIMEOUT,
        )
        progress = await wait_for_status(handle, "waiting")
        assert progress["currentTask"] == "review"
        assert [u["taskID"] for u in progress["state"]] == ["draft"]
        decision = ApprovalDecision(approved=True, comment="lgtm", payload={"n": 1}, by="alice")
        await handle.signal("approve", decision)
        result: dict[str, Any] = await handle.result()
        history = await handle.fetch_history()
    review = units(result)["review"]
    assert review["output"] == {
        "approved": True,
        "comment": "lgtm",
        "payload": {"n": 1},
        "by": "alice",
    }
    assert review["transition"] == "approved"
    assert units(result)["publish"]["print"] == "Published: Big news"
    assert result["output"] == "Big news"
    await Replayer(workflows=[ChainWorkflow], workflow_runner=RUNNER).replay_workflow(history)


async def test_approval_timeout_rejects(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Draft": "Big news"})
    result = await run_chain(env, APPROVAL_CHAIN, "launch", llm)
    review = units(result)["review"]
    assert review["output"] == {
        "approved": False,
        "comment": "",
        "payload": None,
        "reason": "timeout",
    }
    assert review["transition"] == "rejected"
    assert review["duration"] >= 1_000_000_000
    assert result["output"] == "revise: timeout"


# --- state, queries, requests, determinism -------------------------------------------------


async def test_state_unit_fields(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Classify": "positive"})
    definition = chain(
        task(
            "mood",
            "prompt_to_condition",
            prompt_template="Classify {{ input }}",
            valid_conditions=SENTIMENT,
        )
    )
    result = await run_chain(env, definition, "great", llm)
    unit = result["state"][0]
    for key in (
        "taskID",
        "taskHandler",
        "input",
        "inputType",
        "output",
        "outputType",
        "transition",
        "duration",
        "error",
        "attempt",
        "model",
        "backend",
    ):
        assert key in unit, key
    assert unit["taskID"] == "mood"
    assert unit["taskHandler"] == "prompt_to_condition"
    assert unit["input"] == "great"
    assert unit["inputType"] == "string"
    assert unit["output"] is True
    assert unit["outputType"] == "bool"
    assert unit["transition"] == "true"
    assert isinstance(unit["duration"], int) and unit["duration"] >= 0
    assert unit["error"] == {"error": ""}
    assert unit["attempt"] == 1
    assert unit["model"] == "mock-model"
    assert unit["backend"] == "mock-backend"
    assert unit["startedAt"].endswith("Z")


async def test_progress_query_after_completion(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Say": "hello"})
    definition = chain(
        task("say", "prompt_to_string", prompt_template="Say hi", transition=goto("echo")),
        task("echo", "noop"),
    )
    async with running_worker(env, llm) as queue:
        handle = await env.client.start_workflow(
            "ChainWorkflow",
            run_input(definition, "x"),
            id=new_id(),
            task_queue=queue,
            execution_timeout=RUN_TIMEOUT,
        )
        result: dict[str, Any] = await handle.result()
        progress: dict[str, Any] = await handle.query("progress")
    assert progress == {
        "status": "completed",
        "currentTask": "",
        "state": result["state"],
        "output": "hello",
    }


async def test_progress_query_after_failure(env: WorkflowEnvironment) -> None:
    async with running_worker(env, MockLLM()) as queue:
        handle = await env.client.start_workflow(
            "ChainWorkflow",
            run_input(chain(task("boom", "raise_error")), "x"),
            id=new_id(),
            task_queue=queue,
            execution_timeout=RUN_TIMEOUT,
        )
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        progress: dict[str, Any] = await handle.query("progress")
    assert progress["status"] == "failed"
    assert progress["currentTask"] == "boom"
    assert len(progress["state"]) == 1


async def test_llm_request_metadata(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Hi": "hello"})
    definition = chain(
        task(
            "ask",
            "prompt_to_string",
            prompt_template="Hi",
            execute_config={
                "model": "gpt-4o-mini",
                "models": ["llama3.2", "mistral"],
                "provider": "openai",
                "providers": '["openai", "ollama"]',
                "temperature": 0.3,
            },
            transition=goto("plain"),
        ),
        task("plain", "prompt_to_string", prompt_template="Hi again"),
        token_limit=4096,
    )
    workflow_id = new_id()
    await run_chain(env, definition, "x", llm, tenant_id="acme", workflow_id=workflow_id)
    first, second = llm.requests
    assert first.task_id == "ask"
    assert first.tenant_id == "acme"
    assert first.workflow_id == workflow_id
    assert first.choice.model == "gpt-4o-mini"
    assert first.choice.models == ["llama3.2", "mistral"]
    assert first.choice.provider == "openai"
    assert first.choice.providers == ["openai", "ollama"]
    assert first.temperature == 0.3
    assert first.token_limit == 4096
    assert second.task_id == "plain"
    assert second.choice.model == "" and second.choice.models == []
    assert second.temperature is None


async def test_replay_is_deterministic(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Classify": ["nonsense", "positive"], "Say": "hello"})
    definition = chain(
        task(
            "mood",
            "prompt_to_condition",
            prompt_template="Classify {{ input }}",
            valid_conditions=SENTIMENT,
            retry_on_failure=1,
            print="mood={{ mood }}",
            transition=goto("chat"),
        ),
        task("chat", "chat_completion", input_var="input", transition=goto("vec")),
        task("vec", "text_to_embedding", prompt_template="{{ input }}", transition=goto("kv")),
        task("kv", "parse_key_value", input_var="input", transition=goto("boom")),
        task(
            "boom",
            "raise_error",
            prompt_template="oops",
            transition={"on_failure": "respond"},
        ),
        task("respond", "convert_to_openai_chat_response", input_var="chat"),
    )
    async with running_worker(env, llm) as queue:
        handle = await env.client.start_workflow(
            "ChainWorkflow",
            run_input(definition, "Say k=v"),
            id=new_id(),
            task_queue=queue,
            execution_timeout=RUN_TIMEOUT,
        )
        result: dict[str, Any] = await handle.result()
    assert result["output"]["object"] == "chat.completion"
    assert [u["taskID"] for u in result["state"]] == [
        "mood",
        "chat",
        "vec",
        "kv",
        "boom",
        "respond",
    ]
    history = await handle.fetch_history()
    replayed = await Replayer(workflows=[ChainWorkflow], workflow_runner=RUNNER).replay_workflow(
        history
    )
    assert replayed.replay_failure is None
