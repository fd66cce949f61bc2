"""/runs and /tasks over real HTTP: asynchronous runs, progress, approval, cancel, failover."""

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlmodel import select
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError

from api import run_service
from chains.loader import load_chain
from core.db import Database
from core.models import RunRow
from core.runs import start_chain_run
from tests.scripted_llm import ScriptedLLM
from tests.scripted_text import embed_vector
from tests.stack import ApiThread, Stack
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
    answer = resp.json()
    assert set(answer) == {"id", "taskId", "approved", "comment", "payload", "by"}
    assert answer["id"] == created["id"] and answer["taskId"] == "review"
    assert answer["approved"] is True and answer["comment"] == "ship it"
    assert answer["payload"] is None and answer["by"]
    view = wait_run(clean_stack, created["id"])
    assert view["status"] == "completed", view
    assert [u["taskID"] for u in view["state"]] == ["draft", "review", "publish"]
    assert view["output"] == "Draft announcement."
    review = view["state"][1]
    assert review["output"]["approved"] is True and review["output"]["comment"] == "ship it"
    assert review["output"]["by"] == answer["by"]
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
        f"/runs/{created['id']}/approve",
        json={"approved": False, "comment": "too long", "payload": {"limit": 40}},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["approved"] is False and resp.json()["payload"] == {"limit": 40}
    view = wait_run(clean_stack, created["id"])
    assert view["status"] == "completed", view
    assert [u["taskID"] for u in view["state"]] == ["draft", "review", "revise"]
    assert view["state"][1]["transition"] == "rejected"
    assert view["state"][1]["output"]["payload"] == {"limit": 40}
    assert view["output"] == "Revised announcement."
    revise_prompt = llm.requests[-1].body["messages"][-1]["content"]
    assert "too long" in revise_prompt and "Draft announcement." in revise_prompt


def test_early_approval_is_409_and_the_run_waits_for_a_real_decision(
    clean_stack: Stack, llm: ScriptedLLM
) -> None:
    """An approval sent while the run is still on an earlier task is refused, and nothing of
    it is kept: the approval task still waits for a decision of its own."""
    http = clean_stack.http
    add_backend(clean_stack, "scripted", llm.openai_base)
    llm.reply("announcement", "Draft announcement.", delay=3)
    created = start(clean_stack, {"chain": approval_gate(unique("early")), "input": "x"})
    view = wait_run(clean_stack, created["id"], lambda v: v["currentTask"] == "draft")
    assert view["status"] == "running"
    body = assert_error(
        http.post(f"/runs/{created['id']}/approve", json={"approved": True, "comment": "early"}),
        409,
        "run_not_waiting",
    )
    assert "'draft'" in body["error"]["message"] and body["currentTask"] == "draft"
    assert get_run(clean_stack, created["id"])["currentTask"] == "draft"  # still drafting

    view = wait_run(clean_stack, created["id"], {"waiting", *FINAL})
    assert view["status"] == "waiting" and view["currentTask"] == "review"
    time.sleep(0.5)  # an approval kept from before would have moved the run on by now
    assert get_run(clean_stack, created["id"])["status"] == "waiting"
    resp = http.post(f"/runs/{created['id']}/approve", json={"approved": True, "comment": "now"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["taskId"] == "review" and resp.json()["comment"] == "now"
    view = wait_run(clean_stack, created["id"])
    assert view["status"] == "completed", view
    assert view["state"][1]["output"]["comment"] == "now"


def test_approve_unknown_run_and_no_worker(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_error(stack.http.post("/runs/no-such-run/approve", json={}), 404, "not_found")
    # A second API on a task queue no worker polls: the decision cannot be taken.
    monkeypatch.setattr(run_service, "APPROVE_WAIT_SECONDS", 2.0)
    settings = Stack.settings_for(
        stack.settings.temporal_address, stack.settings.resolved_database_url()
    )
    api = ApiThread(settings).start()
    gate = chain_of(unique("orphan"), {"id": "gate", "handler": "approval"})
    try:
        with httpx.Client(
            base_url=api.url, headers={"X-API-Key": Stack.API_KEY}, timeout=60
        ) as http:
            created = http.post("/runs", json={"chain": gate, "input": "x"}).json()
            started = time.monotonic()
            body = assert_error(
                http.post(f"/runs/{created['id']}/approve", json={}), 503, "no_worker"
            )
            assert time.monotonic() - started < 30
            assert "no worker" in body["error"]["message"]
    finally:
        api.stop()

    async def terminate() -> None:
        client = await Client.connect(
            settings.temporal_address, namespace=settings.temporal_namespace
        )
        await client.get_workflow_handle(created["workflowId"]).terminate("test over")

    asyncio.run(terminate())


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


def routed_chain(chain_id: str) -> dict[str, Any]:
    """The input picks the ending: fail, wait (for an approval), slow (a model call), done."""
    end = {"branches": [{"operator": "default", "goto": "end"}]}
    return {
        "id": chain_id,
        "tasks": [
            {
                "id": "route",
                "handler": "noop",
                "transition": {
                    "branches": [
                        {"operator": "equals", "when": kind, "goto": target}
                        for kind, target in (("fail", "boom"), ("wait", "gate"), ("slow", "ask"))
                    ]
                    + [{"operator": "default", "goto": "end"}]
                },
            },
            {"id": "boom", "handler": "raise_error", "prompt_template": "boom", "transition": end},
            {"id": "gate", "handler": "approval", "transition": end},
            prompt_task("ask", "slowly {{ input }}", transition=end),
        ],
    }


def listed(
    http: httpx.Client,
    until: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 20.0,
    **params: Any,
) -> list[dict[str, Any]]:
    """GET /runs until `until` holds: visibility catches up with a run a moment later."""
    deadline = time.monotonic() + timeout
    while True:
        resp = http.get("/runs", params=params)
        assert resp.status_code == 200, resp.text
        if until(resp.json()):
            return list(resp.json())
        if time.monotonic() > deadline:
            raise AssertionError(f"GET /runs {params} never got there: {resp.json()}")
        time.sleep(0.2)


def ids_are(*expected: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda runs: [r["id"] for r in runs] == list(expected)


def test_list_runs_by_status_and_chain_in_visibility_order(
    clean_stack: Stack, llm: ScriptedLLM
) -> None:
    http = clean_stack.http
    add_backend(clean_stack, "scripted", llm.openai_base)
    llm.reply("slowly", "done", delay=30)
    chain_id = unique("listed")
    chain = routed_chain(chain_id)

    def run(value: str, until: str) -> str:
        created = start(clean_stack, {"chain": chain, "input": value})
        wait_run(clean_stack, created["id"], {until})
        return str(created["id"])

    done = run("done", "completed")
    failed = run("fail", "failed")
    cancelled = run("wait", "waiting")
    assert http.post(f"/runs/{cancelled}/cancel").status_code == 200
    wait_run(clean_stack, cancelled, {"cancelled"})
    other = start(clean_stack, {"chain": chain_of(unique("other"), {"id": "n", "handler": "noop"})})
    waiting = run("wait", "waiting")
    running = run("slow", "running")
    try:
        # Unfinished runs first, newest started first; then finished ones, the most recently
        # finished first (the order of the dev server's SQL visibility store).
        order = [running, waiting, cancelled, failed, done]
        statuses = ["running", "waiting", "cancelled", "failed", "completed"]
        # Polled for the statuses too: RunPhase reaches visibility a moment after the run.
        want = list(zip(order, statuses, strict=True))
        runs = listed(
            http, lambda rs: [(r["id"], r["status"]) for r in rs] == want, chainId=chain_id
        )
        for summary in runs:
            assert set(summary) == {"id", "workflowId", "chainId", "status", "createdAt"}
            view = get_run(clean_stack, summary["id"])
            assert summary["chainId"] == chain_id == view["chainId"]
            assert summary["workflowId"] == view["workflowId"]
            # The same RFC 3339 time as GET /runs/{id}, finished or not.
            assert summary["createdAt"] == view["createdAt"] and summary["createdAt"][-1] == "Z"
            assert summary["status"] == view["status"]
        for status, expected in (
            ("running", running),
            ("waiting", waiting),
            ("completed", done),
            ("failed", failed),
            ("cancelled", cancelled),
        ):
            listed(http, ids_are(expected), chainId=chain_id, status=status)
        # Without chainId the tenant's other runs list too.
        listed(http, lambda rs: {other["id"], *order} <= {r["id"] for r in rs}, limit=200)
        assert_error(http.get("/runs", params={"status": "sleeping"}), 422, "validation_error")
        # A chain id no chain can have lists nothing (and asks Temporal nothing).
        assert http.get("/runs", params={"chainId": "it's"}).json() == []

        # Approved, the waiting run leaves `waiting` (RunPhase goes back to running).
        assert http.post(f"/runs/{waiting}/approve", json={}).status_code == 200
        listed(http, ids_are(), chainId=chain_id, status="waiting")
        listed(http, ids_are(waiting, done), chainId=chain_id, status="completed")
    finally:
        http.post(f"/runs/{running}/cancel")
        http.post(f"/runs/{waiting}/cancel")


def test_list_runs_pages_without_duplicates_or_gaps(clean_stack: Stack, llm: ScriptedLLM) -> None:
    http = clean_stack.http
    chain_id = unique("paged")
    chain = chain_of(chain_id, {"id": "n", "handler": "noop"})
    started = [start(clean_stack, {"chain": chain, "input": str(i)})["id"] for i in range(7)]
    for run_id in started:
        wait_run(clean_stack, run_id, {"completed"})
    everything = listed(
        http,
        lambda rs: len(rs) == 7 and {r["status"] for r in rs} == {"completed"},
        chainId=chain_id,
    )
    assert {r["id"] for r in everything} == set(started)

    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        params = {"chainId": chain_id, "limit": "3", **({"cursor": cursor} if cursor else {})}
        resp = http.get("/runs", params=params)
        assert resp.status_code == 200, resp.text
        pages.append([r["id"] for r in resp.json()])
        cursor = resp.headers.get("X-Next-Cursor")
        if cursor is None:
            break
        assert len(pages) < 5, pages
    assert [len(p) for p in pages if p] == [3, 3, 1]
    assert [i for page in pages for i in page] == [r["id"] for r in everything]

    first = http.get("/runs", params={"chainId": chain_id, "limit": "3"})
    cursor = first.headers["X-Next-Cursor"]
    # A cursor belongs to the listing it came from; anything else is a 400, not a 5xx.
    for params in (
        {"chainId": chain_id, "status": "failed", "cursor": cursor},
        {"cursor": cursor},
        {"chainId": chain_id, "cursor": cursor[:-4] + "AAAA"},
        {"chainId": chain_id, "cursor": "2026-01-01T00:00:00Z"},
        {"chainId": chain_id, "cursor": "%%%"},
    ):
        assert_error(http.get("/runs", params=params), 400, "invalid_cursor", param="cursor")


def test_another_tenant_sees_none_of_the_runs(clean_stack: Stack, llm: ScriptedLLM) -> None:
    http = clean_stack.http
    chain = chain_of(unique("mine"), {"id": "gate", "handler": "approval"})
    mine = start(clean_stack, {"chain": chain, "input": "a"})
    wait_run(clean_stack, mine["id"], {"waiting"})
    registered = http.post(
        "/register",
        json={"email": f"runs-{uuid.uuid4().hex[:10]}@example.com", "password": "a long secret"},
    )
    assert registered.status_code == 201, registered.text
    other = httpx.Client(
        base_url=clean_stack.api.url,
        headers={"X-API-Key": registered.json()["apiKey"]["key"]},
        timeout=60,
    )
    try:
        theirs = other.post("/runs", json={"chain": chain, "input": "b"})
        assert theirs.status_code == 202, theirs.text
        # Both runs are in visibility, waiting, once each tenant sees its own so; then neither
        # sees more.
        for http_, run_id in ((http, mine["id"]), (other, theirs.json()["id"])):
            listed(http_, ids_are(run_id), chainId=chain["id"], status="waiting")
        runs = other.get("/runs", params={"limit": 200}).json()
        assert [r["id"] for r in runs] == [theirs.json()["id"]]
        assert other.get("/runs", params={"status": "waiting"}).json() == runs
        for path in (f"/runs/{mine['id']}/approve", f"/runs/{mine['id']}/cancel"):
            assert_error(other.post(path, json={}), 404, "not_found")
        assert_error(other.get(f"/runs/{mine['id']}"), 404, "not_found")
        assert get_run(clean_stack, mine["id"])["status"] == "waiting"
        other.post(f"/runs/{theirs.json()['id']}/cancel")
    finally:
        other.close()
        http.post(f"/runs/{mine['id']}/cancel")


def test_a_failed_start_leaves_no_run_row(stack: Stack, db: Database) -> None:
    """core.runs writes the run row before it starts the workflow, and takes it back when
    the start fails, so GET /runs/{id} never shows a run Temporal does not have."""
    chain = load_chain(chain_of(unique("unstarted"), {"id": "n", "handler": "noop"}))

    async def start_in_missing_namespace() -> None:
        client = await Client.connect(
            stack.settings.temporal_address, namespace="no-such-namespace"
        )
        await start_chain_run(db, client, stack.settings, "default", chain, "x")

    with pytest.raises(RPCError):
        asyncio.run(start_in_missing_namespace())
    with db.session() as session:
        rows = session.exec(select(RunRow).where(RunRow.chain_id == chain.id)).all()
    assert rows == []


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
