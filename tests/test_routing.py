"""Routing across backends: failover, health, cooldown, groups, providers, and state sync."""

import time
from collections.abc import Iterator

import pytest
from temporalio.client import Client

from core.schedules import ensure_state_sync, state_sync_id
from tests.scripted_llm import ScriptedLLM
from tests.stack import Stack


def one_step(chain_id: str, model: str = "shared-model", **config: object) -> dict:
    return {
        "id": chain_id,
        "tasks": [
            {
                "id": "answer",
                "handler": "prompt_to_string",
                "prompt_template": "say hi",
                "execute_config": {"model": model, **config},
            }
        ],
    }


@pytest.fixture(scope="module")
def routing_stack(temporal_address: str, postgres_url: str) -> Iterator[Stack]:
    """Short cooldown and few attempts, so health changes are seen within a test."""
    s = Stack(
        temporal_address,
        postgres_url,
        CHAINLOOM_BACKEND_DOWN_SECONDS=2,
        CHAINLOOM_LLM_MAX_ATTEMPTS=2,
    )
    yield s
    s.close()


@pytest.fixture
def rstack(routing_stack: Stack) -> Stack:
    for path in ("/backends", "/models"):
        for item in routing_stack.http.get(path, params={"limit": 1000}).json():
            routing_stack.http.delete(f"{path}/{item['id']}")
    return routing_stack


@pytest.fixture
def pair() -> Iterator[tuple[ScriptedLLM, ScriptedLLM]]:
    flaky = ScriptedLLM(models=["shared-model"]).start()
    steady = ScriptedLLM(models=["shared-model", "other-model"]).start()
    flaky.reply(None, status=500)
    steady.reply(None, "steady answer")
    yield flaky, steady
    flaky.stop()
    steady.stop()


def add(stack: Stack, name: str, llm: ScriptedLLM, kind: str = "openai") -> str:
    base = llm.url if kind == "ollama" else llm.openai_base
    resp = stack.http.post("/backends", json={"name": name, "baseUrl": base, "type": kind})
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def run(stack: Stack, chain: dict) -> dict:
    resp = stack.http.post("/tasks", json={"chain": chain, "input": ""})
    return {"status": resp.status_code, **resp.json()}


def test_failing_backend_is_skipped_marked_down_and_shown_in_state(
    rstack: Stack, pair: tuple[ScriptedLLM, ScriptedLLM]
) -> None:
    flaky, steady = pair
    add(rstack, "flaky", flaky)
    add(rstack, "steady", steady)
    result = run(rstack, one_step("failover-1"))
    assert result["status"] == 200, result
    unit = result["state"][0]
    assert result["output"] == "steady answer"
    assert unit["backend"] == "steady" and unit["failedOver"] == ["flaky"]
    assert unit["attempt"] == 1
    states = {s["name"]: s for s in rstack.http.get("/state").json()}
    assert states["flaky"]["healthy"] is False
    assert states["flaky"]["failures"] == 1
    assert "HTTP 500" in states["flaky"]["error"] and states["flaky"]["downUntil"]
    assert states["steady"]["healthy"] is True

    # While it is down, later runs go straight to the healthy backend.
    before = flaky.count("/v1/chat/completions")
    assert run(rstack, one_step("failover-2"))["status"] == 200
    assert flaky.count("/v1/chat/completions") == before

    # After the cooldown it is tried again, and marked healthy when it answers.
    flaky.reset()
    flaky.reply(None, "flaky is back")
    time.sleep(2.5)
    result = run(rstack, one_step("failover-3"))
    assert result["output"] == "flaky is back"
    states = {s["name"]: s for s in rstack.http.get("/state").json()}
    assert states["flaky"]["healthy"] is True and states["flaky"]["error"] == ""


def test_every_backend_failing_fails_the_task_after_temporal_retries(
    rstack: Stack, pair: tuple[ScriptedLLM, ScriptedLLM]
) -> None:
    flaky, _ = pair
    add(rstack, "flaky", flaky)
    result = run(rstack, one_step("all-down"))
    assert result["status"] == 422, result
    # The run says which backend failed, not what it answered (that is for admins, in /state).
    assert "backend flaky: unreachable" in result["detail"], result
    assert "HTTP 500" not in result["detail"]
    assert "HTTP 500" in {s["name"]: s for s in rstack.http.get("/state").json()}["flaky"]["error"]
    # Two Temporal attempts (CHAINLOOM_LLM_MAX_ATTEMPTS=2); the second finds it down but it
    # is the only one, so it is tried as a last resort.
    assert flaky.count("/v1/chat/completions") == 2


def test_fallback_models_and_provider_filter(
    rstack: Stack, pair: tuple[ScriptedLLM, ScriptedLLM]
) -> None:
    _, steady = pair
    add(rstack, "steady", steady)
    chain = one_step("fallback", model="missing-model", models=["other-model"])
    result = run(rstack, chain)
    assert result["status"] == 200 and result["state"][0]["model"] == "other-model"

    chain = one_step("provider", provider="ollama")
    result = run(rstack, chain)
    assert result["status"] == 422
    assert "no backend of type ollama serves model shared-model" in result["detail"]


def test_unknown_model_fails_at_once(rstack: Stack, pair: tuple[ScriptedLLM, ScriptedLLM]) -> None:
    _, steady = pair
    add(rstack, "steady", steady)
    result = run(rstack, one_step("unknown", model="nobody-serves-this"))
    assert result["status"] == 422
    assert "no backend serves model nobody-serves-this" in result["detail"]
    assert steady.count("/v1/chat/completions") == 0


async def test_state_sync_refreshes_health_and_models(
    rstack: Stack, pair: tuple[ScriptedLLM, ScriptedLLM]
) -> None:
    _, steady = pair
    add(rstack, "steady", steady, kind="ollama")
    dead = rstack.http.post(
        "/backends", json={"name": "dead", "baseUrl": "http://127.0.0.1:1", "type": "openai"}
    )
    assert dead.status_code == 201
    client = await Client.connect(rstack.settings.temporal_address)
    summary = await client.execute_workflow(
        "StateSyncWorkflow",
        id=f"sync-test-{time.time_ns()}",
        task_queue=rstack.settings.task_queue,
    )
    assert summary["healthy"] >= 1
    states = {s["name"]: s for s in rstack.http.get("/state").json()}
    assert sorted(states["steady"]["models"]) == ["other-model:latest", "shared-model:latest"]
    assert len(states["steady"]["pulledModels"][0]["digest"]) == 64  # as /api/tags gives it
    assert states["dead"]["healthy"] is False and "cannot reach" in states["dead"]["error"]


async def test_state_sync_schedule_is_created_once_and_updated(rstack: Stack) -> None:
    client = await Client.connect(rstack.settings.temporal_address)
    await ensure_state_sync(client, rstack.settings)
    await ensure_state_sync(client, rstack.settings)  # a second worker starting
    handle = client.get_schedule_handle(state_sync_id(rstack.settings))
    desc = await handle.describe()
    assert desc.schedule.spec.intervals[0].every.total_seconds() == 60
    await handle.delete()


def test_default_model(rstack: Stack) -> None:
    assert rstack.http.get("/defaultmodel").json() == {"modelName": ""}


@pytest.fixture(scope="module")
def groups_stack(temporal_address: str, sqlite_url: str) -> Iterator[Stack]:
    s = Stack(temporal_address, sqlite_url, CHAINLOOM_GROUPS_ENABLED="true")
    yield s
    s.close()


def test_with_groups_only_pairs_sharing_a_group_are_routed(
    groups_stack: Stack, pair: tuple[ScriptedLLM, ScriptedLLM]
) -> None:
    flaky, steady = pair
    flaky.reset()
    flaky.reply(None, "from the grouped backend")
    http = groups_stack.http
    suffix = str(time.time_ns())
    grouped = add(groups_stack, f"grouped-{suffix}", flaky)
    add(groups_stack, f"ungrouped-{suffix}", steady)
    model = http.post("/models", json={"model": "shared-model"})
    model_id = (
        model.json()["id"]
        if model.status_code == 201
        else next(m["id"] for m in http.get("/models").json() if m["model"] == "shared-model")
    )

    # Nothing shares a group yet: the model is invisible to routing.
    result = run(groups_stack, one_step(f"groups-none-{suffix}"))
    assert result["status"] == 422
    assert "in a shared affinity group" in result["detail"]

    group = http.post("/groups", json={"name": f"chat-{suffix}", "purposeType": "chat"}).json()
    assert http.post(f"/backend-affinity/{group['id']}/backends/{grouped}").status_code == 201
    assert http.post(f"/model-affinity/{group['id']}/models/{model_id}").status_code == 201
    result = run(groups_stack, one_step(f"groups-shared-{suffix}"))
    assert result["status"] == 200, result
    assert result["state"][0]["backend"] == f"grouped-{suffix}"
    assert steady.count("/v1/chat/completions") == 0


def test_a_backend_added_a_moment_ago_is_found_despite_the_caches(
    temporal_address: str, sqlite_url: str, pair: tuple[ScriptedLLM, ScriptedLLM]
) -> None:
    _, steady = pair
    cached = Stack(
        temporal_address,
        sqlite_url,
        CHAINLOOM_BACKEND_MODELS_TTL=300,
        CHAINLOOM_ROUTING_CACHE_SECONDS=300,
    )
    try:
        suffix = str(time.time_ns())
        # The first run fills the caches while no backend serves the model.
        first = run(cached, one_step(f"cache-miss-{suffix}", model="other-model"))
        assert first["status"] == 422
        add(cached, f"late-{suffix}", steady)
        second = run(cached, one_step(f"cache-hit-{suffix}", model="other-model"))
        assert second["status"] == 200, second
        assert second["state"][0]["backend"] == f"late-{suffix}"
    finally:
        for item in cached.http.get("/backends").json():
            cached.http.delete(f"/backends/{item['id']}")
        cached.close()


async def test_provider_key_is_sent_on_listings_probes_and_calls(
    rstack: Stack, pair: tuple[ScriptedLLM, ScriptedLLM]
) -> None:
    """A hosted provider answers nothing, not even its model list, without its key."""
    _, steady = pair
    add(rstack, "hosted", steady)
    key = f"sk-test-{time.time_ns()}"
    resp = rstack.http.post("/providers/openai/configure", json={"apiKey": key, "upsert": True})
    assert resp.status_code in (200, 201), resp.text

    def auth_of(path: str) -> str:
        seen = [r for r in steady.requests if r.path == path]
        assert seen, f"no request to {path}"
        headers = {k.lower(): v for k, v in seen[-1].headers.items()}
        return headers.get("authorization", "")

    try:
        assert rstack.http.get("/backends").json()[0]["error"] == ""
        assert auth_of("/v1/models") == f"Bearer {key}"  # the status probe

        steady.reset()
        steady.reply(None, "steady answer")
        client = await Client.connect(rstack.settings.temporal_address)
        await client.execute_workflow(
            "StateSyncWorkflow",
            id=f"sync-key-{time.time_ns()}",
            task_queue=rstack.settings.task_queue,
        )
        assert auth_of("/v1/models") == f"Bearer {key}"  # the state sync

        assert run(rstack, one_step(f"keyed-{time.time_ns()}"))["status"] == 200
        assert auth_of("/v1/chat/completions") == f"Bearer {key}"  # the call itself
    finally:
        rstack.http.delete("/providers/openai/config")
