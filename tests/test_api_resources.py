"""The API's plumbing over real HTTP: error shape, auth, /backends, /models and the OpenAPI doc."""

import json
from typing import Any

import httpx
import pytest

from tests.scripted_llm import ScriptedLLM
from tests.stack import Stack

LLM_MODELS = {"gpt-4o-mini", "llama3.2", "nomic-embed-text"}


def assert_error(
    resp: httpx.Response, status: int, code: str, *, param: str | None = None
) -> dict[str, Any]:
    """Both error shapes the seeds' clients read: OpenAI/seed 003 and seed 000."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    error = body["error"]
    assert set(error) == {"code", "message", "param", "type"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] == param
    assert body["detail"] == error["message"]
    assert body["error_code"] == code
    assert isinstance(body["errors"], list)
    return body


def add_backend(
    stack: Stack, name: str, base_url: str, kind: str = "openai", status: int = 201
) -> dict[str, Any]:
    resp = stack.http.post("/backends", json={"name": name, "baseUrl": base_url, "type": kind})
    assert resp.status_code == status, resp.text
    return resp.json()


# --------------------------------------------------------------------------- error shape


def test_error_shape_on_every_kind(clean_stack: Stack, llm: ScriptedLLM) -> None:
    http = clean_stack.http
    # 404: a resource that does not exist
    body = assert_error(http.get("/backends/nope"), 404, "not_found")
    assert body["error"]["type"] == "not_found_error"
    assert "nope" in body["error"]["message"]
    # 404: a route that does not exist
    assert_error(http.get("/no/such/route"), 404, "not_found")
    # 405: a method the route does not take
    body = assert_error(http.delete("/health"), 405, "method_not_allowed")
    # 409: a duplicate
    add_backend(clean_stack, "dup", llm.openai_base)
    body = assert_error(
        http.post("/backends", json={"name": "dup", "baseUrl": llm.openai_base, "type": "openai"}),
        409,
        "already_exists",
    )
    assert body["error"]["type"] == "conflict_error"
    # 400: bad query parameters
    assert_error(
        http.get("/backends", params={"limit": "ten"}), 400, "invalid_limit", param="limit"
    )
    assert_error(http.get("/backends", params={"limit": "0"}), 400, "invalid_limit", param="limit")
    assert_error(
        http.get("/models", params={"cursor": "yesterday"}), 400, "invalid_cursor", param="cursor"
    )
    # 401 is covered in test_auth; 422 (one entry per invalid field):
    resp = http.post("/backends", json={"name": "", "type": "bogus"})
    body = assert_error(resp, 422, "validation_error")
    assert body["error"]["type"] == "invalid_request_error"
    fields = sorted(e["field"] for e in body["errors"])
    assert fields == ["/baseUrl", "/name", "/type"]
    for entry in body["errors"]:
        assert entry["message"] and entry["code"]
    assert body["error"]["param"] in fields
    for field in fields:
        assert field in body["error"]["message"]


def test_nul_in_a_json_string_is_never_a_500(stack: Stack) -> None:
    """Found by fuzzing: PostgreSQL text cannot hold NUL, and the refused insert was a 500."""
    postgres = stack.settings.resolved_database_url().startswith("postgresql")
    for path, body in (
        ("/models", {"model": "nul\x00model"}),
        ("/events", {"event_type": "a\x00"}),
    ):
        resp = stack.http.post(path, json=body)
        if postgres:
            message = assert_error(resp, 422, "invalid_value")["error"]["message"]
            assert "NUL" in message, message
        else:  # SQLite stores it as it is
            assert resp.status_code == 201, resp.text
            if path == "/models":
                stack.http.delete(f"/models/{resp.json()['id']}")


@pytest.mark.parametrize("path", ["/backends", "/models", "/taskchains", "/runs", "/tasks"])
def test_malformed_json_is_422_not_500(stack: Stack, path: str) -> None:
    resp = stack.http.post(
        path, content=b'{"name": "x", oops', headers={"content-type": "application/json"}
    )
    body = assert_error(resp, 422, "validation_error")
    assert body["errors"] and body["errors"][0]["code"] == "json_invalid"


def test_non_object_bodies_are_422(stack: Stack) -> None:
    for path in ("/backends", "/models", "/taskchains", "/runs"):
        resp = stack.http.post(path, json=["not", "an", "object"])
        assert resp.status_code == 422, (path, resp.text)
        assert resp.json()["error_code"] in ("validation_error", "invalid_chain")


# --------------------------------------------------------------------------- auth


def test_auth(stack: Stack) -> None:
    with httpx.Client(base_url=stack.api.url, timeout=30) as anon:
        assert anon.get("/health").json()["status"] == "ok"
        for path in ("/backends", "/models", "/taskchains", "/runs", "/taskchains/schema"):
            resp = anon.get(path)
            assert_error(resp, 401, "missing_api_key")
            assert resp.json()["error"]["type"] == "authentication_error"
            assert resp.headers["www-authenticate"] == "Bearer"
        assert_error(anon.post("/runs", json={}), 401, "missing_api_key")
        assert_error(anon.get("/backends", headers={"X-API-Key": "wrong"}), 401, "invalid_api_key")
        assert_error(
            anon.get("/backends", headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key"
        )
        # A right key in the wrong scheme is not a bearer token.
        assert_error(
            anon.get("/backends", headers={"Authorization": f"Basic {stack.API_KEY}"}),
            401,
            "missing_api_key",
        )
        ok = anon.get("/backends", headers={"X-API-Key": stack.API_KEY})
        assert ok.status_code == 200, ok.text
        ok = anon.get("/models", headers={"Authorization": f"Bearer {stack.API_KEY}"})
        assert ok.status_code == 200, ok.text


def test_unknown_route_is_json_404(stack: Stack) -> None:
    with httpx.Client(base_url=stack.api.url, timeout=30) as anon:
        assert_error(anon.get("/definitely/not/here"), 404, "not_found")
    assert_error(stack.http.post("/backends/x/y", json={}), 404, "not_found")


# --------------------------------------------------------------------------- /backends


def test_backends_crud(clean_stack: Stack, llm: ScriptedLLM) -> None:
    http = clean_stack.http
    created = {}
    for kind in ("openai", "ollama", "vllm"):
        base = llm.url if kind == "ollama" else llm.openai_base
        data = add_backend(clean_stack, f"b-{kind}", base + "/", kind)
        assert data["name"] == f"b-{kind}" and data["type"] == kind
        assert data["baseUrl"] == base  # trailing slash dropped
        assert data["id"] and data["createdAt"].endswith("Z") and data["updatedAt"]
        created[kind] = data

    got = http.get(f"/backends/{created['openai']['id']}")
    assert got.status_code == 200, got.text
    assert set(got.json()["models"]) == LLM_MODELS
    assert got.json()["error"] == ""
    assert {m["model"] for m in got.json()["pulledModels"]} == LLM_MODELS

    listed = http.get("/backends").json()
    assert [b["name"] for b in listed] == ["b-openai", "b-ollama", "b-vllm"]
    assert [b["name"] for b in http.get("/backends", params={"limit": 2}).json()] == [
        "b-openai",
        "b-ollama",
    ]

    # PUT: rename and move to another URL; the id stays.
    ident = created["vllm"]["id"]
    resp = http.put(
        f"/backends/{ident}", json={"name": "b-vllm2", "baseUrl": llm.openai_base, "type": "vllm"}
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["id"] == ident and resp.json()["name"] == "b-vllm2"
    assert resp.json()["updatedAt"] >= created["vllm"]["updatedAt"]
    assert http.get(f"/backends/{ident}").json()["name"] == "b-vllm2"
    # PUT onto another backend's name is a conflict too.
    assert_error(
        http.put(
            f"/backends/{ident}",
            json={"name": "b-openai", "baseUrl": llm.openai_base, "type": "vllm"},
        ),
        409,
        "already_exists",
    )
    assert_error(
        http.put("/backends/missing", json={"name": "z", "baseUrl": llm.url, "type": "ollama"}),
        404,
        "not_found",
    )

    resp = http.delete(f"/backends/{ident}")
    assert resp.status_code == 200, resp.text
    assert_error(http.get(f"/backends/{ident}"), 404, "not_found")
    assert_error(http.delete(f"/backends/{ident}"), 404, "not_found")
    assert len(http.get("/backends").json()) == 2


def test_backend_validation(clean_stack: Stack, llm: ScriptedLLM) -> None:
    http = clean_stack.http
    resp = http.post("/backends", json={"name": "x", "baseUrl": llm.url, "type": "anthropic"})
    assert_error(resp, 422, "validation_error", param="/type")
    for bad in ("ftp://example.com", "localhost:11434", "not a url", "http://"):
        resp = http.post("/backends", json={"name": "x", "baseUrl": bad, "type": "ollama"})
        body = assert_error(resp, 422, "validation_error", param="/baseUrl")
        assert [e["field"] for e in body["errors"]] == ["/baseUrl"]
    add_backend(clean_stack, "same", llm.url, "ollama")
    body = assert_error(
        http.post("/backends", json={"name": "same", "baseUrl": llm.openai_base, "type": "openai"}),
        409,
        "already_exists",
    )
    assert "same" in body["error"]["message"]
    assert len(http.get("/backends").json()) == 1


def test_backend_list_shows_live_models_and_errors(clean_stack: Stack, llm: ScriptedLLM) -> None:
    llm.models[:] = ["gpt-4o-mini", "llama3.2"]
    add_backend(clean_stack, "live-openai", llm.openai_base, "openai")
    add_backend(clean_stack, "live-ollama", llm.url, "ollama")
    add_backend(clean_stack, "dead", "http://127.0.0.1:1", "ollama")
    add_backend(clean_stack, "dead-openai", "http://127.0.0.1:1/v1", "openai")
    resp = clean_stack.http.get("/backends")
    assert resp.status_code == 200, resp.text
    by_name = {b["name"]: b for b in resp.json()}
    assert by_name["live-openai"]["models"] == ["gpt-4o-mini", "llama3.2"]
    assert by_name["live-openai"]["error"] == ""
    assert by_name["live-ollama"]["models"] == ["gpt-4o-mini:latest", "llama3.2:latest"]
    assert by_name["live-ollama"]["error"] == ""
    for name in ("dead", "dead-openai"):
        assert by_name[name]["models"] == [] and by_name[name]["pulledModels"] == []
        assert "dead" in by_name[name]["error"] and "127.0.0.1:1" in by_name[name]["error"]
    # The model list is live, not a snapshot taken when the backend was added.
    llm.models.append("qwen2.5")
    live = clean_stack.http.get("/backends").json()
    assert "qwen2.5" in next(b for b in live if b["name"] == "live-openai")["models"]


# --------------------------------------------------------------------------- /models


def test_models_crud(clean_stack: Stack) -> None:
    http = clean_stack.http
    spec = {
        "model": "llama3.2",
        "canChat": True,
        "canEmbed": False,
        "canPrompt": False,
        "canStream": False,
        "contextLength": 8192,
    }
    resp = http.post("/models", json=spec)
    assert resp.status_code == 201, resp.text
    model = resp.json()
    assert {k: model[k] for k in spec} == spec
    assert model["id"] and model["createdAt"] and model["updatedAt"]

    # Defaults when only the name is given.
    embed = http.post("/models", json={"model": "nomic-embed-text"}).json()
    assert embed["canChat"] is True and embed["canEmbed"] is False
    assert embed["canPrompt"] is True and embed["canStream"] is True
    assert embed["contextLength"] == 0

    assert_error(http.post("/models", json=spec), 409, "already_exists")
    assert [m["model"] for m in http.get("/models").json()] == ["llama3.2", "nomic-embed-text"]
    assert [m["model"] for m in http.get("/models", params={"limit": 1}).json()] == ["llama3.2"]

    changed = {**spec, "canEmbed": True, "canStream": True, "contextLength": 131072}
    resp = http.put(f"/models/{model['id']}", json=changed)
    assert resp.status_code == 200, resp.text
    assert {k: resp.json()[k] for k in changed} == changed
    assert resp.json()["id"] == model["id"]
    assert resp.json()["createdAt"] == model["createdAt"]
    stored = next(m for m in http.get("/models").json() if m["id"] == model["id"])
    assert {k: stored[k] for k in changed} == changed

    body = assert_error(
        http.put(f"/models/{model['id']}", json={**changed, "model": "llama3.3"}),
        422,
        "immutable_field",
        param="model",
    )
    assert body["error"]["type"] == "invalid_request_error"
    assert_error(
        http.post("/models", json={"model": "x", "contextLength": -1}),
        422,
        "validation_error",
        param="/contextLength",
    )
    # Found by fuzzing: past a 32-bit integer PostgreSQL refused the insert (a 500).
    assert_error(
        http.post("/models", json={"model": "x", "contextLength": 2**53}),
        422,
        "validation_error",
        param="/contextLength",
    )
    assert_error(http.post("/models", json={"model": ""}), 422, "validation_error")
    assert_error(http.put("/models/missing", json=spec), 404, "not_found")

    assert http.delete(f"/models/{model['id']}").status_code == 200
    assert_error(http.delete(f"/models/{model['id']}"), 404, "not_found")
    assert [m["model"] for m in http.get("/models").json()] == ["nomic-embed-text"]


# --------------------------------------------------------------------------- OpenAPI


def test_openapi_lists_every_route(stack: Stack) -> None:
    with httpx.Client(base_url=stack.api.url, timeout=30) as anon:
        resp = anon.get("/openapi.json")
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    paths = doc["paths"]
    expected = {
        "/taskchains": {"get", "post"},
        "/taskchains/{id}": {"get", "put", "delete"},
        "/taskchains/schema": {"get"},
        "/tasks": {"post"},
        "/runs": {"get", "post"},
        "/runs/{id}": {"get"},
        "/runs/{id}/approve": {"post"},
        "/runs/{id}/cancel": {"post"},
        "/backends": {"get", "post"},
        "/backends/{id}": {"get", "put", "delete"},
        "/models": {"get", "post"},
        "/models/{id}": {"put", "delete"},
        "/health": {"get"},
    }
    for path, methods in expected.items():
        assert path in paths, f"{path} missing from /openapi.json"
        assert methods <= set(paths[path]), (path, sorted(paths[path]))
    # 422 is declared with the body the error handler sends (not FastAPI's default shape).
    declared = paths["/models"]["post"]["responses"]["422"]["content"]["application/json"]
    assert declared["schema"]["$ref"] == "#/components/schemas/ErrorBody"
    error_body = doc["components"]["schemas"]["ErrorBody"]
    assert set(error_body["required"]) == {"error", "detail", "error_code", "errors"}
    assert error_body["properties"]["detail"]["type"] == "string"
    assert "HTTPValidationError" not in json.dumps(doc)
    schemes = doc["components"]["securitySchemes"]
    kinds = {(s["type"], s.get("name") or s.get("scheme")) for s in schemes.values()}
    assert ("apiKey", "X-API-Key") in kinds and ("http", "bearer") in kinds
    # Secured routes say so; /health does not.
    assert paths["/backends"]["get"].get("security")
    assert not paths["/health"]["get"].get("security")
