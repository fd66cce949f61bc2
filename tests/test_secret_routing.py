"""Secrets go only where an administrator sent them, and backends go through the outbound
policy (issue #16, findings 1 and 5).

Everything runs for real: the API and worker of a stack, capture servers on 127.0.0.1 that
record every request's headers (loopback is allowlisted for backends and hooks here, so the
requests really go out and a missing header proves something), and the openai and ollama
clients with their policy transport.
"""

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from core import outbound
from core.backends.keys import same_endpoint
from core.backends.providers import BackendRef, ProviderClients, ProviderError
from core.backends.refs import approval_target, key_at_stake, key_grant
from core.models import BackendRow
from core.secrets import mask
from tests.hook_service import ALLOWLIST, HookService
from tests.stack import Stack
from tests.test_api_resources import assert_error
from tests.test_identity import bearer, register
from tests.test_privileges import add_user, new_key

MODEL = "capture-model"


class Capture:
    """A loopback HTTP server that speaks just enough of the OpenAI protocol (model list,
    chat completion) and records every request with its headers."""

    def __init__(self, status: int = 200, message: str = "") -> None:
        self.requests: list[dict[str, Any]] = []
        self.status, self.message = status, message
        capture = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                capture.requests.append({"path": self.path, "headers": headers})
                status = capture.status
                if status != 200:
                    body: Any = {"error": {"message": capture.message, "type": "invalid"}}
                elif self.path.endswith("/models"):
                    body = {
                        "object": "list",
                        "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "c"}],
                    }
                else:
                    body = {
                        "id": "c-1",
                        "object": "chat.completion",
                        "created": 0,
                        "model": MODEL,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": "captured"},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def saw(self, secret: str) -> bool:
        """Whether any recorded header carried `secret`."""
        return any(secret in value for r in self.requests for value in r["headers"].values())

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def capture() -> Iterator[Capture]:
    server = Capture()
    yield server
    server.stop()


@pytest.fixture
def other_capture() -> Iterator[Capture]:
    server = Capture()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sstack(temporal_address: str, sqlite_url: str) -> Iterator[Stack]:
    # CHAINLOOM_BACKEND_ALLOWLIST=127.0.0.1 comes with every test stack; hooks need theirs.
    s = Stack(
        temporal_address,
        sqlite_url,
        CHAINLOOM_OUTBOUND_ALLOWLIST=ALLOWLIST,
        CHAINLOOM_LLM_MAX_ATTEMPTS=2,
    )
    yield s
    s.close()


@pytest.fixture
def http(sstack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sstack.api.url, timeout=120) as client:
        yield client


@dataclass
class Tenant:
    """A fresh tenant: its admin's id, and the headers of its admin, a member and a viewer."""

    admin_id: str
    admin: dict[str, str]
    member: dict[str, str]
    viewer: dict[str, str]


def tenant(http: httpx.Client) -> Tenant:
    admin = register(http, "secrets")
    ha = bearer(admin["token"])
    member = bearer(add_user(http, ha, "member")["token"])
    return Tenant(admin["id"], ha, member, bearer(add_user(http, ha, "viewer")["token"]))


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, resp.text
    return resp.json()


def backend(name: str, base: str, kind: str = "openai") -> dict[str, str]:
    return {"name": name, "baseUrl": base, "type": kind}


def one_step(chain_id: str) -> dict[str, Any]:
    return {
        "id": chain_id,
        "tasks": [
            {
                "id": "answer",
                "handler": "prompt_to_string",
                "prompt_template": "say hi",
                "execute_config": {"model": MODEL},
            }
        ],
    }


# --------------------------------------------------------------------------- the rules


def test_endpoint_comparison_and_key_grants() -> None:
    bound = "https://api.openai.com/v1"
    assert same_endpoint(bound, "https://API.openai.com:443/v1/")
    assert not same_endpoint(bound, "http://api.openai.com/v1")
    assert not same_endpoint(bound, "https://api.openai.com/v2")
    # A host hidden behind user info, a query or a fragment is never "the same".
    assert not same_endpoint(bound, "https://api.openai.com@evil.example/v1")
    assert not same_endpoint("https://api.openai.com:443@evil.example/v1", bound)
    assert not same_endpoint(bound, "https://api.openai.com/v1?x=1")

    row = BackendRow(tenant_id="t", name="b", base_url="http://10.0.0.9/v1", type="openai")
    assert key_grant(row, bound) == ""  # another URL, not approved
    assert key_grant(row, None) == ""  # no key stored
    row.approved_by, row.approved_for = "admin", approval_target("openai", row.base_url)
    assert key_grant(row, bound) == "approved"
    row.base_url = "http://10.0.0.10/v1"  # moved behind the approval's back
    assert key_grant(row, bound) == ""
    row.base_url = bound
    assert key_grant(row, bound) == "bound"
    ollama = BackendRow(tenant_id="t", name="o", base_url=bound, type="ollama")
    assert key_grant(ollama, bound) == ""  # the ollama client never sends a key

    assert key_at_stake("openai", "http://x/v1", {"openai": bound})
    assert not key_at_stake("openai", bound + "/", {"openai": bound})
    assert not key_at_stake("openai", "http://x/v1", {})
    assert not key_at_stake("ollama", "http://x", {"ollama": ""})
    assert key_at_stake("vllm", "http://x/v1", {"vllm": ""})  # bound to no URL


# --------------------------------------------------------------------------- backends


def test_member_backend_never_receives_the_provider_key(
    sstack: Stack, http: httpx.Client, capture: Capture, other_capture: Capture
) -> None:
    t = tenant(http)
    ha, hm = t.admin, t.member
    # Before any key is stored a member may point a backend anywhere the policy allows.
    mine = ok(http.post("/backends", json=backend("member-be", capture.base), headers=hm), 201)
    assert mine["providerKey"] == "none"

    secret = "sk-" + uuid.uuid4().hex
    stored = http.post("/providers/openai/configure", json={"apiKey": secret}, headers=ha)
    assert ok(stored, 201)["baseUrl"] == "https://api.openai.com/v1"

    # Now a backend at an unbound URL would carry the key: creating or re-pointing one is
    # for admins.
    refused = assert_error(
        http.post("/backends", json=backend("member-2", capture.base), headers=hm), 403, "forbidden"
    )
    message = refused["error"]["message"]
    assert "only an admin" in message and "openai provider key" in message
    assert "https://api.openai.com/v1" in message and refused["error"]["param"] == "baseUrl"
    moved = backend("member-be", other_capture.base)
    assert_error(http.put(f"/backends/{mine['id']}", json=moved, headers=hm), 403, "forbidden")
    # At the key's own URL the key goes where the admin sent it: allowed.
    at_home = http.post(
        "/backends", json=backend("official", "https://api.openai.com/v1/"), headers=hm
    )
    assert ok(at_home, 201)["providerKey"] == "bound"
    ok(http.delete(f"/backends/{at_home.json()['id']}", headers=hm))

    theirs = ok(
        http.post("/backends", json=backend("admin-be", other_capture.base), headers=ha), 201
    )
    assert theirs["providerKey"] == "approved"

    # The status probe lists both: only the admin's backend is sent the key.
    listed = {b["name"]: b for b in ok(http.get("/backends", headers=hm))}
    assert listed["member-be"]["providerKey"] == "none"
    assert listed["member-be"]["models"] == [MODEL] and listed["admin-be"]["models"] == [MODEL]
    assert capture.requests and not capture.saw(secret)
    assert all("authorization" not in r["headers"] for r in capture.requests)
    assert other_capture.saw(secret)  # the positive control: the capture does see keys

    # A model call routed to the member's backend (created first) carries no key either.
    capture.requests.clear()
    answer = http.post("/tasks", json={"chain": one_step("cap"), "input": ""}, headers=hm)
    assert ok(answer)["state"][0]["backend"] == "member-be"
    assert any(r["path"].endswith("/chat/completions") for r in capture.requests)
    assert not capture.saw(secret)

    # A member may still rename the admin's backend (the approval stays), not move it.
    renamed = {**backend("admin-renamed", other_capture.base)}
    assert ok(http.put(f"/backends/{theirs['id']}", json=renamed, headers=hm))["providerKey"] == (
        "approved"
    )
    away = backend("admin-renamed", capture.base)
    assert_error(http.put(f"/backends/{theirs['id']}", json=away, headers=hm), 403, "forbidden")
    # An admin re-pointing (or saving) a backend approves it where it points.
    approved = ok(
        http.put(f"/backends/{mine['id']}", json=backend("member-be", capture.base), headers=ha)
    )
    assert approved["providerKey"] == "approved"
    capture.requests.clear()
    ok(http.get(f"/backends/{mine['id']}", headers=hm))
    assert capture.saw(secret)

    # The audit log says who approved what.
    entries = ok(http.get("/audit", params={"subject": "backends"}, headers=ha))
    approvals = [e for e in entries if e["detail"] and "approved" in e["detail"]]
    assert {e["identity"] for e in approvals} == {t.admin_id}
    assert any(f"openai {capture.base}" in e["detail"] for e in approvals)
    refusals = [e for e in entries if e["status"] == 403]
    assert refusals and all(e["detail"] is None for e in refusals)
    keys = ok(http.get("/audit", params={"subject": "providers"}, headers=ha))
    assert keys[0]["detail"] == "openai key set, bound to https://api.openai.com/v1"


def test_vllm_key_bound_to_no_url_reaches_approved_backends_only(
    http: httpx.Client, capture: Capture
) -> None:
    t = tenant(http)
    ha, hm = t.admin, t.member
    secret = "vllm-" + uuid.uuid4().hex
    body = {"apiKey": secret, "baseUrl": capture.base + "/"}
    assert ok(http.post("/providers/vllm/configure", json=body, headers=hm), 201)["baseUrl"] == (
        capture.base
    )
    # Bound by whoever knew the key: a member's backend at that URL gets it.
    ok(http.post("/backends", json=backend("v", capture.base, "vllm"), headers=hm), 201)
    ok(http.get("/backends", headers=hm))
    assert capture.saw(secret)
    # Rebinding to no URL: now only what an admin approves gets the key.
    body = {"apiKey": secret, "baseUrl": "", "upsert": True}
    assert ok(http.post("/providers/vllm/configure", json=body, headers=ha))["baseUrl"] == ""
    capture.requests.clear()
    listed = ok(http.get("/backends", headers=hm))
    assert listed[0]["providerKey"] == "none" and not capture.saw(secret)


# --------------------------------------------------------------------------- hooks


def test_repointed_hook_never_takes_its_secret_headers_along(
    sstack: Stack, http: httpx.Client
) -> None:
    home, elsewhere = HookService().start(), HookService().start()
    try:
        t = tenant(http)
        ha, hm = t.admin, t.member
        body = {
            "name": "weather",
            "endpointUrl": home.url,
            "headers": {"X-Service-Token": home.token},
        }
        hook = ok(http.post("/hooks/remote", json=body, headers=ha), 201)
        masked = {"X-Service-Token": mask(home.token)}

        # Moving it with the stored secret (sent back masked) is for admins.
        move = {**body, "endpointUrl": elsewhere.url, "headers": masked}
        refused = assert_error(
            http.put(f"/hooks/remote/{hook['id']}", json=move, headers=hm), 403, "forbidden"
        )
        assert "X-Service-Token" in refused["error"]["message"]
        assert refused["error"]["param"] == "headers"
        # Moving it without the headers drops them, for everyone.
        bare = {k: v for k, v in move.items() if k != "headers"}
        moved = ok(http.put(f"/hooks/remote/{hook['id']}", json=bare, headers=hm))
        assert moved["headers"] == {} and moved["endpointUrl"] == elsewhere.url
        ok(http.get("/hooks/schemas", headers=hm))  # fetches <endpoint>/openapi.json
        chain = {
            "id": "hooked",
            "tasks": [
                {
                    "id": "call",
                    "handler": "hook",
                    "hook": {"name": "weather", "tool_name": "get_weather", "args": {"city": "X"}},
                }
            ],
        }
        http.post("/tasks", json={"chain": chain, "input": ""}, headers=hm)
        assert elsewhere.calls("/openapi.json") and elsewhere.calls("/weather/X")
        assert all("x-service-token" not in r["headers"] for r in elsewhere.requests)

        # An admin re-pointing it without re-sending the headers sends none either.
        back = {**body, "headers": {"X-Service-Token": home.token}}
        ok(http.put(f"/hooks/remote/{hook['id']}", json=back, headers=ha))
        elsewhere.reset()
        ok(http.put(f"/hooks/remote/{hook['id']}", json=bare, headers=ha))
        ok(http.get("/hooks/schemas", headers=ha))
        assert elsewhere.calls("/openapi.json")
        assert all("x-service-token" not in r["headers"] for r in elsewhere.requests)

        # The admin may keep a secret at a new URL by sending it back masked (the control).
        ok(http.put(f"/hooks/remote/{hook['id']}", json=back, headers=ha))
        elsewhere.reset()
        kept = ok(http.put(f"/hooks/remote/{hook['id']}", json=move, headers=ha))
        assert kept["headers"] == masked
        ok(http.get("/hooks/schemas", headers=ha))
        assert elsewhere.calls("/openapi.json")[-1]["headers"]["x-service-token"] == home.token

        entries = ok(http.get("/audit", params={"subject": "hooks"}, headers=ha))
        details = [(e["identity"], e["detail"]) for e in entries if e["detail"]]
        member_drop = [d for who, d in details if who != t.admin_id]
        assert any("stored secret headers dropped: X-Service-Token" in d for d in member_drop)
        assert any("kept at the new URL: X-Service-Token" in d for _, d in details)
    finally:
        home.stop()
        elsewhere.stop()


# --------------------------------------------------------------------------- the policy


async def test_backend_clients_obey_the_outbound_policy(capture: Capture) -> None:
    ref = BackendRef("b", "cap", "openai", capture.base, api_key="sk-never-sent")
    strict = ProviderClients(timeout=5, allowlist="")
    try:
        with pytest.raises(ProviderError) as info:
            await strict.list_models(ref)
        err = info.value
        assert err.refused and not err.transient and err.public == "backend cap: refused"
        assert "127.0.0.1 is a loopback address" in str(err)
        assert "CHAINLOOM_BACKEND_ALLOWLIST" in str(err)
        for url in ("http://10.1.2.3:11434", "http://169.254.169.254", "http://[::1]:9"):
            for kind in ("openai", "ollama"):
                with pytest.raises(ProviderError) as info:
                    await strict.list_models(BackendRef("p", "p", kind, url))
                assert info.value.refused, (url, kind, info.value)
        assert capture.requests == []  # refused before any connection
    finally:
        await strict.close()

    # Allowlisted, a host name goes to the address it was checked at, under its own name.
    open_ = ProviderClients(timeout=5, allowlist="127.0.0.1")
    try:
        named = BackendRef("n", "named", "openai", f"http://localhost:{capture.port}/v1")
        assert await open_.list_models(named) == [MODEL]
        assert capture.requests[-1]["headers"]["host"] == f"localhost:{capture.port}"
        # A backend given no key sends no Authorization header at all.
        assert "authorization" not in capture.requests[-1]["headers"]
        # 127.0.0.2 is loopback too, and not on the list.
        with pytest.raises(ProviderError) as info:
            await open_.list_models(BackendRef("l", "l", "ollama", "http://127.0.0.2:9"))
        assert info.value.refused
    finally:
        await open_.close()


async def test_backend_clients_connect_only_to_checked_addresses(
    capture: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name answering with a private and an allowlisted address goes to the allowlisted
    one only; a name that resolves to private addresses alone is refused (DNS rebinding)."""
    table = {"mixed.test": ["10.9.9.9", "127.0.0.1"], "inside.test": ["10.9.9.9"]}
    monkeypatch.setattr(outbound, "_getaddrinfo", lambda host, port: table[host])
    clients = ProviderClients(timeout=5, allowlist="127.0.0.1")
    try:
        mixed = BackendRef("m", "mixed", "openai", f"http://mixed.test:{capture.port}/v1")
        assert await clients.list_models(mixed) == [MODEL]
        assert capture.requests[-1]["headers"]["host"] == f"mixed.test:{capture.port}"
        inside = BackendRef("i", "inside", "ollama", f"http://inside.test:{capture.port}")
        with pytest.raises(ProviderError) as info:
            await clients.list_models(inside)
        assert info.value.refused and "inside.test resolves to 10.9.9.9" in str(info.value)
        assert len(capture.requests) == 1
    finally:
        await clients.close()


def test_non_admins_read_unreachable_where_admins_read_the_upstream_message(
    sstack: Stack, http: httpx.Client
) -> None:
    upstream = Capture(status=401, message="the API key is not valid")
    try:
        t = tenant(http)
        ha, hm, hv = t.admin, t.member, t.viewer
        reader = {"X-API-Key": new_key(http, ha["Authorization"].split()[1], ["read"])}
        probe = ok(http.post("/backends", json=backend("probe", upstream.base), headers=ha), 201)
        ok(
            http.post(
                "/backends", json=backend("private", "http://10.255.255.1:11434"), headers=ha
            ),
            201,
        )

        full = {b["name"]: b["error"] for b in ok(http.get("/backends", headers=ha))}
        assert "HTTP 401: the API key is not valid" in full["probe"]
        assert "refused: 10.255.255.1 is a private address" in full["private"]
        assert "CHAINLOOM_BACKEND_ALLOWLIST" in full["private"]
        for who in (hm, hv, reader):
            shown = {b["name"]: b["error"] for b in ok(http.get("/backends", headers=who))}
            assert shown == {"probe": "unreachable", "private": "refused"}, shown
            one = ok(http.get(f"/backends/{probe['id']}", headers=who))
            assert one["error"] == "unreachable"

        # A run says which backend failed and no more; /state keeps the detail for admins.
        failed = http.post("/tasks", json={"chain": one_step("probe"), "input": ""}, headers=hm)
        assert failed.status_code == 422, failed.text
        text = failed.text
        assert "backend probe: unreachable" in text and "backend private: refused" in text
        assert "not valid" not in text and "10.255.255.1" not in text and "HTTP 401" not in text
        state = {s["name"]: s["error"] for s in ok(http.get("/state", headers=ha))}
        assert "the API key is not valid" in state["probe"]
        assert "10.255.255.1 is a private address" in state["private"]
        for who in (hm, hv, reader):
            shown = {s["name"]: s["error"] for s in ok(http.get("/state", headers=who))}
            assert shown == {"probe": "unreachable", "private": "refused"}, shown
    finally:
        upstream.stop()
