"""ChainWorkflow handlers: prompts, chat, embeddings and the deterministic ones (see
tests/chain_harness.py for the set-up)."""

from typing import Any

import pytest
from temporalio.testing import WorkflowEnvironment

from tests.chain_harness import (
    SENTIMENT,
    MockLLM,
    chain,
    fail_chain,
    goto,
    new_id,
    run_chain,
    task,
    units,
)
from workflows.types import (
    LLMResult,
)

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
    assert "debug" not in unit


async def test_debug_records_what_the_model_was_asked(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Rate": " 7 "})
    definition = chain(
        task("rate", "prompt_to_int", prompt_template="Rate {{ input }} from 1 to 10"),
        debug=True,
    )
    result = await run_chain(env, definition, "the film", llm)
    assert result["output"] == 7
    assert result["state"][0]["debug"] == {
        "messages": [{"role": "user", "content": "Rate the film from 1 to 10"}],
        "answer": " 7 ",
    }


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
