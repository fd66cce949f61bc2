"""Hooks: OpenAPI → tools, injection, the hook activities' failure classes, the /hooks API,
the `hook` handler, local hooks and the outbound policy applied to hooks."""

import itertools
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.hooks import HookActivities, hidden_tool
from core.config import Settings
from core.db import Database
from core.hooks.openapi import Hidden, SchemaCache, base_url, build_call, operations, schema_url
from core.hooks.store import RemoteHook, ToolArgumentError, encrypt_headers
from core.models import RemoteHookRow
from core.secrets import SecretBox, mask, scrub
from tests.hook_service import ALLOWLIST, HookService, allowlisted_stack, clean, register
from tests.stack import Stack
from tests.test_api_resources import assert_error
from workflows.types import ToolCallRequest, ToolsRequest


@pytest.fixture(scope="module")
def service() -> Iterator[HookService]:
    svc = HookService().start()
    yield svc
    svc.stop()


@pytest.fixture
def svc(service: HookService) -> HookService:
    service.reset()
    return service


def remote(
    service_url: str = "http://svc.test",
    token: str = "svc-token-123456",
    properties: list[dict[str, Any]] | None = None,
) -> RemoteHook:
    return RemoteHook(
        id="h1",
        tenant_id="t",
        name="weather",
        endpoint_url=service_url,
        timeout_ms=5000,
        headers={"X-Service-Token": token},
        properties=properties
        if properties is not None
        else [
            {"in": "query", "name": "units", "value": "metric"},
            {"in": "body", "name": "reporter", "value": "bot"},
        ],
        updated_at=datetime.now(UTC),
    )


# --------------------------------------------------------------------------- OpenAPI → tools


def test_operations_hide_injected_properties_and_secret_headers() -> None:
    doc = HookService().app.openapi()
    hook = remote()
    plain = {op.name: op for op in operations(doc)}
    assert list(plain) == ["get_weather", "create_ticket", "flaky"]
    assert set(plain["get_weather"].parameters["properties"]) == {
        "city",
        "units",
        "x-service-token",
    }

    ops = {op.name: op for op in operations(doc, Hidden.of(hook))}
    weather = ops["get_weather"]
    assert weather.method == "GET" and weather.path == "/weather/{city}"
    assert weather.description == "Current weather in a city."
    assert weather.parameters == {
        "type": "object",
        "properties": {"city": {"type": "string", "title": "City"}},
        "required": ["city"],
    }
    ticket = ops["create_ticket"]
    assert ticket.body_flat
    # The $ref to TicketIn is inlined; the injected `reporter` is gone.
    assert "$ref" not in json.dumps(ticket.parameters)
    assert set(ticket.parameters["properties"]) == {"title", "priority"}
    assert ticket.parameters["required"] == ["title"]
    assert ops["flaky"].parameters == {"type": "object", "properties": {}}


def test_build_call_splits_arguments_and_injects_over_the_model() -> None:
    doc = HookService().app.openapi()
    hook = remote()
    ops = {op.name: op for op in operations(doc, Hidden.of(hook))}
    args = {"city": "São Paulo/x", "units": "imperial", "x-service-token": "forged"}
    call = build_call(hook, "http://svc.test/api", ops["get_weather"], args, "wf/t/1")
    assert call.method == "GET"
    assert call.url == "http://svc.test/api/weather/S%C3%A3o%20Paulo%2Fx"
    assert call.params == [("units", "metric")]  # the model's "imperial" is overridden
    assert call.headers == {"X-Service-Token": "svc-token-123456", "Idempotency-Key": "wf/t/1"}
    assert not call.has_body

    args = {"title": "broken", "priority": "high", "reporter": "me"}
    call = build_call(hook, "http://svc.test", ops["create_ticket"], args, "k")
    assert call.has_body
    assert call.json_body == {"title": "broken", "priority": "high", "reporter": "bot"}

    with pytest.raises(ToolArgumentError, match="needs the argument 'city'"):
        build_call(hook, "http://svc.test", ops["get_weather"], {}, "k")


def test_non_object_bodies_sit_under_body_and_path_injection() -> None:
    doc = {
        "openapi": "3.0.0",
        "paths": {
            "/accounts/{account}/tags": {
                "parameters": [{"name": "account", "in": "path", "required": True}],
                "put": {
                    "operationId": "set tags!",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"type": "array", "items": {"$ref": "#/defs/Tag"}}
                            }
                        },
                    },
                },
            }
        },
        "defs": {"Tag": {"type": "string", "maxLength": 20}},
    }
    hook = remote(properties=[{"in": "path", "name": "account", "value": "acme"}])
    (op,) = operations(doc, Hidden.of(hook))
    assert op.name == "set_tags"
    assert op.parameters == {
        "type": "object",
        "properties": {"body": {"type": "array", "items": {"type": "string", "maxLength": 20}}},
        "required": ["body"],
    }
    call = build_call(hook, "http://svc.test", op, {"body": ["a", "b"], "account": "x"}, "k")
    assert call.url == "http://svc.test/accounts/acme/tags"
    assert call.json_body == ["a", "b"]


def test_schema_location_and_base_url() -> None:
    assert schema_url("http://svc.test/api") == "http://svc.test/api/openapi.json"
    assert schema_url("http://svc.test/spec/v1.yaml") == "http://svc.test/spec/v1.yaml"
    assert base_url("http://svc.test/api", {}) == "http://svc.test/api"
    assert base_url("http://svc.test/spec/v1.json", {}) == "http://svc.test/spec"
    relative = {"servers": [{"url": "/v2"}]}
    assert base_url("http://svc.test/api", relative) == "http://svc.test/v2"
    # A document naming another origin does not get the hook's secrets sent there.
    elsewhere = {"servers": [{"url": "https://attacker.example/"}]}
    assert base_url("http://svc.test/api", elsewhere) == "http://svc.test/api"


def test_scrub_and_hidden_tool_names() -> None:
    value = {"echo": ["token svc-token-123456 seen"], "svc-token-123456": 1}
    assert scrub(value, ["svc-token-123456"]) == {"echo": ["token **** seen"], "****": 1}
    assert hidden_tool("weather.flaky", {"flaky"})
    assert hidden_tool("weather.flaky", {"weather.flaky"})
    assert hidden_tool("weather.flaky", {"weather"})
    assert not hidden_tool("weather.get_weather", {"flaky"})
    assert hidden_tool("echo", {"echo"}) and not hidden_tool("echo", {"print"})


# --------------------------------------------------------------------------- the activities


@pytest.fixture(scope="module")
def unit_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    path: Path = tmp_path_factory.mktemp("hooks") / "hooks.db"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    yield db
    db.dispose()


BOX = SecretBox([Fernet.generate_key().decode()])


def activities(db: Database, allowlist: str = ALLOWLIST, ttl: float = 300.0) -> HookActivities:
    settings = Settings(CHAINLOOM_OUTBOUND_ALLOWLIST=allowlist, CHAINLOOM_HOOK_SCHEMA_TTL=ttl)
    return HookActivities(db, BOX, settings)


def store(db: Database, tenant: str, service: HookService, name: str = "weather") -> None:
    with db.session() as session:
        session.add(
            RemoteHookRow(
                tenant_id=tenant,
                name=name,
                endpoint_url=service.url,
                timeout_ms=5000,
                headers_encrypted=encrypt_headers(BOX, {"X-Service-Token": service.token}),
                properties=[{"in": "query", "name": "units", "value": "metric"}],
            )
        )
        session.commit()


def request(tenant: str, tool: str, args: dict[str, Any] | None = None) -> ToolCallRequest:
    return ToolCallRequest(tenant, "wf-1", "task", "weather", tool, args or {}, "wf-1/task/1")


async def test_activity_failure_classes(unit_db: Database, svc: HookService) -> None:
    tenant = f"t-{time.time_ns()}"
    store(unit_db, tenant, svc)
    acts = activities(unit_db)
    env = ActivityEnvironment()

    result = await env.run(acts.call, request(tenant, "get_weather", {"city": "Rome"}))
    assert result.status == 200 and result.output["city"] == "Rome"

    for status in (400, 401, 404, 422):
        svc.plan[:] = [status]
        with pytest.raises(ApplicationError) as info:
            await env.run(acts.call, request(tenant, "flaky"))
        assert info.value.type == "PermanentToolError" and info.value.non_retryable
        assert f"HTTP {status}" in info.value.message
    for status in (408, 429, 500, 503):
        svc.plan[:] = [status]
        with pytest.raises(ApplicationError) as info:
            await env.run(acts.call, request(tenant, "flaky"))
        assert info.value.type == "ToolUnavailable" and not info.value.non_retryable

    with pytest.raises(ApplicationError, match="has no tool 'nope'") as info:
        await env.run(acts.call, request(tenant, "nope"))
    assert info.value.non_retryable
    with pytest.raises(ApplicationError, match="unknown hook 'ghost'"):
        await env.run(acts.call, ToolCallRequest(tenant, "w", "t", "ghost", "x", {}, "k"))
    with pytest.raises(ApplicationError, match="needs the argument 'city'"):
        await env.run(acts.call, request(tenant, "get_weather"))

    # Without 127.0.0.1 on the allowlist the hook is refused before any connection.
    svc.reset()
    strict = activities(unit_db, allowlist="")
    with pytest.raises(ApplicationError) as info:
        await env.run(strict.call, request(tenant, "get_weather", {"city": "Rome"}))
    assert info.value.non_retryable
    assert "refused: 127.0.0.1 is a loopback address" in info.value.message
    assert svc.requests == []


async def test_schemas_are_cached_and_a_missing_tool_refetches_once(
    unit_db: Database, svc: HookService
) -> None:
    tenant = f"t-{time.time_ns()}"
    store(unit_db, tenant, svc)
    acts = activities(unit_db)
    env = ActivityEnvironment()
    tools = await env.run(acts.tools, ToolsRequest(tenant, ["weather", "echo"], ["flaky"]))
    assert [t.name for t in tools] == ["weather.get_weather", "weather.create_ticket", "echo"]
    await env.run(acts.tools, ToolsRequest(tenant, ["weather"]))
    await env.run(acts.call, request(tenant, "get_weather", {"city": "Rome"}))
    assert len(svc.calls("/openapi.json")) == 1  # one fetch serves them all

    # A cached document that lacks the tool (the service grew it since) is refetched.
    cache: SchemaCache = acts._cache
    for key, (fetched, doc) in list(cache._docs.items()):
        trimmed = {**doc, "paths": {k: v for k, v in doc["paths"].items() if k != "/flaky"}}
        cache._docs[key] = (fetched, trimmed)
    result = await env.run(acts.call, request(tenant, "flaky"))
    assert result.output == {"ok": True}
    assert len(svc.calls("/openapi.json")) == 2

    # With no TTL every use fetches the document again.
    fresh = activities(unit_db, ttl=0)
    await env.run(fresh.tools, ToolsRequest(tenant, ["weather"]))
    await env.run(fresh.tools, ToolsRequest(tenant, ["weather"]))
    assert len(svc.calls("/openapi.json")) == 4


# --------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def hooks_stack(temporal_address: str, database_url: str) -> Iterator[Stack]:
    s = allowlisted_stack(temporal_address, database_url)
    yield s
    s.close()


@pytest.fixture
def hstack(hooks_stack: Stack, svc: HookService) -> Stack:
    return clean(hooks_stack)


def test_remote_hook_crud_masks_header_values(hstack: Stack, svc: HookService) -> None:
    http = hstack.http
    created = register(hstack, svc)
    assert created["name"] == "weather" and created["endpointUrl"] == svc.url
    assert created["timeoutMs"] == 5000
    assert created["headers"] == {"X-Service-Token": mask(svc.token)}
    assert created["properties"] == [{"in": "query", "name": "units", "value": "metric"}]
    assert created["createdAt"].endswith("Z") and created["updatedAt"].endswith("Z")
    hook_id = created["id"]

    assert http.get(f"/hooks/remote/{hook_id}").json() == created
    assert http.get("/hooks/remote/by-name/weather").json() == created
    assert http.get("/hooks/remote").json() == [created]
    assert http.get("/hooks/remote", params={"name": "weather"}).json() == [created]
    assert http.get("/hooks/remote", params={"name": "other"}).json() == []

    # The seed's own example shape: headers as "Name:value,..." and one property object.
    seed = http.post(
        "/hooks/remote",
        json={
            "name": "mailing-tools",
            "endpointUrl": "http://hooks-endpoint:8080",
            "headers": "Authorization:Bearer abcdefghijkl,Content-Type:application/json",
            "properties": {"in": "body", "name": "access_token", "value": None},
        },
    )
    assert seed.status_code == 201, seed.text
    assert seed.json()["headers"] == {
        "Authorization": mask("Bearer abcdefghijkl"),
        "Content-Type": mask("application/json"),
    }
    assert seed.json()["timeoutMs"] == 10_000
    assert len(http.get("/hooks/remote", params={"limit": 1}).json()) == 1

    # PUT: a masked value sent back keeps the stored secret; leaving headers out keeps all.
    update = {**created, "timeoutMs": 7000, "properties": []}
    put = http.put(f"/hooks/remote/{hook_id}", json=update)
    assert put.status_code == 200, put.text
    assert put.json()["timeoutMs"] == 7000 and put.json()["properties"] == []
    assert put.json()["headers"] == {"X-Service-Token": mask(svc.token)}
    del update["headers"]
    assert http.put(f"/hooks/remote/{hook_id}", json=update).status_code == 200
    with Database(hstack.settings.resolved_database_url()).session() as session:
        row = session.get(RemoteHookRow, hook_id)
        assert row is not None
        stored = SecretBox.from_settings(hstack.settings).decrypt(row.headers_encrypted)
    assert json.loads(stored) == {"X-Service-Token": svc.token}

    # No answer ever carries the secret in clear.
    everything = [
        http.get("/hooks/remote").text,
        http.get(f"/hooks/remote/{hook_id}").text,
        http.get("/hooks/remote/by-name/weather").text,
        put.text,
    ]
    assert all(svc.token not in text for text in everything)

    assert http.delete(f"/hooks/remote/{hook_id}").json() == "deleted"
    assert_error(http.get(f"/hooks/remote/{hook_id}"), 404, "not_found")
    assert_error(http.delete(f"/hooks/remote/{hook_id}"), 404, "not_found")
    assert_error(http.put(f"/hooks/remote/{hook_id}", json=update), 404, "not_found")
    assert_error(http.get("/hooks/remote/by-name/weather"), 404, "not_found")


def test_remote_hook_conflicts_and_validation(hstack: Stack, svc: HookService) -> None:
    http = hstack.http
    register(hstack, svc)
    other = register(hstack, svc, name="tickets")
    body = assert_error(
        http.post("/hooks/remote", json={"name": "weather", "endpointUrl": svc.url}),
        409,
        "already_exists",
        param="name",
    )
    assert body["error"]["type"] == "conflict_error"
    rename = {"name": "weather", "endpointUrl": svc.url}
    assert_error(http.put(f"/hooks/remote/{other['id']}", json=rename), 409, "already_exists")

    bad = {
        "name": "has.dot",
        "endpointUrl": "ftp://svc",
        "timeoutMs": 0,
        "properties": [{"in": "cookie", "name": "x"}],
        "headers": {"Host": "evil"},
    }
    body = assert_error(http.post("/hooks/remote", json=bad), 422, "validation_error")
    fields = sorted(e["field"] for e in body["errors"])
    assert fields == ["/endpointUrl", "/headers", "/name", "/properties/0/in", "/timeoutMs"]
    body = assert_error(
        http.post("/hooks/remote", json={"name": "echo", "endpointUrl": svc.url}),
        422,
        "validation_error",
    )
    assert "local hook" in body["error"]["message"]


def test_schemas_and_supported(hstack: Stack, svc: HookService) -> None:
    http = hstack.http
    register(hstack, svc)
    register(hstack, svc, name="intranet", endpoint="http://10.255.255.1:9")
    schemas = http.get("/hooks/schemas").json()
    assert set(schemas) == {"echo", "print", "webhook", "js", "weather", "intranet"}
    assert schemas["weather"]["paths"]["/weather/{city}"]["get"]["operationId"] == "get_weather"
    assert schemas["print"]["paths"]["/print"]["post"]["operationId"] == "print"
    assert "refused: 10.255.255.1 is a private address" in schemas["intranet"]["error"]
    # Cached: a second listing does not fetch the document again.
    http.get("/hooks/schemas")
    assert len(svc.calls("/openapi.json")) == 1
    assert svc.calls("/openapi.json")[0]["headers"]["x-service-token"] == svc.token

    assert http.get("/supported").json() == [
        "echo",
        "print",
        "webhook",
        "js",
        "intranet",
        "weather",
    ]
    assert httpx.get(f"{hstack.api.url}/supported").status_code == 401


# --------------------------------------------------------------------------- the hook handler


def run(stack: Stack, tasks: list[dict[str, Any]], value: Any = "", chain_id: str = "") -> Any:
    # Each task goes on to the next one.
    for task, after in itertools.pairwise(tasks):
        task["transition"] = {"branches": [{"operator": "default", "goto": after["id"]}]}
    chain = {"id": chain_id or f"hooks-{time.time_ns()}", "tasks": tasks}
    return stack.http.post("/tasks", json={"chain": chain, "input": value})


def hook_task(task_id: str, name: str, tool: str = "", **args: Any) -> dict[str, Any]:
    return {
        "id": task_id,
        "handler": "hook",
        "hook": {"name": name, "tool_name": tool, "args": args},
    }


def test_hook_handler_with_templated_args_and_output_template(
    hstack: Stack, svc: HookService
) -> None:
    register(hstack, svc)
    task = hook_task("lookup", "weather", "get_weather", city="{{ input }}")
    task["output_template"] = "{{ city }}: {{ temperature }} degrees, {{ conditions }}"
    resp = run(hstack, [task], "Oslo")
    assert resp.status_code == 200, resp.text
    assert resp.json()["output"] == "Oslo: 21 degrees, sunny"
    (call,) = svc.calls("/weather/Oslo")
    assert call["query"] == {"units": "metric"}
    assert call["headers"]["x-service-token"] == svc.token
    workflow_id = hstack.http.get(f"/runs/{resp.json()['id']}").json()["workflowId"]
    # <workflow id>/<task id>/<step>/<retry_on_failure attempt>
    assert call["headers"]["idempotency-key"] == f"{workflow_id}/lookup/1/1"


def test_a_4xx_fails_the_task_without_retries(hstack: Stack, svc: HookService) -> None:
    register(hstack, svc)
    svc.plan[:] = [400]
    resp = run(hstack, [hook_task("call", "weather", "flaky")])
    body = assert_error(resp, 422, "chain_failed")
    assert "weather.flaky: POST answered HTTP 400" in body["detail"]
    assert len(svc.calls("/flaky")) == 1


def test_a_5xx_is_retried_with_the_same_idempotency_key(hstack: Stack, svc: HookService) -> None:
    register(hstack, svc)
    svc.plan[:] = [503]
    resp = run(hstack, [hook_task("call", "weather", "flaky")])
    assert resp.status_code == 200, resp.text
    assert resp.json()["output"] == {"ok": True}
    calls = svc.calls("/flaky")
    assert len(calls) == 2
    keys = {c["headers"]["idempotency-key"] for c in calls}
    assert len(keys) == 1  # the retry is recognisable as the same call


def test_local_hooks_echo_print_webhook(hstack: Stack, svc: HookService) -> None:
    tasks = [
        hook_task("echoed", "echo", a="{{ input }}", n=3),
        hook_task("printed", "print", message="hello {{ input }}"),
        hook_task("posted", "webhook", url=f"{svc.url}/webhook", msg="{{ input }}"),
    ]
    resp = run(hstack, tasks, "world")
    assert resp.status_code == 200, resp.text
    state = {u["taskID"]: u for u in resp.json()["state"]}
    assert state["echoed"]["output"] == {"a": "world", "n": 3}
    assert state["printed"]["output"] == "hello world"
    assert resp.json()["output"] == {"received": True, "bytes": len('{"msg": "world"}')}
    (delivery,) = svc.calls("/webhook")
    assert delivery["method"] == "POST" and delivery["body"] == {"msg": "world"}
    assert delivery["headers"]["idempotency-key"].endswith("/posted/3/1")

    payload = hook_task("posted", "webhook", url=f"{svc.url}/webhook", payload={"x": [1, 2]})
    assert run(hstack, [payload]).status_code == 200
    assert svc.calls("/webhook")[-1]["body"] == {"x": [1, 2]}


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://10.255.255.1:9/hook", "10.255.255.1 is a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is the cloud metadata"),
        ("http://127.0.0.2:9/", "127.0.0.2 is a loopback address"),  # only .1 is allowlisted
    ],
)
def test_hooks_refuse_non_allowlisted_private_addresses(
    hstack: Stack, svc: HookService, target: str, reason: str
) -> None:
    register(hstack, svc, name="intranet", endpoint=target.rsplit("/", 1)[0])
    for task in (
        hook_task("remote", "intranet", "anything"),
        hook_task("posted", "webhook", url=target, payload={}),
    ):
        started = time.monotonic()
        body = assert_error(run(hstack, [task]), 422, "chain_failed")
        assert f"refused: {reason}" in body["detail"]
        assert "CHAINLOOM_OUTBOUND_ALLOWLIST" in body["detail"]
        assert time.monotonic() - started < 5  # refused once, not retried
