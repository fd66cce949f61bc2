"""ChainWorkflow control flow: transitions, failures and retries, compose and templates,
state and replay (see tests/chain_harness.py for the set-up; approvals have their own file,
tests/test_workflow_approval.py)."""

from typing import Any

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from tests.chain_harness import (
    OPTIONS,
    RUN_TIMEOUT,
    RUNNER,
    SENTIMENT,
    MockLLM,
    chain,
    fail_chain,
    goto,
    new_id,
    run_chain,
    run_input,
    running_worker,
    task,
    units,
)
from workflows.chain import ChainWorkflow

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
