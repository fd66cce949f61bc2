"""/runs and /tasks over real HTTP: asynchronous runs, progress, approval, cancel, failover."""

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from temporalio.client import Client
from temporalio.common import SearchAttributeKey

from tests.scripted_llm import ScriptedLLM
from tests.scripted_text import embed_vector
from tests.stack import Stack
from tests.test_api_resources import assert_error

EXAMPLES = Path(__file__).parent.parent / "chains" / "examples"
FINAL = {"completed", "failed", "cancelled"}


def add_backend(stack: Stack, name: str, base_url: str, kind: str = "openai") -> dict[str, Any]:
    resp = stack.http.post("/backends", json={"name": name, "baseUrl": base_url, "type": kind})
    assert resp.status_code == 201, resp.text
    return resp.json()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def prompt_task(
    task_id: str, prompt: str, model: str = "gpt-4o-mini", **extra: Any
) -> dict[str, Any]:
    return {
        "id": task_id,
        "handler": "prompt_to_string",
        "prompt_template": prompt,
        "execute_config": {"model": model},
        **extra,
    }


def chain_of(chain_id: str, *tasks: dict[str, Any]) -> dict[str, Any]:
    """Tasks run in the order given, the last one ends the chain."""
    linked = []
    for i, task in enumerate(tasks):
        goto = tasks[i + 1]["id"] if i + 1 < len(tasks) else "end"
        linked.append({"transition": {"branches": [{"operator": "default", "goto": goto}]}, **task})
    return {"id": chain_id, "tasks": linked}


def approval_gate(chain_id: str | None = None) -> dict[str, Any]:
    chain = yaml.safe_load((EXAMPLES / "approval-gate.yaml").read_text())
    if chain_id:
        chain["id"] = chain_id
    return chain


def start(stack: Stack, body: dict[str, Any]) -> dict[str, Any]:
    resp = stack.http.post("/runs", json=body)
    assert resp.status_code == 202, resp.text
    return resp.json()


def get_run(stack: Stack, run_id: str) -> dict[str, Any]:
    resp = stack.http.get(f"/runs/{run_id}")
    assert resp.status_code == 200, resp.text
    return resp.json()


def wait_run(
    stack: Stack,
    run_id: str,
    until: Callable[[dict[str, Any]], bool] | set[str] = FINAL,
    timeout: float = 20.0,
) -> dict[str, Any]:
    """Poll GET /runs/{id} until ``until`` holds (a set means: the status is one of these)."""
    check = until if callable(until) else (lambda view: view["status"] in until)
    deadline = time.monotonic() + timeout
    while True:
        view = get_run(stack, run_id)
        if check(view):
            return view
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} never got there; last view: {view}")
        time.sleep(0.1)


# --------------------------------------------------------------------------- starting runs


def test_run_progress_then_output(clean_stack: Stack, llm: ScriptedLLM) -> None:
    add_backend(clean_stack, "scripted", llm.openai_base)
    llm.reply("outline", "1. intro 2. body")
    llm.reply("expand", "The full text.", delay=2)
    chain_id = unique("progress")
    chain = chain_of(
        chain_id,
        prompt_task("outline", "Write an outline about {{ input }}"),
        prompt_task("write", "Now expand this: {{ outline }}"),
    )
    created = start(clean_stack, {"chain": chain, "input": "otters"})
    assert set(created) == {"id", "workflowId", "status"}
    assert created["workflowId"].startswith(f"chain-{chain_id}-")
    assert created["status"] == "running"

    view = wait_run(clean_stack, created["id"], lambda v: len(v["state"]) >= 1)
    assert view["status"] == "running"
    assert view["currentTask"] == "write"
    assert view["output"] is None and view["error"] is None
    assert view["workflowId"] == created["workflowId"] and view["chainId"] == chain_id
    [outline] = view["state"]
    assert outline["taskID"] == "outline" and outline["output"] == "1. intro 2. body"
    assert outline["backend"] == "scripted" and outline["model"] == "gpt-4o-mini"

    view = wait_run(clean_stack, created["id"])
    assert view["status"] == "completed", view
    assert view["output"] == "The full text." and view["outputType"] == "string"
    assert [u["taskID"] for u in view["state"]] == ["outline", "write"]
    assert view["currentTask"] is None
    assert llm.count("/v1/chat/completions") == 2


def test_stored_chain_by_id(clean_stack: Stack, llm: ScriptedLLM) -> None:
    add_backend(clean_stack, "scripted", llm.openai_base)
    llm.reply("shout", "HELLO")
    chain_id = unique("stored")
    chain = chain_of(chain_id, prompt_task("shout", "shout {{ input }}"))
    assert clean_stack.http.post("/taskchains", json=chain).status_code == 201

    created = start(clean_stack, {"chainId": chain_id, "input": "hello"})
    assert created["workflowId"].startswith(f"chain-{chain_id}-")
    view = wait_run(clean_stack, created["id"])
    assert view["status"] == "completed" and view["output"] == "HELLO"
    assert view["chainId"] == chain_id

    # POST /tasks takes a stored chain too, and waits for the result.
    resp = clean_stack.http.post("/tasks", json={"chainId": chain_id, "input": "hello"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["output"] == "HELLO"


def test_chain_selection_errors(clean_stack: Stack, llm: ScriptedLLM) -> None:
    http = clean_stack.http
    chain = chain_of("pick", {"id": "n", "handler": "noop"})
    for path in ("/runs", "/tasks"):
        body = assert_error(
            http.post(path, json={"chainId": "no-such-chain", "input": "x"}), 404, "not_found"
        )
        assert "no-such-chain" in body["error"]["message"]
        assert_error(
            http.post(path, json={"chain": chain, "chainId": "pick", "input": "x"}),
            400,
            "ambiguous_chain",
        )
        assert_error(http.post(path, json={"input": "x"}), 422, "missing_chain", param="chain")
    assert_error(http.get("/runs/not-a-run"), 404, "not_found")
    assert_error(http.post("/runs/not-a-run/approve", json={}), 404, "not_found")
    assert_error(http.post("/runs/not-a-run/cancel"), 404, "not_found")
    assert llm.count("/v1/chat/completions") == 0


# --------------------------------------------------------------------------- failures


def test_raise_error_fails_the_chain(clean_stack: Stack, llm: ScriptedLLM) -> None:
    chain = chain_of(
        unique("fails"),
        {"id": "first", "handler": "noop"},
        {"id": "explode", "handler": "raise_error", "prompt_template": "boom: {{ input }}"},
        {"id": "never", "handler": "noop"},
    )
    resp = clean_stack.http.post("/tasks", json={"chain": chain, "input": "kaboom"})
    body = assert_error(resp, 422, "chain_failed")
    message = body["error"]["message"]
    assert "explode" in message and "boom: kaboom" in message
    assert [u["taskID"] for u in body["state"]] == ["first", "explode"]
    assert body["state"][0]["output"] == "kaboom"
    assert body["state"][1]["error"] == {"error": "boom: kaboom"}

    view = get_run(clean_stack, body["id"])
    assert view["status"] == "failed" and "explode" in view["error"]
    assert view["workflowId"] == body["workflowId"]
    assert [u["taskID"] for u in view["state"]] == ["first", "explode"]


def test_model_not_served_fails_without_asking_the_llm(
    clean_stack: Stack, llm: ScriptedLLM
) -> None:
    add_backend(clean_stack, "scripted", llm.openai_base)
    chain = chain_of(unique("nomodel"), prompt_task("ask", "hi {{ input }}", model="no-such-model"))
    resp = clean_stack.http.post("/tasks", json={"chain": chain, "input": "x"})
    body = assert_error(resp, 422, "chain_failed")
    message = body["error"]["message"]
    assert "'ask'" in message and "no-such-model" in message
    assert [u["taskID"] for u in body["state"]] == ["ask"]
    assert llm.count("/v1/chat/completions") == 0


# --------------------------------------------------------------------------- approval


def _start_gate(stack: Stack, llm: ScriptedLLM) -> tuple[str, dict[str, Any]]:
    add_backend(stack, "scripted", llm.openai_base)
    llm.reply("rejected", "Revised announcement.")
    llm.reply("announcement", "Draft announcement.")
    chain_id = unique("gate")
    created = start(stack, {"chain": approval_gate(chain_id), "input": "dark mode"})
    view = wait_run(stack, created["id"], {"waiting", *FINAL})
    assert view["status"] == "waiting", view
    assert view["currentTask"] == "review"
    assert [u["taskID"] for u in view["state"]] == ["draft"]
    assert view["state"][0]["output"] == "Draft announcement."
    return chain_id, created


def test_approval_approved(clean_stack: Stack, llm: ScriptedLLM) -> None:
    _, created = _start_gate(clean_stack, llm)
    resp = clean_stack.http.post(
        f"/runs/{created['id']}/approve", json={"approved": True, "comment": "ship it"}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"id": created["id"], "approved": True}
    view = wait_run(clean_stack, created["id"])
    assert view["status"] == "completed", view
    assert [u["taskID"] for u in view["state"]] == ["draft", "review", "publish"]
    assert view["output"] == "Draft announcement."
    review = view["state"][1]
    assert review["output"]["approved"] is True and review["output"]["comment"] == "ship it"
    assert review["transition"] == "approved"
    assert view["state"][2]["print"] == "Published: Draft announcement."
    assert llm.count("/v1/chat/completions") == 1

    # A finished run takes no more decisions and cannot be cancelled.
    assert_error(
        clean_stack.http.post(f"/runs/{created['id']}/approve", json={"approved": True}),
        409,
        "run_not_running",
    )
    assert_error(clean_stack.http.post(f"/runs/{created['id']}/cancel"), 409, "run_not_running")


def test_approval_rejected(clean_stack: Stack, llm: ScriptedLLM) -> None:
    _, created = _start_gate(clean_stack, llm)
    resp = clean_stack.http.post(
        f"/runs/{created['id']}/approve", json={"approved": False, "comment": "too long"}
    )
    assert resp.status_code == 200, resp.text
    view = wait_run(clean_stack, created["id"])
    assert view["status"] == "completed", view
    assert [u["taskID"] for u in view["state"]] == ["draft", "review", "revise"]
    assert view["state"][1]["transition"] == "rejected"
    assert view["output"] == "Revised announcement."
    revise_prompt = llm.requests[-1].body["messages"][-1]["content"]
    assert "too long" in revise_prompt and "Draft announcement." in revise_prompt


def test_cancel_waiting_run(clean_stack: Stack, llm: ScriptedLLM) -> None:
    _, created = _start_gate(clean_stack, llm)
    resp = clean_stack.http.post(f"/runs/{created['id']}/cancel")
    assert resp.status_code == 200, resp.text
    assert resp.json()["id"] == created["id"]
    view = wait_run(clean_stack, created["id"])
    assert view["status"] == "cancelled", view
    assert view["output"] is None
    assert_error(
        clean_stack.http.post(f"/runs/{created['id']}/approve", json={}), 409, "run_not_running"
    )


# --------------------------------------------------------------------------- listing


def test_list_runs_newest_first_and_filters(clean_stack: Stack, llm: ScriptedLLM) -> None:
    http = clean_stack.http
    chain_id = unique("listed")
    chain = chain_of(
        chain_id, {"id": "gate", "handler": "approval"}, {"id": "n", "handler": "noop"}
    )
    other = chain_of(unique("other"), {"id": "n", "handler": "noop"})
    first = start(clean_stack, {"chain": chain, "input": "one"})
    wait_run(clean_stack, first["id"], {"waiting"})
    assert http.post(f"/runs/{first['id']}/approve", json={"approved": True}).status_code == 200
    wait_run(clean_stack, first["id"], {"completed"})
    unrelated = start(clean_stack, {"chain": other, "input": "x"})
    second = start(clean_stack, {"chain": chain, "input": "two"})
    wait_run(clean_stack, second["id"], {"waiting"})
    try:
        listed = http.get("/runs", params={"chainId": chain_id})
        assert listed.status_code == 200, listed.text
        runs = listed.json()
        assert [r["id"] for r in runs] == [second["id"], first["id"]]
        assert [r["status"] for r in runs] == ["waiting", "completed"]
        for run in runs:
            assert set(run) == {"id", "workflowId", "chainId", "status", "createdAt"}
            assert run["chainId"] == chain_id
            # The same RFC 3339 time as GET /runs/{id}, finished or not.
            assert run["createdAt"] == get_run(clean_stack, run["id"])["createdAt"]
            assert run["createdAt"].endswith("Z")
        assert runs[0]["createdAt"] > runs[1]["createdAt"]

        def ids(**params: str) -> list[str]:
            resp = http.get("/runs", params={"chainId": chain_id, **params})
            assert resp.status_code == 200, resp.text
            return [r["id"] for r in resp.json()]

        assert ids(status="waiting") == [second["id"]]
        assert ids(status="completed") == [first["id"]]
        assert ids(status="running") == []
        assert ids(status="failed") == []
        assert ids(limit="1") == [second["id"]]
        # Next page: the createdAt of the last run seen is the cursor.
        assert ids(limit="1", cursor=runs[0]["createdAt"]) == [first["id"]]
        assert ids(cursor=runs[1]["createdAt"]) == []
        # Everything, newest first: the unrelated run sits between the two.
        newest = [r["id"] for r in http.get("/runs", params={"limit": 3}).json()]
        assert newest == [second["id"], unrelated["id"], first["id"]]
        assert_error(http.get("/runs", params={"status": "sleeping"}), 422, "validation_error")
    finally:
        http.post(f"/runs/{second['id']}/cancel")
    assert wait_run(clean_stack, second["id"])["status"] == "cancelled"


def test_status_pages_are_full_although_running_and_waiting_share_rows(
    clean_stack: Stack, llm: ScriptedLLM
) -> None:
    """Unfinished rows are running or waiting; only the workflow knows which, so the list
    reads on past rows of the other kind until the page is full."""
    http = clean_stack.http
    add_backend(clean_stack, "scripted", llm.openai_base)
    gated = chain_of(unique("gated"), {"id": "gate", "handler": "approval"})
    waiting = start(clean_stack, {"chain": gated, "input": "w"})
    wait_run(clean_stack, waiting["id"], {"waiting"})
    llm.reply("slowly", "done", delay=30)
    slow = chain_of(unique("slow"), prompt_task("p", "slowly {{ input }}", "gpt-4o-mini"))
    running = [start(clean_stack, {"chain": slow, "input": str(i)}) for i in range(3)]
    try:
        for run in running:
            wait_run(clean_stack, run["id"], {"running"})
        page = http.get("/runs", params={"status": "waiting", "limit": 1})
        assert page.status_code == 200, page.text
        assert [r["id"] for r in page.json()] == [waiting["id"]]
        assert len(http.get("/runs", params={"status": "running", "limit": 2}).json()) == 2
    finally:
        for run in [waiting, *running]:
            http.post(f"/runs/{run['id']}/cancel")


def test_workflow_visible_in_temporal(clean_stack: Stack, llm: ScriptedLLM) -> None:
    chain_id = unique("visible")
    created = start(clean_stack, {"chain": chain_of(chain_id, {"id": "n", "handler": "noop"})})
    wait_run(clean_stack, created["id"], {"completed"})

    async def find() -> list[Any]:
        client = await Client.connect(
            clean_stack.settings.temporal_address,
            namespace=clean_stack.settings.temporal_namespace,
        )
        deadline = time.monotonic() + 10
        while True:
            found = [wf async for wf in client.list_workflows(f'ChainId = "{chain_id}"')]
            if found or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.2)

    [wf] = asyncio.run(find())
    assert wf.id == created["workflowId"]
    assert wf.workflow_type == "ChainWorkflow"
    attrs = wf.typed_search_attributes
    assert attrs.get(SearchAttributeKey.for_keyword("ChainId")) == chain_id
    assert attrs.get(SearchAttributeKey.for_keyword("TenantId")) == "default"
    assert attrs.get(SearchAttributeKey.for_keyword("RunKind")) == "chain"


# --------------------------------------------------------------------------- backends


@pytest.fixture
def broken_llm() -> Iterator[ScriptedLLM]:
    """A second backend that lists the model but answers every call with HTTP 500."""
    with ScriptedLLM(models=["gpt-4o-mini"]) as server:
        server.reply(None, status=500, error="the GPU caught fire")
        yield server


def test_failover_to_healthy_backend(
    clean_stack: Stack, llm: ScriptedLLM, broken_llm: ScriptedLLM
) -> None:
    add_backend(clean_stack, "broken", broken_llm.openai_base)  # older: tried first
    add_backend(clean_stack, "healthy", llm.openai_base)
    llm.reply("capital", "Paris")
    chain = chain_of(unique("failover"), prompt_task("ask", "The capital of France? {{ input }}"))
    resp = clean_stack.http.post("/tasks", json={"chain": chain, "input": "one word"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["output"] == "Paris"
    assert body["state"][0]["backend"] == "healthy"
    assert body["state"][0]["attempt"] == 1
    assert broken_llm.count("/v1/chat/completions") == 1
    assert llm.count("/v1/chat/completions") == 1


def test_ollama_protocol_backend(clean_stack: Stack, llm: ScriptedLLM) -> None:
    add_backend(clean_stack, "local-ollama", llm.url, "ollama")
    llm.reply("haiku", "old pond / frog jumps in / splash")
    chain = chain_of(unique("ollama"), prompt_task("poem", "A haiku about {{ input }}", "llama3.2"))
    resp = clean_stack.http.post("/tasks", json={"chain": chain, "input": "frogs"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["output"] == "old pond / frog jumps in / splash"
    assert body["state"][0]["backend"] == "local-ollama"
    assert body["state"][0]["model"] in ("llama3.2", "llama3.2:latest")
    assert llm.count("/api/chat") == 1 and llm.count("/v1/chat/completions") == 0


def test_embedding_through_openai_backend(clean_stack: Stack, llm: ScriptedLLM) -> None:
    add_backend(clean_stack, "scripted", llm.openai_base)
    chain = chain_of(
        unique("embed"),
        {
            "id": "vector",
            "handler": "text_to_embedding",
            "execute_config": {"model": "nomic-embed-text"},
        },
    )
    resp = clean_stack.http.post("/tasks", json={"chain": chain, "input": "hello world"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["outputType"] == "vector"
    assert body["output"] == pytest.approx(embed_vector("hello world", llm.embed_dim))
    assert body["state"][0]["backend"] == "scripted"
    assert body["state"][0]["model"] == "nomic-embed-text"
    assert llm.count("/v1/embeddings") == 1
    assert llm.count("/v1/chat/completions") == 0
