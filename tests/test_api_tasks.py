"""POST /tasks and /runs over real HTTP, against the scripted OpenAI-protocol backend."""

from pathlib import Path

import yaml

from tests.scripted_llm import ScriptedLLM
from tests.stack import Stack

EXAMPLES = Path(__file__).parent.parent / "chains" / "examples"


def sentiment_chain() -> dict:
    return yaml.safe_load((EXAMPLES / "sentiment-router.yaml").read_text())


def add_backend(
    stack: Stack, llm: ScriptedLLM, kind: str = "openai", name: str = "scripted"
) -> dict:
    base = llm.openai_base if kind in ("openai", "vllm") else llm.url
    resp = stack.http.post("/backends", json={"name": name, "baseUrl": base, "type": kind})
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_condition_and_branches_through_tasks(clean_stack: Stack, llm: ScriptedLLM) -> None:
    add_backend(clean_stack, llm)
    llm.reply("sentiment", "Positive.")
    llm.reply("thanking", "Thank you so much for the kind words!")
    llm.reply("apology", "We are sorry.")
    resp = clean_stack.http.post(
        "/tasks", json={"chain": sentiment_chain(), "input": "I love this product"}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["output"] == "Thank you so much for the kind words!"
    assert body["outputType"] == "string"
    classify, reply = body["state"]
    assert classify["taskID"] == "classify"
    assert classify["output"] is True and classify["transition"] == "true"
    assert classify["backend"] == "scripted" and classify["model"] == "gpt-4o-mini"
    assert classify["duration"] >= 0 and classify["error"] == {"error": ""}
    assert reply["taskID"] == "thank_you"
    assert llm.count("/v1/chat/completions") == 2


def test_negative_branch(clean_stack: Stack, llm: ScriptedLLM) -> None:
    add_backend(clean_stack, llm)
    llm.reply("sentiment", "negative")
    llm.reply("apology", "So sorry about that.")
    resp = clean_stack.http.post(
        "/tasks", json={"chain": sentiment_chain(), "input": "It broke after a day"}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["output"] == "So sorry about that."
    assert [u["taskID"] for u in resp.json()["state"]] == ["classify", "apologize"]
