"""The request log over real HTTP: /activity/*, /audit, and tenants not seeing each other."""

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from core.db import Database
from core.metering.request_log import RequestLog
from core.models import BackendStateRow
from tests.scripted_llm import ScriptedLLM
from tests.stack import ApiThread, Stack
from tests.test_ops import make_key

MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


def wait_for(fetch: Callable[[], Any], check: Callable[[Any], bool], what: str) -> Any:
    """Reads are logged within about a second; poll until they show."""
    deadline = time.monotonic() + 15
    while True:
        value = fetch()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: {str(value)[:2000]}")
        time.sleep(0.2)


def listed(http: httpx.Client, path: str, **params: Any) -> list[dict[str, Any]]:
    resp = http.get(path, params={"limit": 1000, **params})
    assert resp.status_code == 200, resp.text
    body: list[dict[str, Any]] = resp.json()
    return body


def test_requests_and_audit(stack: Stack, llm: ScriptedLLM) -> None:
    http = stack.http
    name = "logged-" + uuid.uuid4().hex[:8]
    created = http.post(
        "/backends", json={"name": name, "baseUrl": llm.openai_base, "type": "openai"}
    )
    assert created.status_code == 201, created.text
    backend_id = created.json()["id"]
    # A change is in the audit log by the time its response arrives: no waiting.
    audit = listed(http, "/audit")
    post = next(e for e in audit if e["subjectId"] is None and e["path"] == "/backends")
    assert post["method"] == "POST" and post["operation"] == "create"
    assert post["identity"] == "bootstrap" and post["identityKind"] == "bootstrap"
    assert post["subject"] == "backends" and post["status"] == 201

    assert http.get(f"/backends/{backend_id}").status_code == 200
    assert http.delete(f"/backends/{backend_id}").status_code in (200, 204)
    # A request that never authenticated belongs to no tenant and is not logged.
    marker = uuid.uuid4().hex
    assert httpx.get(f"{stack.api.url}/backends/{marker}").status_code == 401
    assert http.get(f"/backends/{marker}").status_code == 404

    entries = wait_for(
        lambda: listed(http, "/activity/requests"),
        lambda rows: any(r["subjectId"] == marker for r in rows),
        "the read was never logged",
    )
    mine = [r for r in entries if r["subjectId"] in (backend_id, marker)]
    assert [(r["method"], r["status"]) for r in mine] == [
        ("GET", 404),
        ("DELETE", mine[1]["status"]),
        ("GET", 200),
    ]
    read = mine[2]
    assert read["route"] == "/backends/{id}" and read["path"] == f"/backends/{backend_id}"
    assert read["operation"] == "read" and read["subject"] == "backends"
    assert read["durationMs"] > 0 and read["client"] == "127.0.0.1"
    assert mine[1]["operation"] == "delete"
    times = [r["at"] for r in entries]
    assert times == sorted(times, reverse=True)

    one = http.get(f"/activity/requests/{read['id']}")
    assert one.status_code == 200 and one.json() == read

    audit = listed(http, "/audit")
    assert audit and all(e["method"] in MUTATING for e in audit)
    assert {"POST", "DELETE"} <= {e["method"] for e in audit if e["path"].startswith("/backends")}
    assert not any(e["subjectId"] == marker for e in audit)
    deletes = listed(http, "/audit", subject="backends", identity="bootstrap")
    assert any(e["subjectId"] == backend_id and e["operation"] == "delete" for e in deletes)
    assert listed(http, "/audit", identity="nobody") == []

    ops = {(o["operation"], o["subject"]): o for o in http.get("/activity/operations").json()}
    assert ops[("create", "backends")]["count"] >= 1 and ops[("create", "backends")]["lastAt"]
    by_op = listed(http, "/activity/operations/delete/backends")
    assert by_op and all(r["method"] == "DELETE" for r in by_op)
    assert any(r["subjectId"] == backend_id for r in by_op)


def logged_after(rows: list[dict[str, Any]], marker: str) -> list[str]:
    """Paths logged after the request to `marker` (rows are newest first)."""
    paths = [r["path"] for r in rows]
    return paths[: paths.index(marker)] if marker in paths else []


def test_filters_and_paging(stack: Stack) -> None:
    http = stack.http
    # A NUL in a path is refused before any route runs (api/middleware.py), so unlogged.
    assert http.get("/activity/requests/%00").status_code == 400
    marker = f"/activity/requests/{uuid.uuid4()}"
    assert http.get(marker).status_code == 404
    for _ in range(3):
        assert http.get("/backends").status_code == 200
    wait_for(
        lambda: listed(http, "/activity/requests", method="get"),
        lambda rows: logged_after(rows, marker).count("/backends") == 3,
        "reads were not logged",
    )
    first = listed(http, "/activity/requests", limit=2)
    assert len(first) == 2
    after = listed(http, "/activity/requests", limit=2, cursor=first[-1]["at"])
    assert after and all(r["at"] < first[-1]["at"] for r in after)
    assert all(r["method"] == "GET" for r in listed(http, "/activity/requests", method="get"))
    assert all(r["status"] == 200 for r in listed(http, "/activity/requests", status="200"))
    bad = ({"status": "abc"}, {"cursor": "yesterday"}, {"limit": "0"}, {"identity": "\x00"})
    for params in bad:
        resp = http.get("/activity/requests", params=params)
        assert resp.status_code == 400, (params, resp.text)
    assert http.get("/audit", params={"from": "soon"}).status_code == 400
    future = "2999-01-01T00:00:00Z"
    assert listed(http, "/audit", **{"from": future}) == []
    # Refused changes are audited too.
    assert http.post("/backends", json={}).status_code == 422
    refused = listed(http, "/audit", to=future)[0]
    assert (refused["method"], refused["path"], refused["status"]) == ("POST", "/backends", 422)
    assert http.get(f"/activity/requests/{uuid.uuid4()}").status_code == 404


def test_run_state_of_a_request(stack: Stack) -> None:
    http = stack.http
    chain = {
        "id": "logged-" + uuid.uuid4().hex[:8],
        "tasks": [
            {
                "id": "only",
                "handler": "noop",
                "transition": {"branches": [{"operator": "default", "goto": "end"}]},
            }
        ],
    }
    resp = http.post("/tasks", json={"chain": chain, "input": "hello"})
    assert resp.status_code == 200, resp.text
    run_id = resp.json()["id"]
    started = next(r for r in listed(http, "/activity/stateful-requests") if r["runId"] == run_id)
    assert started["operation"] == "execute" and started["subject"] == "runs"
    state = http.get(f"/activity/requests/{started['id']}/state")
    assert state.status_code == 200, state.text
    body = state.json()
    assert body["runId"] == run_id and body["status"] == "completed"
    assert [unit["taskID"] for unit in body["state"]] == ["only"]

    plain = next(r for r in listed(http, "/audit") if r["runId"] is None)
    resp = http.get(f"/activity/requests/{plain['id']}/state")
    assert resp.status_code == 404 and "started no run" in resp.json()["error"]["message"]


def test_other_tenants_see_nothing(stack: Stack) -> None:
    http = stack.http
    assert http.get("/backends").status_code == 200
    mine = wait_for(
        lambda: listed(http, "/activity/requests"), bool, "nothing logged for the tenant"
    )
    outsider = make_key(
        stack.settings.resolved_database_url(), "other-" + uuid.uuid4().hex, ["admin"]
    )
    with httpx.Client(base_url=stack.api.url, headers={"X-API-Key": outsider}) as other:
        resp = other.get(f"/activity/requests/{mine[0]['id']}")
        assert resp.status_code == 404
        assert other.get(f"/activity/requests/{mine[0]['id']}/state").status_code == 404
        seen = wait_for(
            lambda: listed(other, "/activity/requests"), bool, "the outsider's own reads"
        )
        identities = {r["identity"] for r in seen}
        assert len(identities) == 1 and "bootstrap" not in identities
        assert all(r["identity"] != "bootstrap" for r in listed(other, "/audit"))
        assert all(o["subject"] in ("activity",) for o in other.get("/activity/operations").json())
        assert other.get("/activity/alerts").json()["requests"] == []


def test_viewer_cannot_read_activity(stack: Stack) -> None:
    reader = make_key(
        stack.settings.resolved_database_url(), stack.settings.default_tenant, ["read"]
    )
    with httpx.Client(base_url=stack.api.url, headers={"X-API-Key": reader}) as http:
        assert http.get("/backends").status_code == 200
        for path in ("/activity/requests", "/audit", "/activity/alerts"):
            assert http.get(path).status_code == 403, path


def test_alerts(temporal_address: str, sqlite_url: str, llm: ScriptedLLM) -> None:
    # A per-identity limit of 2 a minute: the third request is a 429 alert.
    settings = Stack.settings_for(temporal_address, sqlite_url, CHAINLOOM_RATE_LIMIT="2/minute")
    api = ApiThread(settings).start()
    tenant = "alerts-" + uuid.uuid4().hex[:8]
    try:
        noisy = make_key(sqlite_url, tenant, ["admin"])
        watcher = make_key(sqlite_url, tenant, ["admin"])
        with httpx.Client(base_url=api.url, headers={"X-API-Key": noisy}) as http:
            created = http.post(
                "/backends", json={"name": "down", "baseUrl": llm.openai_base, "type": "openai"}
            )
            assert created.status_code == 201, created.text
            assert http.get("/backends").status_code == 200
            # A refused change: logged before its response, so no waiting for a flush.
            assert http.post("/backends", json={}).status_code == 429
        backend_id = created.json()["id"]
        db = Database(sqlite_url)
        with db.session() as session:
            row = session.get(BackendStateRow, backend_id) or BackendStateRow(
                backend_id=backend_id, tenant_id=tenant
            )
            row.healthy, row.failures, row.last_error = False, 3, "connection refused"
            session.add(row)
            session.commit()
        db.dispose()
        with httpx.Client(base_url=api.url, headers={"X-API-Key": watcher}) as http:
            resp = http.get("/activity/alerts")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        alerts = [(r["status"], r["method"], r["path"]) for r in body["requests"]]
        assert alerts == [(429, "POST", "/backends")]
        assert body["backends"] == [
            {
                "backendId": backend_id,
                "name": "down",
                "failures": 3,
                "lastError": "connection refused",
                "downUntil": None,
                "checkedAt": body["backends"][0]["checkedAt"],
            }
        ]
    finally:
        api.stop()


def test_changes_are_logged_before_the_response(
    temporal_address: str, sqlite_url: str, llm: ScriptedLLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the read buffer never flushed, only the write-through of changes can show them.
    monkeypatch.setattr(RequestLog, "INTERVAL", 3600.0)
    api = ApiThread(Stack.settings_for(temporal_address, sqlite_url)).start()
    try:
        with httpx.Client(base_url=api.url, headers={"X-API-Key": Stack.API_KEY}) as http:
            name = "durable-" + uuid.uuid4().hex[:8]
            body = {"name": name, "baseUrl": llm.openai_base, "type": "openai"}
            backend_id = http.post("/backends", json=body).json()["id"]
            assert http.get(f"/backends/{backend_id}").status_code == 200
            assert http.delete(f"/backends/{backend_id}").status_code in (200, 204)
            audit = listed(http, "/audit", subject="backends")
            assert [e["operation"] for e in audit[:2]] == ["delete", "create"]
            assert audit[0]["subjectId"] == backend_id
            reads = listed(http, "/activity/requests", method="GET")
            assert not any(r["subjectId"] == backend_id for r in reads)
    finally:
        api.stop()


def test_entries_past_retention_are_pruned(database_url: str) -> None:
    from datetime import timedelta

    from sqlmodel import select

    from core.models import RequestLogRow, utcnow

    db = Database(database_url)
    tenant = "retention-" + uuid.uuid4().hex[:8]
    now = utcnow()
    try:
        with db.session() as session:
            for days in (1, 29, 31, 400):
                session.add(
                    RequestLogRow(
                        tenant_id=tenant,
                        at=now - timedelta(days=days),
                        method="GET",
                        path=f"/{days}",
                        status=200,
                    )
                )
            session.commit()
        assert RequestLog(db, retention_days=0).prune(now) == 0
        assert RequestLog(db, retention_days=30).prune(now) >= 2
        with db.session() as session:
            left = session.exec(select(RequestLogRow).where(RequestLogRow.tenant_id == tenant))
            assert sorted(r.path for r in left) == ["/1", "/29"]
    finally:
        db.dispose()
