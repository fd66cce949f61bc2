"""/event-triggers over real HTTP (CRUD, validation) and trigger dispatch: an appended event
starts its triggers' FunctionWorkflows (once, however often it is dispatched) and a too-deep
chain is cut with a recorded error. The function itself running is covered by
tests/test_triggers_e2e.py, retries and the outbox by tests/test_outbox.py."""

import asyncio
import contextlib
import time
import uuid
from typing import Any

import httpx
from temporalio.client import Client
from temporalio.service import RPCError

from core.db import Database
from core.events.outbox import TriggerDispatcher
from core.events.triggers import (
    DEPTH_EXCEEDED,
    FUNCTION_WORKFLOW,
    OwedStart,
    trigger_workflow_id,
)
from core.models import FunctionRow
from core.temporal import connect, ensure_search_attributes
from tests.stack import Stack
from workflows.contracts import RUN_KIND, TENANT_ID
from workflows.types import FunctionRunInput

SCRIPT = "function main(event) { return 'ok'; }"


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def make_function(stack: Stack, name: str | None = None) -> str:
    """A stored function, written straight to the table (trigger tests need no JS runner)."""
    name = name or uniq("fn")
    db = Database(stack.settings.resolved_database_url())
    try:
        with db.session() as session:
            session.merge(
                FunctionRow(tenant_id=stack.settings.default_tenant, name=name, script=SCRIPT)
            )
            session.commit()
    finally:
        db.dispose()
    return name


def make_trigger(stack: Stack, function: str, event_type: str, name: str | None = None) -> dict:
    body = {
        "name": name or uniq("trg"),
        "description": "test trigger",
        "listenFor": {"type": event_type},
        "type": "function",
        "function": function,
    }
    resp = stack.http.post("/event-triggers", json=body)
    assert resp.status_code == 201, resp.text
    result: dict[str, Any] = resp.json()
    return result


def assert_error(resp: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body


def wait_for_event(stack: Stack, event_type: str, about: str, timeout: float = 20) -> dict:
    """The recorded event of a type whose data.event_id is `about`, once it is there."""
    deadline = time.monotonic() + timeout
    while True:
        found = stack.http.get("/events/type", params={"event_type": event_type}).json()
        matching = [e for e in found if e["data"].get("event_id") == about]
        if matching:
            assert len(matching) == 1, matching
            return dict(matching[0])
        assert time.monotonic() < deadline, f"no {event_type} event about {about}"
        time.sleep(0.05)


# --------------------------------------------------------------------------- CRUD


def test_trigger_crud(stack: Stack) -> None:
    http = stack.http
    fn, other_fn = make_function(stack), make_function(stack)
    kind = uniq("user.created")
    created = make_trigger(stack, fn, kind, name=uniq("welcome"))
    name = created["name"]
    assert set(created) == {
        "name",
        "description",
        "listenFor",
        "type",
        "function",
        "createdAt",
        "updatedAt",
    }
    assert created["listenFor"] == {"type": kind} and created["function"] == fn
    assert created["type"] == "function" and created["createdAt"].endswith("Z")
    assert http.get(f"/event-triggers/{name}").json() == created

    # list: oldest first, cursor pagination on createdAt
    second = make_trigger(stack, other_fn, kind)
    listed = http.get("/event-triggers", params={"limit": 1000}).json()
    names = [t["name"] for t in listed]
    assert names.index(name) < names.index(second["name"])
    page = http.get("/event-triggers", params={"cursor": created["createdAt"], "limit": 1000})
    assert name not in [t["name"] for t in page.json()]
    assert second["name"] in [t["name"] for t in page.json()]

    by_type = http.get(f"/event-triggers/event-type/{kind}").json()
    assert [t["name"] for t in by_type] == [name, second["name"]]
    assert [t["name"] for t in http.get(f"/event-triggers/function/{fn}").json()] == [name]
    assert http.get(f"/event-triggers/function/{uniq('nobody')}").json() == []

    # PUT: the path's name wins over the body's
    other_kind = uniq("user.deleted")
    body = {
        "name": "ignored",
        "description": "now on delete",
        "listenFor": {"type": other_kind},
        "function": other_fn,
    }
    resp = http.put(f"/event-triggers/{name}", json=body)
    assert resp.status_code == 200, resp.text
    updated = resp.json()
    assert updated["name"] == name and updated["listenFor"] == {"type": other_kind}
    assert updated["function"] == other_fn and updated["description"] == "now on delete"
    assert updated["createdAt"] == created["createdAt"]
    assert updated["updatedAt"] >= created["updatedAt"]
    assert [t["name"] for t in http.get(f"/event-triggers/event-type/{kind}").json()] == [
        second["name"]
    ]

    # A function a trigger runs cannot be deleted from under it.
    assert_error(http.delete(f"/functions/{other_fn}"), 409, "function_in_use")
    assert name in http.delete(f"/functions/{other_fn}").json()["error"]["message"]

    assert http.delete(f"/event-triggers/{name}").json() == "event trigger removed"
    assert_error(http.get(f"/event-triggers/{name}"), 404, "not_found")
    assert_error(http.delete(f"/event-triggers/{name}"), 404, "not_found")
    assert_error(http.put(f"/event-triggers/{name}", json=body), 404, "not_found")
    http.delete(f"/event-triggers/{second['name']}")
    assert http.delete(f"/functions/{other_fn}").json() == "function removed"


def test_trigger_validation(stack: Stack) -> None:
    http = stack.http
    fn = make_function(stack)
    good = {"name": uniq("t"), "listenFor": {"type": "x"}, "function": fn}
    # the function must exist, on create and on update
    resp = http.post("/event-triggers", json={**good, "function": uniq("missing")})
    assert_error(resp, 422, "unknown_function", param="function")
    assert "POST /functions" in resp.json()["error"]["message"]
    assert http.post("/event-triggers", json=good).status_code == 201
    resp = http.put(f"/event-triggers/{good['name']}", json={**good, "function": uniq("missing")})
    assert_error(resp, 422, "unknown_function", param="function")
    # duplicates, missing fields, unknown trigger types
    assert_error(http.post("/event-triggers", json=good), 409, "already_exists")
    assert_error(http.post("/event-triggers", json={**good, "name": ""}), 422, "validation_error")
    missing = {"name": uniq("t"), "function": fn}
    assert_error(http.post("/event-triggers", json=missing), 422, "validation_error", "/listenFor")
    empty_type = {**good, "name": uniq("t"), "listenFor": {"type": ""}}
    assert_error(http.post("/event-triggers", json=empty_type), 422, "validation_error")
    webhook = {**good, "name": uniq("t"), "type": "webhook"}
    assert_error(http.post("/event-triggers", json=webhook), 422, "validation_error", "/type")
    assert http.get("/event-triggers", params={"limit": "x"}).status_code == 400
    http.delete(f"/event-triggers/{good['name']}")


# --------------------------------------------------------------------------- dispatch


async def _temporal(stack: Stack) -> Client:
    client = await connect(stack.settings)
    await ensure_search_attributes(client)
    return client


async def _started_input(client: Client, workflow_id: str, wait: float = 20) -> Any:
    """The workflow's type, search attributes and decoded input, once it exists."""
    handle = client.get_workflow_handle(workflow_id)
    deadline = time.monotonic() + wait
    while True:
        try:
            desc = await handle.describe()
            break
        except RPCError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    history = await handle.fetch_history()
    attrs = history.events[0].workflow_execution_started_event_attributes
    [params] = await client.data_converter.decode(attrs.input.payloads, [FunctionRunInput])
    return desc, params


async def _terminate(client: Client, workflow_id: str) -> None:
    # The function may have finished already (the JS runner exists) or not (it does not).
    with contextlib.suppress(RPCError):
        await client.get_workflow_handle(workflow_id).terminate("test over")


async def test_append_starts_the_trigger_workflow(stack: Stack) -> None:
    fn, kind = make_function(stack), uniq("order.paid")
    trigger = make_trigger(stack, fn, kind)
    client = await _temporal(stack)

    began = time.monotonic()
    resp = await asyncio.to_thread(
        stack.http.post, "/events", json={"event_type": kind, "data": {"amount": 3}}
    )
    answered = time.monotonic() - began
    assert resp.status_code == 201, resp.text
    event = resp.json()
    assert answered < 2.0, answered  # the append does not wait for anything but the commit

    tenant = stack.settings.default_tenant
    workflow_id = trigger_workflow_id(tenant, fn, event["id"], trigger["name"])
    assert workflow_id.startswith(f"fn-{fn}-")
    desc, params = await _started_input(client, workflow_id)
    try:
        assert desc.workflow_type == FUNCTION_WORKFLOW
        assert desc.task_queue == stack.settings.task_queue
        assert desc.typed_search_attributes.get(TENANT_ID) == stack.settings.default_tenant
        assert desc.typed_search_attributes.get(RUN_KIND) == "function"
        assert params.function == fn and params.trigger == trigger["name"]
        assert params.depth == 0 and params.workflow_id == workflow_id
        assert params.tenant_id == stack.settings.default_tenant
        assert params.input == event  # the function gets the stored event, data as JSON
    finally:
        await _terminate(client, workflow_id)

    # starting the same owed start again (a retry, a second sweeper) starts nothing new
    db = _db(stack)
    try:
        owed = OwedStart(tenant, event["nid"], trigger["name"], fn, 0)
        again = await TriggerDispatcher(db, client, stack.settings).start_owed(event, [owed])
    finally:
        db.dispose()
    assert [(o.status, o.workflow_id) for o in again] == [("already_started", workflow_id)]
    # the same event id in another tenant is another workflow
    assert trigger_workflow_id("other", fn, event["id"], trigger["name"]) != workflow_id


def _db(stack: Stack) -> Database:
    return Database(stack.settings.resolved_database_url())


async def test_depth_limit_records_an_error_instead_of_starting(stack: Stack) -> None:
    fn, kind = make_function(stack), uniq("loop")
    trigger = make_trigger(stack, fn, kind)
    limit = stack.settings.trigger_max_depth
    resp = await asyncio.to_thread(
        stack.http.post,
        "/events",
        json={"event_type": kind, "metadata": {"chainloom_depth": limit}},
    )
    event = resp.json()
    assert event["metadata"]["chainloom_depth"] == limit
    error = await asyncio.to_thread(wait_for_event, stack, DEPTH_EXCEEDED, event["id"])
    assert error["data"]["trigger"] == trigger["name"] and error["data"]["function"] == fn
    assert error["data"]["depth"] == limit and error["data"]["max_depth"] == limit
    assert "CHAINLOOM_TRIGGER_MAX_DEPTH" in error["data"]["error"]
    assert error["event_source"] == "chainloom" and error["aggregate_id"] == trigger["name"]
    client = await _temporal(stack)
    with contextlib.suppress(RPCError):
        await client.get_workflow_handle(
            trigger_workflow_id(stack.settings.default_tenant, fn, event["id"], trigger["name"])
        ).describe()
        raise AssertionError("a workflow was started past the depth limit")

    # one below the limit still runs
    below = await asyncio.to_thread(
        stack.http.post,
        "/events",
        json={"event_type": kind, "metadata": {"chainloom_depth": limit - 1}},
    )
    workflow_id = trigger_workflow_id(
        stack.settings.default_tenant, fn, below.json()["id"], trigger["name"]
    )
    _, params = await _started_input(client, workflow_id)
    assert params.depth == limit - 1
    await _terminate(client, workflow_id)
