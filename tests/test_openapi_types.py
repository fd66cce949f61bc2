"""Every route's bodies are typed in /openapi.json, and the bodies the API sends are those.

The first test walks the document: an operation whose 2xx answer or JSON request body is an
untyped object (no properties and no reference, or an array of such) fails it, unless listed
below with the reason. The second makes a representative call of each resource and checks
the body against the schema its route declares (tests/openapi_checks.py).
"""

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.openapi_checks import conforms, response_schema, untyped
from tests.scripted_llm import ScriptedLLM
from tests.stack import Stack
from tests.test_downloads import follow

# (method, path, "request" | "response"): bodies that really are free-form JSON.
FREE_FORM = {
    # A JSON Schema document (draft 2020-12) of chain files: any keys a schema may hold.
    ("get", "/taskchains/schema", "response"),
    # A raw event: whatever JSON a webhook sender posts, stored as it came (docs/events.md).
    ("post", "/ingest", "request"),
    # A value a task produced, kept out of history: whatever JSON the task returned.
    ("get", "/runs/{id}/values/{seq}", "response"),
}

Doc = dict[str, Any]


def _untyped_stream(doc: Doc, response: Doc) -> bool:
    """An event stream is typed when each event's `data` has a typed schema (the itemSchema
    form of FastAPI's own SSE routes) and the answer says what the events are."""
    media = response.get("content", {}).get("text/event-stream", {})
    data = media.get("itemSchema", {}).get("properties", {}).get("data", {})
    described = response.get("description", "Successful Response") != "Successful Response"
    return not described or untyped(doc, data.get("contentSchema"))


def _problems(doc: Doc) -> dict[tuple[str, str, str], str]:
    found: dict[tuple[str, str, str], str] = {}
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            body = operation.get("requestBody", {}).get("content", {})
            if "application/json" in body and untyped(doc, body["application/json"]["schema"]):
                found[method, path, "request"] = "untyped JSON request body"
            for status, response in operation["responses"].items():
                if not status.startswith("2") or status == "204":
                    continue
                content = response.get("content", {})
                if not content:
                    found[method, path, "response"] = f"{status}: no content declared"
                for media, entry in content.items():
                    if media == "text/event-stream":
                        if _untyped_stream(doc, response):
                            found[method, path, "response"] = f"{status}: untyped event stream"
                    elif media != "application/json":
                        found[method, path, "response"] = f"{status}: {media} has no schema"
                    elif untyped(doc, entry.get("schema")):
                        found[method, path, "response"] = f"{status}: untyped JSON"
    return found


def test_every_body_of_every_route_is_typed(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    problems = _problems(doc)
    allowed = FREE_FORM
    unexpected = {
        f"{m.upper()} {p} ({w}): {why}"
        for (m, p, w), why in problems.items()
        if (m, p, w) not in allowed
    }
    assert not unexpected, sorted(unexpected)
    stale = allowed - problems.keys()
    assert not stale, f"typed now, take them off the lists: {sorted(stale)}"


def test_the_walk_flags_what_it_should() -> None:
    """The rules themselves, on a small document: free-form objects and lists of them are
    untyped; models, maps of models, scalars and unions of typed members are not."""
    doc: Doc = {
        "components": {
            "schemas": {
                "Item": {"type": "object", "properties": {"id": {"type": "string"}}},
                "Loose": {"type": "object", "additionalProperties": True},
            }
        }
    }
    item, loose = {"$ref": "#/components/schemas/Item"}, {"$ref": "#/components/schemas/Loose"}
    for schema in (
        {},
        {"type": "object"},
        {"type": "object", "additionalProperties": True},
        {"type": "object", "additionalProperties": {"type": "string"}},
        {"type": "array", "items": {"type": "object", "additionalProperties": True}},
        loose,
        {"anyOf": [item, loose]},
    ):
        assert untyped(doc, schema), schema
    for schema in (
        item,
        {"type": "string"},
        {"type": "array", "items": item},
        {"type": "object", "additionalProperties": item},
        {"anyOf": [item, {"type": "null"}]},
    ):
        assert not untyped(doc, schema), schema


def test_an_undocumented_key_does_not_conform() -> None:
    doc: Doc = {"components": {"schemas": {}}}
    schema = {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}
    conforms(doc, schema, {"id": "x"})
    for body in ({"id": "x", "extra": 1}, {"id": 5}, {}):
        with pytest.raises(AssertionError):
            conforms(doc, schema, body)


# --------------------------------------------------------------------------- the bodies sent


class Checked:
    """Calls the API and checks each 2xx JSON answer against its route's declared schema."""

    def __init__(self, http: httpx.Client, doc: Doc) -> None:
        self.http = http
        self.doc = doc
        self.checked: set[tuple[str, str]] = set()

    def __call__(self, method: str, url: str, route: str | None = None, **kw: Any) -> Any:
        resp = self.http.request(method, url, **kw)
        assert resp.is_success, (method, url, resp.status_code, resp.text)
        route = route or url
        schema = response_schema(self.doc, route, method.lower(), resp.status_code)
        body = resp.json()
        conforms(self.doc, schema, body)
        self.checked.add((method.lower(), route))
        return body


def wait_for(fetch: Callable[[], Any], what: str) -> Any:
    """Reads are logged within about a second (changes at once): poll until one shows."""
    deadline = time.monotonic() + 15
    while not (value := fetch()):
        assert time.monotonic() < deadline, what
        time.sleep(0.2)
    return value


def _register(check: Checked) -> dict[str, Any]:
    email = f"types-{uuid.uuid4().hex[:8]}@example.com"
    password = "a long passphrase"
    registered = check("POST", "/register", json={"email": email, "password": password})
    check("POST", "/login", json={"email": email, "password": password})
    assert isinstance(registered, dict)
    return registered


def test_bodies_sent_conform_to_their_schemas(
    clean_stack: Stack, llm: ScriptedLLM, client: httpx.Client
) -> None:
    doc = client.get("/openapi.json").json()
    check = Checked(clean_stack.http, doc)
    for route in ("/health", "/ping", "/ready", "/defaultmodel", "/permissions", "/supported"):
        check("GET", route)

    registered = _register(check)
    user = Checked(
        httpx.Client(
            base_url=clean_stack.api.url,
            headers={"Authorization": f"Bearer {registered['token']}"},
            timeout=60,
        ),
        doc,
    )
    assert user("GET", "/me")["kind"] == "user"
    user("PATCH", "/me", json={"friendlyName": "Ada"})
    user("GET", "/ui/me")
    project = user("POST", "/projects", json={"name": "types"})
    user("GET", "/projects")
    user("POST", f"/projects/{project['id']}/token", route="/projects/{id}/token")
    user.http.close()
    assert check("GET", "/me")["kind"] == "bootstrap"

    backend = check(
        "POST", "/backends", json={"name": "typed", "baseUrl": llm.openai_base, "type": "openai"}
    )
    check("GET", "/backends")
    check("GET", f"/backends/{backend['id']}", route="/backends/{id}")
    check("GET", "/state")
    model = check("POST", "/models", json={"model": "gpt-4o-mini"})
    check("GET", "/models")
    group = check("POST", "/groups", json={"name": f"g-{uuid.uuid4().hex[:6]}"})
    check("GET", "/groups")
    gid, bid, mid = group["id"], backend["id"], model["id"]
    clean_stack.http.post(f"/backend-affinity/{gid}/backends/{bid}")
    clean_stack.http.post(f"/model-affinity/{gid}/models/{mid}")
    check("GET", f"/backend-affinity/{gid}/backends", route="/backend-affinity/{groupID}/backends")
    check("GET", f"/model-affinity/{gid}/models", route="/model-affinity/{groupID}/models")
    check("GET", f"/backend-affinity/{bid}/groups", route="/backend-affinity/{backendID}/groups")
    check("DELETE", f"/groups/{gid}", route="/groups/{id}")

    chain = {"id": "typed-chain", "tasks": [{"id": "a", "handler": "noop"}]}
    check("POST", "/taskchains", json=chain)
    check("GET", "/taskchains")
    check("PUT", "/taskchains/typed-chain", route="/taskchains/{id}", json=chain)
    check("GET", "/taskchains/typed-chain", route="/taskchains/{id}")
    run = check("POST", "/tasks", json={"chainId": "typed-chain", "input": "hi"})
    assert run["state"][0]["taskID"] == "a"

    name = f"fn_{uuid.uuid4().hex[:6]}"
    script = "function main(input) { return input; }"
    check("POST", "/functions", json={"name": name, "script": script})
    check("GET", f"/functions/{name}", route="/functions/{name}")
    hook = {"name": f"h_{uuid.uuid4().hex[:6]}", "endpointUrl": "http://10.255.255.1:9"}
    hook_body = check("POST", "/hooks/remote", json={**hook, "headers": {"X-Token": "secret"}})
    check("GET", "/hooks/remote")
    # The hook's document cannot be fetched (a private address): its entry is an error.
    schemas = check("GET", "/hooks/schemas")
    assert "error" in schemas[hook["name"]] and "paths" in schemas["echo"]
    check("DELETE", f"/hooks/remote/{hook_body['id']}", route="/hooks/remote/{id}")
    configure = "/providers/{providerType}/configure"
    check("POST", "/providers/gemini/configure", route=configure, json={"apiKey": "k-test"})
    check("GET", "/providers/configs")
    check("DELETE", "/providers/gemini/config", route="/providers/{providerType}/config")

    key = check("POST", "/api-keys", json={"name": "typed", "scopes": ["read"]})
    check("GET", "/api-keys")
    entry = check(
        "POST",
        "/access-control",
        json={"identity": key["id"], "resourceType": "backends", "permission": "view"},
    )
    check("GET", "/access-control", params={"expand": "user"})
    check("GET", f"/access-control/{entry['id']}", route="/access-control/{id}")
    check("DELETE", f"/access-control/{entry['id']}", route="/access-control/{id}")
    check("DELETE", f"/api-keys/{key['id']}", route="/api-keys/{id}")
    check("DELETE", f"/functions/{name}", route="/functions/{name}")
    check("GET", "/users")
    check("GET", "/tenants")
    check("GET", "/usage")
    check("GET", "/queue")

    requests = check("GET", "/activity/requests")
    check("GET", f"/activity/requests/{requests[0]['id']}", route="/activity/requests/{id}")
    started = wait_for(lambda: check("GET", "/activity/stateful-requests"), "the run's request")
    check(
        "GET", f"/activity/requests/{started[0]['id']}/state", route="/activity/requests/{id}/state"
    )
    check("GET", "/activity/operations")
    check("GET", "/activity/alerts")
    check("GET", "/audit")
    check("GET", "/system/resources")
    check("GET", "/system/services")
    check("GET", "/system/admins")
    assert len(check.checked) + len(user.checked) >= 50


def test_download_bodies_and_events_conform(
    clean_stack: Stack, llm: ScriptedLLM, client: httpx.Client
) -> None:
    """A pull on an ollama backend: the job answers and each `data:` of /queue/inProgress
    against the stream's declared itemSchema."""
    doc = client.get("/openapi.json").json()
    check = Checked(clean_stack.http, doc)
    check("POST", "/backends", json={"name": "pulls", "baseUrl": llm.url, "type": "ollama"})
    try:
        job = check("POST", "/queue", json={"model": "tinyllama:typed", "backend": "pulls"})
        check("GET", "/queue")
        stream = doc["paths"]["/queue/inProgress"]["get"]["responses"]["200"]["content"]
        item = stream["text/event-stream"]["itemSchema"]
        events = follow(clean_stack.http, job["id"])
        for event in events:
            conforms(doc, item, {"event": "status", "data": json.dumps(event)})
            conforms(doc, item["properties"]["data"]["contentSchema"], event)
        assert events[-1]["status"] == "success"
    finally:
        clean_stack.http.delete("/queue/cancel", params={"url": llm.url})
