"""/taskchains over real HTTP: CRUD, paging, the published schema, 422s naming the field."""

import json
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.stack import Stack
from tests.test_api_resources import assert_error

EXAMPLES = Path(__file__).parent.parent / "chains" / "examples"
EXAMPLE_FILES = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".yaml", ".yml", ".json"))


def simple_chain(chain_id: str, description: str = "a chain") -> dict[str, Any]:
    return {
        "id": chain_id,
        "description": description,
        "tasks": [
            {
                "id": "echo",
                "handler": "noop",
                "transition": {"branches": [{"operator": "default", "goto": "end"}]},
            }
        ],
    }


def create(stack: Stack, chain: dict[str, Any]) -> dict[str, Any]:
    resp = stack.http.post("/taskchains", json=chain)
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_crud(clean_stack: Stack) -> None:
    http = clean_stack.http
    created = create(clean_stack, simple_chain("greeter"))
    assert created["id"] == "greeter" and created["description"] == "a chain"
    assert created["tasks"][0]["id"] == "echo" and created["tasks"][0]["handler"] == "noop"
    # The stored form is the normalized definition, defaults included.
    assert created["debug"] is False and created["token_limit"] == 0
    assert created["max_steps"] == 100
    assert created["tasks"][0]["retry_on_failure"] == 0

    got = http.get("/taskchains/greeter")
    assert got.status_code == 200, got.text
    assert got.json() == created

    body = assert_error(
        http.post("/taskchains", json=simple_chain("greeter", "again")), 409, "already_exists"
    )
    assert "greeter" in body["error"]["message"]
    assert http.get("/taskchains/greeter").json()["description"] == "a chain"

    # PUT: the id in the path wins over the one in the body.
    resp = http.put("/taskchains/greeter", json=simple_chain("something-else", "updated"))
    assert resp.status_code == 200, resp.text
    assert resp.json()["id"] == "greeter" and resp.json()["description"] == "updated"
    assert http.get("/taskchains/greeter").json()["description"] == "updated"
    assert_error(http.get("/taskchains/something-else"), 404, "not_found")
    # A body without an id takes the path's.
    no_id = {k: v for k, v in simple_chain("x", "no id").items() if k != "id"}
    resp = http.put("/taskchains/greeter", json=no_id)
    assert resp.status_code == 200, resp.text
    assert resp.json()["id"] == "greeter" and resp.json()["description"] == "no id"
    assert [c["id"] for c in http.get("/taskchains").json()] == ["greeter"]

    resp = http.delete("/taskchains/greeter")
    assert resp.status_code == 200, resp.text
    body = assert_error(http.get("/taskchains/greeter"), 404, "not_found")
    assert body["error"]["type"] == "not_found_error" and "greeter" in body["detail"]
    assert_error(http.delete("/taskchains/greeter"), 404, "not_found")
    assert_error(http.put("/taskchains/greeter", json=simple_chain("greeter")), 404, "not_found")
    assert http.get("/taskchains").json() == []


def test_list_limit_and_cursor(clean_stack: Stack) -> None:
    http = clean_stack.http
    for i in range(2):
        create(clean_stack, simple_chain(f"early-{i}"))
    time.sleep(0.05)
    between = datetime.now(UTC)
    time.sleep(0.05)
    for i in range(3):
        create(clean_stack, simple_chain(f"late-{i}"))

    everything = [c["id"] for c in http.get("/taskchains").json()]
    assert everything == ["early-0", "early-1", "late-0", "late-1", "late-2"]
    assert [c["id"] for c in http.get("/taskchains", params={"limit": "2"}).json()] == [
        "early-0",
        "early-1",
    ]
    # RFC3339Nano cursor (nine fraction digits, Z): only chains created after it.
    nano = between.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"
    page = http.get("/taskchains", params={"cursor": nano}).json()
    assert [c["id"] for c in page] == ["late-0", "late-1", "late-2"]
    page = http.get("/taskchains", params={"cursor": nano, "limit": 2}).json()
    assert [c["id"] for c in page] == ["late-0", "late-1"]
    # The same instant written with another UTC offset means the same page.
    shifted = between.astimezone(timezone(timedelta(hours=2))).isoformat()
    page = http.get("/taskchains", params={"cursor": shifted}).json()
    assert [c["id"] for c in page] == ["late-0", "late-1", "late-2"]

    assert_error(http.get("/taskchains", params={"cursor": "not-a-time"}), 400, "invalid_cursor")
    assert_error(http.get("/taskchains", params={"limit": "-1"}), 400, "invalid_limit")


def test_schema(stack: Stack) -> None:
    resp = stack.http.get("/taskchains/schema")
    assert resp.status_code == 200, resp.text
    schema = resp.json()
    assert "tasks" in schema["properties"]
    assert {"id", "tasks"} <= set(schema.get("required", []))
    assert "$schema" in schema or "title" in schema


def _broken(task: dict[str, Any]) -> dict[str, Any]:
    return {"id": "broken", "tasks": [{"id": "t", "handler": "noop", **task}]}


BROKEN: list[tuple[str, dict[str, Any], str, list[str]]] = [
    (
        "goto-missing-task",
        _broken({"transition": {"branches": [{"operator": "default", "goto": "nowhere"}]}}),
        "/tasks/0/transition/branches/0/goto",
        ["nowhere"],
    ),
    (
        "on-failure-missing-task",
        _broken({"transition": {"on_failure": "rescue"}}),
        "/tasks/0/transition/on_failure",
        ["rescue"],
    ),
    ("unknown-handler", _broken({"handler": "frobnicate"}), "/tasks/0/handler", ["frobnicate"]),
    (
        "missing-handler",
        {"id": "broken", "tasks": [{"id": "t"}]},
        "/tasks/0/handler",
        ["missing required field", "handler"],
    ),
    ("missing-tasks", {"id": "broken"}, "/tasks", ["missing required field", "tasks"]),
    ("missing-id", {"tasks": [{"id": "t", "handler": "noop"}]}, "/id", ["id"]),
    ("empty-tasks", {"id": "broken", "tasks": []}, "/tasks", ["at least 1"]),
    ("tasks-not-a-list", {"id": "broken", "tasks": "oops"}, "/tasks", ["list"]),
    ("debug-not-bool", {**_broken({}), "debug": "maybe"}, "/debug", ["boolean"]),
    ("token-limit-text", {**_broken({}), "token_limit": "lots"}, "/token_limit", ["integer"]),
    ("retry-not-int", _broken({"retry_on_failure": "many"}), "/tasks/0/retry_on_failure", []),
    ("bad-timeout", _broken({"timeout": "soon"}), "/tasks/0/timeout", ["soon"]),
    ("conditions-list", _broken({"valid_conditions": [1]}), "/tasks/0/valid_conditions", []),
    ("bad-operator", _broken({"transition": {"branches": [{"operator": "like"}]}}), "", ["like"]),
    (
        "typo-field",
        _broken({"promt_template": "hi"}),
        "/tasks/0/promt_template",
        ["did you mean 'prompt_template'"],
    ),
    ("bad-task-id", _broken({"id": "has space"}), "/tasks/0/id", []),
    (
        "duplicate-task-id",
        {"id": "broken", "tasks": [{"id": "t", "handler": "noop"}] * 2},
        "/tasks/1/id",
        ["t"],
    ),
]


@pytest.mark.parametrize(
    ("chain", "pointer", "words"), [b[1:] for b in BROKEN], ids=[b[0] for b in BROKEN]
)
def test_broken_chains_are_422_with_pointer(
    stack: Stack, chain: dict[str, Any], pointer: str, words: list[str]
) -> None:
    for resp in (
        stack.http.post("/taskchains", json=chain),
        stack.http.post("/tasks", json={"chain": chain, "input": "x"}),
        stack.http.post("/runs", json={"chain": chain, "input": "x"}),
    ):
        body = assert_error(resp, 422, "invalid_chain")
        message = body["error"]["message"]
        assert pointer in message, message
        for word in words:
            assert word in message, message
        assert body["errors"], body
        assert all(e["code"] == "invalid_chain" for e in body["errors"])
        if pointer:
            assert pointer in [e["field"] for e in body["errors"]]
            assert body["error"]["param"] == body["errors"][0]["field"]
    assert_error(stack.http.get("/taskchains/broken"), 404, "not_found")


def test_put_broken_chain_keeps_the_old_one(clean_stack: Stack) -> None:
    create(clean_stack, simple_chain("keep"))
    broken = _broken({"handler": "frobnicate"})
    body = assert_error(clean_stack.http.put("/taskchains/keep", json=broken), 422, "invalid_chain")
    assert "/tasks/0/handler" in body["error"]["message"]
    assert clean_stack.http.get("/taskchains/keep").json()["tasks"][0]["handler"] == "noop"


def test_several_problems_listed_one_per_field(stack: Stack) -> None:
    chain = {"id": "broken", "debug": "maybe", "token_limit": "lots", "tasks": "oops"}
    body = assert_error(stack.http.post("/taskchains", json=chain), 422, "invalid_chain")
    assert sorted(e["field"] for e in body["errors"]) == ["/debug", "/tasks", "/token_limit"]


def test_seed_style_json_strings(clean_stack: Stack) -> None:
    """seed 003 shows list and object fields as JSON-encoded strings; both forms load."""
    chain = {
        "id": "seed-style",
        "debug": True,
        "token_limit": 0,
        "tasks": [
            {
                "id": "validate_input",
                "handler": "condition_key",
                "prompt_template": "Is this input valid? {{.input}}",
                "valid_conditions": '{"valid": true, "invalid": false}',
                "execute_config": {
                    "model": "mistral:instruct",
                    "models": '["gpt-4", "gpt-3.5-turbo"]',
                    "provider": "ollama",
                    "providers": '["ollama", "openai"]',
                    "hooks": '["a"]',
                    "hide_tools": '["tool1", "hook_name1.tool1"]',
                    "pass_clients_tools": True,
                    "temperature": 0.7,
                },
                "print": "Validation result: {{.validate_input}}",
                "timeout": "30s",
                "retry_on_failure": 2,
                "transition": {
                    "branches": {"goto": "notify", "operator": "equals", "when": "true"},
                    "on_failure": "notify",
                },
            },
            {
                "id": "notify",
                "handler": "hook",
                "hook": {
                    "name": "slack",
                    "tool_name": "send_slack_notification",
                    "args": '{"channel": "#alerts", "message": "done"}',
                },
            },
        ],
    }
    stored = create(clean_stack, chain)
    task = stored["tasks"][0]
    cfg = task["execute_config"]
    assert cfg["hooks"] == ["a"]
    assert cfg["models"] == ["gpt-4", "gpt-3.5-turbo"]
    assert cfg["providers"] == ["ollama", "openai"]
    assert cfg["hide_tools"] == ["tool1", "hook_name1.tool1"]
    assert task["valid_conditions"] == {"valid": True, "invalid": False}
    assert task["transition"]["branches"] == [
        {"goto": "notify", "operator": "equals", "when": "true"}
    ]
    assert stored["tasks"][1]["hook"]["args"] == {"channel": "#alerts", "message": "done"}
    assert clean_stack.http.get("/taskchains/seed-style").json() == stored


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[p.name for p in EXAMPLE_FILES])
def test_shipped_examples_are_accepted(clean_stack: Stack, path: Path) -> None:
    text = path.read_text()
    chain = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    stored = create(clean_stack, chain)
    assert stored["id"] == chain["id"]
    assert [t["id"] for t in stored["tasks"]] == [t["id"] for t in chain["tasks"]]
    assert clean_stack.http.get(f"/taskchains/{chain['id']}").json() == stored
    # What the API hands back is itself a valid chain (a round trip changes nothing).
    again = clean_stack.http.put(f"/taskchains/{chain['id']}", json=stored)
    assert again.status_code == 200, again.text
    assert again.json() == stored


def test_examples_cover_yaml_and_json() -> None:
    assert {p.suffix for p in EXAMPLE_FILES} >= {".yaml", ".json"}
