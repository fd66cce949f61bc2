"""Done-when for events and triggers, end to end over real HTTP with a real worker:

an event appended through POST /events runs its trigger's JS function as a workflow, and the
function's sendEvent output appears on /events/stream/{type}. And a function that emits the
event of its own trigger stops at the depth limit with a recorded error event.
"""

import time
import uuid
from typing import Any

from core.events.triggers import DEPTH_EXCEEDED
from tests.stack import Stack
from tests.test_events import SSEReader

GREETER = (
    'function main(event) { sendEvent("reply", {to: event.data.name, text: "pong"}); return "ok"; }'
)
LOOPER = (
    "function main(event) {"
    " var n = event.data.n || 0;"
    " sendEvent(event.event_type, {n: n + 1});"
    " return n; }"
)


def create_function(stack: Stack, prefix: str, script: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    body = {"name": name, "description": "e2e", "scriptType": "goja", "script": script}
    resp = stack.http.post("/functions", json=body)
    assert resp.status_code == 201, resp.text
    return name


def create_trigger(stack: Stack, function: str, event_type: str) -> str:
    name = f"on_{event_type}_{uuid.uuid4().hex[:8]}"
    body = {
        "name": name,
        "listenFor": {"type": event_type},
        "type": "function",
        "function": function,
    }
    resp = stack.http.post("/event-triggers", json=body)
    assert resp.status_code == 201, resp.text
    return name


def test_appended_event_runs_its_trigger_and_the_reply_streams(stack: Stack) -> None:
    greeter = create_function(stack, "greeter", GREETER)
    trigger = create_trigger(stack, greeter, "ping")
    try:
        with SSEReader(stack, "/events/stream/reply") as reader:
            began = time.monotonic()
            resp = stack.http.post("/events", json={"event_type": "ping", "data": {"name": "ada"}})
            answered = time.monotonic() - began
            assert resp.status_code == 201, resp.text
            assert answered < 2.0, f"the append took {answered:.2f}s: it must not wait for the run"
            ping = resp.json()

            reply = reader.next(timeout=60)
            took = time.monotonic() - began
        assert reply["event_type"] == "reply"
        assert reply["data"] == {"to": "ada", "text": "pong"}
        # one trigger hop behind the ping, which came from outside
        assert ping["metadata"]["chainloom_depth"] == 0
        assert reply["metadata"]["chainloom_depth"] == 1
        assert reply["nid"] > ping["nid"]
        print(f"ping -> reply on the stream in {took:.2f}s")
        # the reply is in the store as well
        stored = stack.http.get("/events/type", params={"event_type": "reply"}).json()
        assert reply["id"] in [e["id"] for e in stored]
    finally:
        stack.http.delete(f"/event-triggers/{trigger}")


def _about(stack: Stack, kind: str) -> list[dict[str, Any]]:
    found = stack.http.get("/events/type", params={"event_type": DEPTH_EXCEEDED}).json()
    return [e for e in found if e["data"]["event_type"] == kind]


def test_a_self_triggering_function_stops_at_the_depth_limit(stack: Stack) -> None:
    limit = stack.settings.trigger_max_depth
    kind = f"loop.{uuid.uuid4().hex[:8]}"
    looper = create_function(stack, "looper", LOOPER)
    trigger = create_trigger(stack, looper, kind)
    try:
        resp = stack.http.post("/events", json={"event_type": kind, "data": {"n": 0}})
        assert resp.status_code == 201, resp.text

        deadline = time.monotonic() + 120
        while not (errors := _about(stack, kind)):
            assert time.monotonic() < deadline, "the loop was not stopped"
            time.sleep(0.2)
        [error] = errors
        assert error["data"]["trigger"] == trigger and error["data"]["function"] == looper
        assert error["data"]["depth"] == limit and error["data"]["max_depth"] == limit
        assert "CHAINLOOM_TRIGGER_MAX_DEPTH" in error["data"]["error"]

        # the function ran at depths 0 .. limit-1; the event at depth `limit` started nothing
        time.sleep(1.0)
        chain = stack.http.get("/events/type", params={"event_type": kind, "order": "asc"}).json()
        assert [e["metadata"]["chainloom_depth"] for e in chain] == list(range(limit + 1))
        assert [e["data"]["n"] for e in chain] == list(range(limit + 1))
        assert error["data"]["event_id"] == chain[-1]["id"]
        assert len(_about(stack, kind)) == 1
    finally:
        stack.http.delete(f"/event-triggers/{trigger}")
