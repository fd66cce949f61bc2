"""Done when: a chain whose chat_completion task has a remote hook completes a tool-calling
round trip against the scripted LLM, and the injected header reaches the service but never
the model's prompt."""

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.hook_service import (
    HookService,
    add_llm_backend,
    allowlisted_stack,
    clean,
    register,
)
from tests.scripted_llm import ScriptedLLM
from tests.stack import Stack

UNITS = "metric-units-7f3a"  # distinctive, so its absence from LLM requests means something


@pytest.fixture(scope="module")
def hooks_stack(temporal_address: str, database_url: str) -> Iterator[Stack]:
    s = allowlisted_stack(temporal_address, database_url)
    yield s
    s.close()


@pytest.fixture(scope="module")
def service() -> Iterator[HookService]:
    svc = HookService().start()
    yield svc
    svc.stop()


TOOL_LOOP = {
    "id": "weather-assistant",
    "description": "Answers with the weather service's help.",
    "tasks": [
        {
            "id": "chat",
            "handler": "chat_completion",
            "system_instruction": "You answer weather questions; use the tools.",
            "execute_config": {"model": "gpt-4o-mini", "hooks": ["weather"]},
            "transition": {
                "branches": [
                    {"operator": "equals", "when": "tool-call", "goto": "tools"},
                    {"operator": "default", "goto": "end"},
                ]
            },
        },
        {
            "id": "tools",
            "handler": "execute_tool_calls",
            "transition": {"branches": [{"operator": "default", "goto": "chat"}]},
        },
    ],
}


def chats(llm: ScriptedLLM) -> list[dict[str, Any]]:
    """The bodies of the chat requests the model received, in order."""
    return [r.body for r in llm.requests if r.path == "/v1/chat/completions"]


def last_is_tool(_: str, body: dict[str, Any]) -> bool:
    messages = body.get("messages") or []
    return bool(messages) and messages[-1].get("role") == "tool"


def test_tool_calling_round_trip_keeps_secrets_from_the_model(
    hooks_stack: Stack, llm: ScriptedLLM, service: HookService
) -> None:
    stack = clean(hooks_stack)
    service.reset()
    add_llm_backend(stack, llm.openai_base)
    register(stack, service, units=UNITS)
    llm.reply(last_is_tool, "It is 21 degrees and sunny in Paris.")
    llm.reply(
        "weather",
        tool_calls=[{"name": "weather__get_weather", "arguments": {"city": "Paris"}}],
    )

    resp = stack.http.post(
        "/tasks", json={"chain": TOOL_LOOP, "input": "What is the weather in Paris?"}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["output"]["messages"][-1] == {
        "role": "assistant",
        "content": "It is 21 degrees and sunny in Paris.",
    }
    assert [u["taskID"] for u in body["state"]] == ["chat", "tools", "chat"]
    assert [u["transition"] for u in body["state"]] == [
        "tool-call",
        "executed",
        "It is 21 degrees and sunny in Paris.",
    ]
    tool_message = body["output"]["messages"][-2]
    assert tool_message["role"] == "tool" and tool_message["name"] == "weather.get_weather"
    assert json.loads(tool_message["content"])["temperature"] == 21

    # The service got the secret header, the injected units and an idempotency key that
    # starts with the workflow id.
    workflow_id = stack.http.get(f"/runs/{body['id']}").json()["workflowId"]
    calls = service.calls("/weather/Paris")
    assert len(calls) == 1
    call = calls[0]
    assert call["headers"]["x-service-token"] == service.token
    assert call["query"] == {"units": UNITS}
    assert call["headers"]["idempotency-key"].startswith(workflow_id + "/")

    # The model was offered the tool without the injected parameter or the secret header...
    sent_to_model = chats(llm)
    assert len(sent_to_model) == 2
    tools = sent_to_model[0]["tools"]
    assert [t["function"]["name"] for t in tools] == [
        "weather__get_weather",
        "weather__create_ticket",
        "weather__flaky",
    ]
    weather = tools[0]["function"]["parameters"]
    assert set(weather["properties"]) == {"city"} and weather["required"] == ["city"]
    ticket = tools[1]["function"]["parameters"]
    assert "x-service-token" not in ticket["properties"]
    # ...and never saw the secret or the injected value anywhere in what it was sent.
    for request in sent_to_model:
        sent = json.dumps(request)
        assert service.token not in sent
        assert UNITS not in sent
        assert "units" not in sent
    assert service.token not in json.dumps(body)  # nor does the run's output or state


def test_injected_body_property_and_the_second_tool(
    hooks_stack: Stack, llm: ScriptedLLM, service: HookService
) -> None:
    stack = clean(hooks_stack)
    service.reset()
    add_llm_backend(stack, llm.openai_base)
    register(stack, service, extra=[{"in": "body", "name": "reporter", "value": "chain-bot"}])
    llm.reply(last_is_tool, "Ticket T-1 is open.")
    llm.reply(
        "printer",
        tool_calls=[
            {
                "name": "weather__create_ticket",
                # The model tries to set the injected field: the hook's value wins.
                "arguments": {"title": "printer on fire", "priority": "high", "reporter": "me"},
            }
        ],
    )
    resp = stack.http.post("/tasks", json={"chain": TOOL_LOOP, "input": "My printer burns"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["output"]["messages"][-1]["content"] == "Ticket T-1 is open."
    (call,) = service.calls("/tickets")
    assert call["body"] == {"title": "printer on fire", "priority": "high", "reporter": "chain-bot"}
    offered = chats(llm)[0]["tools"][1]["function"]["parameters"]
    assert set(offered["properties"]) == {"title", "priority"}
    assert "chain-bot" not in json.dumps(chats(llm))


def test_hidden_tools_are_not_offered_and_client_tools_are_left_alone(
    hooks_stack: Stack, llm: ScriptedLLM, service: HookService
) -> None:
    stack = clean(hooks_stack)
    service.reset()
    add_llm_backend(stack, llm.openai_base)
    register(stack, service)
    chain = json.loads(json.dumps(TOOL_LOOP))
    chain["id"] = "weather-hidden"
    chain["tasks"][0]["execute_config"]["hide_tools"] = ["weather.flaky", "create_ticket"]
    llm.reply(None, "no tools needed")
    resp = stack.http.post("/tasks", json={"chain": chain, "input": "hello"})
    assert resp.status_code == 200, resp.text
    names = [t["function"]["name"] for t in chats(llm)[0]["tools"]]
    assert names == ["weather__get_weather"]
