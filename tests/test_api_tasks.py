"""POST /tasks and /runs over real HTTP, against the scripted OpenAI-protocol backend."""

from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.scripted_llm import ScriptedLLM
from tests.stack import ApiThread, Stack

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


# --------------------------------------------------------------------------- typed bodies


def _schema(doc: dict[str, Any], ref_or_schema: dict[str, Any]) -> dict[str, Any]:
    ref = ref_or_schema.get("$ref", "")
    if not ref:
        return ref_or_schema
    found: dict[str, Any] = doc["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    return found


def _response_schema(doc: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any]:
    response = doc["paths"][path][method]["responses"][str(status)]
    return _schema(doc, response["content"]["application/json"]["schema"])


def _conforms(doc: dict[str, Any], schema: dict[str, Any], body: dict[str, Any]) -> None:
    """Every key the API sent is documented, and every required key was sent."""
    properties = schema["properties"]
    assert set(body) <= set(properties), (schema.get("title"), set(body) - set(properties))
    assert set(schema.get("required", [])) <= set(body), schema.get("title")


def _unit_schema(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    state = schema["properties"]["state"]
    arrays = [state, *state.get("anyOf", [])]
    items = next(s["items"] for s in arrays if s.get("type") == "array")
    return _schema(doc, items)


def test_tasks_bodies_are_the_documented_ones(
    clean_stack: Stack, llm: ScriptedLLM, client: httpx.Client
) -> None:
    doc = client.get("/openapi.json").json()
    request = _schema(
        doc,
        doc["paths"]["/tasks"]["post"]["requestBody"]["content"]["application/json"]["schema"],
    )
    assert set(request["properties"]) == {"chain", "chainId", "input", "inputType"}
    chain_refs = [s.get("$ref") for s in request["properties"]["chain"]["anyOf"]]
    assert "#/components/schemas/ChainDefinition" in chain_refs
    chain_schema = doc["components"]["schemas"]["ChainDefinition"]["properties"]
    assert {"id", "description", "debug", "token_limit", "tasks"} <= set(chain_schema)

    add_backend(clean_stack, llm)
    llm.reply("sentiment", "Positive.")
    llm.reply("thanking", "Thanks!")
    done = clean_stack.http.post("/tasks", json={"chain": sentiment_chain(), "input": "great"})
    assert done.status_code == 200, done.text
    ok = _response_schema(doc, "/tasks", "post", 200)
    assert ok["title"] == "TaskExecutionResponse"
    _conforms(doc, ok, done.json())
    unit = _unit_schema(doc, ok)
    assert {"taskID", "taskHandler", "inputVar", "output", "duration", "error"} <= set(
        unit["properties"]
    )
    for state in done.json()["state"]:
        _conforms(doc, unit, state)
        assert None not in (state.get("model"), state.get("backend"))  # absent keys stay absent

    failed = clean_stack.http.post(
        "/tasks",
        json={"chain": {"id": "boom", "tasks": [{"id": "b", "handler": "raise_error"}]}},
    )
    assert failed.status_code == 422, failed.text
    failure = _response_schema(doc, "/tasks", "post", 422)
    _conforms(doc, failure, failed.json())
    assert {"id", "workflowId", "state"} <= set(failed.json())
    _conforms(doc, _unit_schema(doc, failure), failed.json()["state"][0])
    # A plain invalid request is a 422 of the same documented shape, without run keys.
    invalid = clean_stack.http.post("/tasks", json={"input": "no chain"})
    assert invalid.status_code == 422
    _conforms(doc, failure, invalid.json())
    assert "id" not in invalid.json()


def test_tasks_answers_202_with_the_run_when_it_takes_long(stack: Stack) -> None:
    settings = Stack.settings_for(
        stack.settings.temporal_address,
        stack.settings.resolved_database_url(),
        CHAINLOOM_TASK_QUEUE=stack.settings.task_queue,  # the stack's worker runs it
        CHAINLOOM_TASKS_WAIT_TIMEOUT=0.5,
    )
    api = ApiThread(settings).start()
    gate = {"id": "slow-gate", "tasks": [{"id": "gate", "handler": "approval"}]}
    try:
        with httpx.Client(base_url=api.url, headers={"X-API-Key": Stack.API_KEY}) as http:
            doc = http.get("/openapi.json").json()
            resp = http.post("/tasks", json={"chain": gate, "input": "x"})
            assert resp.status_code == 202, resp.text
            body = resp.json()
            assert body["status"] == "running" and body["workflowId"].startswith("chain-slow-gate-")
            created = _response_schema(doc, "/tasks", "post", 202)
            assert created["title"] == "RunCreated"
            _conforms(doc, created, body)
            cancelled = http.post(f"/runs/{body['id']}/cancel")
            assert cancelled.status_code == 200, cancelled.text
            assert cancelled.json() == {"id": body["id"], "status": "cancelled"}
    finally:
        api.stop()


def test_openapi_types_every_run_route(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    paths = doc["paths"]
    for path, method, title in (
        ("/runs", "post", "RunCreated"),
        ("/runs/{id}", "get", "RunView"),
        ("/runs/{id}/approve", "post", "ApprovalResult"),
        ("/runs/{id}/cancel", "post", "RunCancelled"),
    ):
        status = 202 if (path, method) == ("/runs", "post") else 200
        schema = _response_schema(doc, path, method, status)
        assert schema["title"] == title, (path, schema)
        assert schema["properties"] and set(schema["required"]) == set(schema["properties"])
    listing = paths["/runs"]["get"]["responses"]["200"]
    items = _schema(doc, listing["content"]["application/json"]["schema"]["items"])
    assert set(items["properties"]) == {"id", "workflowId", "chainId", "status", "createdAt"}
    assert "X-Next-Cursor" in listing["headers"]
    view = doc["components"]["schemas"]["RunView"]["properties"]
    assert set(view) == {
        "id",
        "workflowId",
        "chainId",
        "createdAt",
        "status",
        "output",
        "outputType",
        "state",
        "error",
        "currentTask",
    }
    approve = paths["/runs/{id}/approve"]["post"]
    assert set(approve["responses"]) >= {"200", "404", "409", "503"}
    assert "currentTask" in _response_schema(doc, "/runs/{id}/approve", "post", 409)["properties"]
    body = _schema(doc, approve["requestBody"]["content"]["application/json"]["schema"])
    assert set(body["properties"]) == {"approved", "comment", "payload"}
