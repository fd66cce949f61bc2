"""/health, /ping, /ready and /system over real HTTP, with Temporal and Qdrant going away."""

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from core.db import Database
from core.devserver import free_port, start_dev_server, stop_process
from core.identity.credentials import new_api_key
from core.models import ApiKeyRow
from tests.stack import ApiThread, Stack


def make_key(database_url: str, tenant_id: str, scopes: list[str]) -> str:
    """An API key written straight to the database (the /api-keys routes are not needed)."""
    key = new_api_key()
    db = Database(database_url)
    try:
        with db.session() as session:
            session.add(
                ApiKeyRow(
                    tenant_id=tenant_id,
                    name="test",
                    prefix=key.prefix,
                    key_hash=key.digest,
                    scopes=scopes,
                )
            )
            session.commit()
    finally:
        db.dispose()
    return key.plain


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s")


def test_health_needs_no_auth(stack: Stack) -> None:
    resp = httpx.get(f"{stack.api.url}/health")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok" and body["version"]
    assert body["uptimeSeconds"] >= 0 and body["memoryMB"] > 0
    # Liveness does not count as traffic: it is not rate-limited or logged.
    assert "x-ratelimit-limit" not in resp.headers


def test_ping(stack: Stack) -> None:
    resp = httpx.get(f"{stack.api.url}/ping")
    assert resp.status_code == 200 and resp.json() == {"msg": "pong"}


def test_ready_with_everything_up(stack: Stack) -> None:
    resp = httpx.get(f"{stack.api.url}/ready")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "ready"
    checks = body["checks"]
    assert checks["database"]["ok"] and checks["database"]["latencyMs"] >= 0
    assert checks["temporal"]["ok"] and checks["temporal"]["latencyMs"] >= 0
    assert checks["qdrant"] == {"ok": True, "skipped": True}
    assert body["totalLatencyMs"] >= 0


@pytest.fixture
def own_api(sqlite_url: str) -> Iterator[Callable[..., ApiThread]]:
    """Starts APIs (no worker) with given settings; stops them afterwards."""
    started: list[ApiThread] = []

    def start(temporal_address: str, **overrides: Any) -> ApiThread:
        settings = Stack.settings_for(temporal_address, sqlite_url, **overrides)
        api = ApiThread(settings).start()
        started.append(api)
        return api

    yield start
    for api in started:
        api.stop()


def test_ready_fails_without_temporal_and_recovers(
    own_api: Callable[..., ApiThread],
) -> None:
    port = free_port()
    proc = start_dev_server(None, port)
    try:
        api = own_api(f"127.0.0.1:{port}", CHAINLOOM_READY_TIMEOUT=2)
        ready = f"{api.url}/ready"
        assert httpx.get(ready, timeout=30).status_code == 200
        stop_process(proc)

        resp = httpx.get(ready, timeout=30)
        assert resp.status_code == 503, resp.text
        body = resp.json()
        assert body["status"] == "not_ready"
        assert body["checks"]["database"]["ok"]
        assert not body["checks"]["temporal"]["ok"] and body["checks"]["temporal"]["error"]
        # Liveness is unaffected by a dependency being down.
        assert httpx.get(f"{api.url}/health").status_code == 200

        proc = start_dev_server(None, port)
        wait_for(
            lambda: httpx.get(ready, timeout=30).status_code == 200,
            60,
            "/ready did not recover after Temporal came back",
        )
    finally:
        stop_process(proc)


def test_ready_when_temporal_was_never_up(own_api: Callable[..., ApiThread]) -> None:
    api = own_api(f"127.0.0.1:{free_port()}", CHAINLOOM_READY_TIMEOUT=2)
    resp = httpx.get(f"{api.url}/ready", timeout=30)
    assert resp.status_code == 503
    check = resp.json()["checks"]["temporal"]
    # The public answer names the failure but no address: /system/services has the detail.
    assert check["error"] == "unreachable" and "127.0.0.1" not in resp.text


class _Qdrant(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = type(self).status if self.path == "/readyz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_ready_checks_qdrant_when_configured(
    temporal_address: str, own_api: Callable[..., ApiThread]
) -> None:
    handler = type("Qdrant", (_Qdrant,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        api = own_api(temporal_address, CHAINLOOM_QDRANT_URL=url)
        resp = httpx.get(f"{api.url}/ready", timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.json()["checks"]["qdrant"]["ok"]

        handler.status = 503
        resp = httpx.get(f"{api.url}/ready", timeout=30)
        assert resp.status_code == 503
        assert resp.json()["checks"]["qdrant"]["error"] == "unreachable (RuntimeError)"
        assert url not in resp.text

        services = httpx.get(
            f"{api.url}/system/services", headers={"X-API-Key": Stack.API_KEY}, timeout=30
        ).json()
        qdrant = next(s for s in services if s["name"] == "qdrant")
        assert qdrant["status"] == "down" and qdrant["url"] == url
    finally:
        server.shutdown()
        server.server_close()


def test_system_resources(stack: Stack) -> None:
    resp = stack.http.get("/system/resources")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["cpu"]["count"] >= 1 and len(body["cpu"]["loadAverage"]) == 3
    assert 0 < body["memory"]["usedMB"] <= body["memory"]["totalMB"]
    assert body["disk"]["totalMB"] > 0 and body["disk"]["path"]
    process = body["process"]
    assert process["rssMB"] > 0 and process["threads"] >= 1 and process["openFiles"] >= 1
    assert process["uptimeSeconds"] >= 0


def test_system_services(stack: Stack) -> None:
    resp = stack.http.get("/system/services")
    assert resp.status_code == 200, resp.text
    services = {s["name"]: s for s in resp.json()}
    assert services["api"]["status"] == "up"
    dialect = (
        "sqlite" if stack.settings.resolved_database_url().startswith("sqlite") else "postgresql"
    )
    assert services["database"] == {**services["database"], "status": "up", "dialect": dialect}
    temporal = services["temporal"]
    assert temporal["status"] == "up" and temporal["address"] == stack.settings.temporal_address
    assert temporal["namespace"] == stack.settings.temporal_namespace
    # The stack's worker polls its task queue for workflow and activity tasks.
    workers = services["workers"]
    assert workers["status"] == "up", workers
    assert workers["workflowPollers"] >= 1 and workers["activityPollers"] >= 1
    assert workers["pollers"] == workers["workflowPollers"] + workers["activityPollers"]
    assert services["qdrant"]["status"] == "not_configured"
    assert "redis" not in services


def test_system_is_for_system_admins_only(stack: Stack) -> None:
    tenant_admin = make_key(
        stack.settings.resolved_database_url(), stack.settings.default_tenant, ["admin"]
    )
    with httpx.Client(base_url=stack.api.url, headers={"X-API-Key": tenant_admin}) as http:
        assert http.get("/backends").status_code == 200  # the key itself works
        for path in ("/system/resources", "/system/services"):
            resp = http.get(path)
            assert resp.status_code == 403, resp.text
            assert resp.json()["error"]["code"] == "forbidden"
    for path in ("/system/resources", "/system/services"):
        assert httpx.get(f"{stack.api.url}{path}").status_code == 401


def test_unknown_worker_queue_has_no_pollers(
    temporal_address: str, own_api: Callable[..., ApiThread]
) -> None:
    api = own_api(temporal_address, CHAINLOOM_TASK_QUEUE="nobody-" + uuid.uuid4().hex[:8])
    resp = httpx.get(f"{api.url}/system/services", headers={"X-API-Key": Stack.API_KEY}, timeout=30)
    workers = next(s for s in resp.json() if s["name"] == "workers")
    assert workers["status"] == "down" and workers["pollers"] == 0


def test_a_nul_in_the_url_is_refused_before_any_route(stack: Stack) -> None:
    """PostgreSQL text cannot hold NUL; without this, ids with %00 were 500s there."""
    for path in ("/backends/a%00b", "/users/%00", "/api-keys/x%00", "/taskchains?cursor=%00"):
        resp = stack.http.get(path)
        assert resp.status_code == 400, (path, resp.text)
        assert resp.json()["error"]["code"] == "invalid_request"
    assert stack.http.get("/backends").status_code == 200


def test_a_cursor_past_the_last_datetime_is_a_400(stack: Stack) -> None:
    for path, param in (("/audit", "from"), ("/api-keys", "cursor"), ("/taskchains", "cursor")):
        resp = stack.http.get(path, params={param: "9999-12-31T23:59:59-05:00"})
        assert resp.status_code == 400, (path, resp.text)
