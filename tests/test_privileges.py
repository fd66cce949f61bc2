"""Privilege boundaries over real HTTP: system administrators, role ceilings, access entries,
keys capped by their creator, closed registration, rate limits on failures, /register audit."""

import uuid
from pathlib import Path
from typing import Any

import httpx
from sqlmodel import col, delete

from core.db import Database
from core.models import MembershipRow, UserRow
from tests.stack import ApiThread, Stack
from tests.test_api_resources import assert_error
from tests.test_identity import PASSWORD, bearer, chain, email, login, register


def ok(resp: httpx.Response, status: int = 200) -> Any:
    assert resp.status_code == status, resp.text
    return resp.json()


def new_key(client: httpx.Client, token: str, scopes: list[str]) -> str:
    body = {"name": "k-" + uuid.uuid4().hex[:6], "scopes": scopes}
    return str(ok(client.post("/api-keys", json=body, headers=bearer(token)), 201)["key"])


def add_user(client: httpx.Client, headers: dict[str, str], role: str) -> dict[str, Any]:
    body = {"email": email(role), "password": PASSWORD, "role": role}
    made: dict[str, Any] = ok(client.post("/users", json=body, headers=headers), 201)
    made["token"] = login(client, body["email"])["token"]
    return made


def api(tmp_path: Path, temporal_address: str, **env: Any) -> ApiThread:
    """An API alone (no worker) on a database of its own, with these settings."""
    url = f"sqlite:///{tmp_path / 'own.db'}"
    return ApiThread(Stack.settings_for(temporal_address, url, **env)).start()


def make_system_admin(db_url: str, user_id: str) -> None:
    database = Database(db_url)
    try:
        with database.session() as session:
            user = session.get(UserRow, user_id)
            assert user is not None
            user.system_admin = True
            session.add(user)
            session.commit()
    finally:
        database.dispose()


# ---- 1. system administrators are named, never claimed ------------------------------------


def test_system_admins_are_named_by_system_admins(stack: Stack, client: httpx.Client) -> None:
    u = register(client, "sysadmin")
    v = register(client, "plain")
    hu, hv = bearer(u["token"]), bearer(v["token"])
    assert ok(client.get("/me", headers=hu))["systemAdmin"] is False
    assert_error(client.get("/system/resources", headers=hu), 403, "forbidden")
    # Nobody makes themself one.
    assert_error(
        client.post("/system/admins", json={"email": v["email"]}, headers=hv), 403, "forbidden"
    )

    made = ok(stack.http.post("/system/admins", json={"email": u["email"].upper()}), 201)
    assert made["id"] == u["id"] and made["email"] == u["email"].lower()
    assert ok(client.get("/me", headers=hu))["systemAdmin"] is True
    assert u["id"] in {a["id"] for a in ok(client.get("/system/admins", headers=hu))}
    assert client.get("/system/resources", headers=hu).status_code == 200
    assert_error(
        stack.http.post("/system/admins", json={"email": email("nobody")}), 404, "not_found"
    )

    # The bootstrap key stays one, so the last user admin may go.
    assert ok(stack.http.delete(f"/system/admins/{u['id']}")) == "system admin removed"
    assert ok(client.get("/me", headers=hu))["systemAdmin"] is False
    assert_error(client.get("/system/admins", headers=hu), 403, "forbidden")
    assert_error(stack.http.delete(f"/system/admins/{u['id']}"), 404, "not_found")


def test_an_email_grants_nothing_and_the_last_admin_stays(
    tmp_path: Path, temporal_address: str
) -> None:
    claimed = f"root-{uuid.uuid4().hex[:8]}@example.com"
    # No bootstrap key; the old CHAINLOOM_ADMIN_EMAILS is set and must have no effect.
    server = api(tmp_path, temporal_address, CHAINLOOM_API_KEY="", CHAINLOOM_ADMIN_EMAILS=claimed)
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            body = {"email": claimed, "password": PASSWORD}
            squatter = ok(c.post("/register", json=body), 201)
            hs = bearer(squatter["token"])
            assert ok(c.get("/me", headers=hs))["systemAdmin"] is False
            assert_error(c.get("/system/resources", headers=hs), 403, "forbidden")

            first = register(c, "first")
            make_system_admin(f"sqlite:///{tmp_path / 'own.db'}", first["id"])
            h1 = bearer(first["token"])
            assert_error(
                c.delete(f"/system/admins/{first['id']}", headers=h1), 409, "last_system_admin"
            )
            second = register(c, "second")
            ok(c.post("/system/admins", json={"email": second["email"]}, headers=h1), 201)
            assert ok(c.delete(f"/system/admins/{first['id']}", headers=h1)) == (
                "system admin removed"
            )
            h2 = bearer(second["token"])
            assert_error(
                c.delete(f"/system/admins/{second['id']}", headers=h2), 409, "last_system_admin"
            )
    finally:
        server.stop()


# ---- 2. whoever manages users hands out at most their own level --------------------------


def test_user_managers_cannot_outrank_themselves(client: httpx.Client) -> None:
    a = register(client, "owner")
    ha = bearer(a["token"])
    deputy = add_user(client, ha, "admin")
    hk = {"X-API-Key": new_key(client, a["token"], ["read", "users:admin"])}

    # The key manages users but only views the rest: it may add viewers, nothing more.
    for role in ("admin", "member"):
        body = {"email": email("made"), "password": PASSWORD, "role": role}
        assert_error(client.post("/users", json=body, headers=hk), 403, "forbidden", param="role")
    viewer = ok(
        client.post(
            "/users", json={"email": email("v"), "password": PASSWORD, "role": "viewer"}, headers=hk
        ),
        201,
    )
    assert_error(
        client.put(f"/users/{viewer['id']}", json={"role": "admin"}, headers=hk), 403, "forbidden"
    )
    # Nor may it touch anyone above that: the owner's password, the deputy's membership.
    takeover = {"password": "owned by the key now"}
    assert_error(client.put(f"/users/{a['id']}", json=takeover, headers=hk), 403, "forbidden")
    assert_error(client.delete(f"/users/{deputy['id']}", headers=hk), 403, "forbidden")
    login(client, a["email"])  # the password is unchanged
    assert client.get("/me", headers=bearer(deputy["token"])).status_code == 200
    assert ok(client.put(f"/users/{viewer['id']}", json={"friendlyName": "V"}, headers=hk))

    # The same through an access entry: a member with manage on users makes members at most.
    m = add_user(client, ha, "member")
    entry = {"identity": m["id"], "resourceType": "users", "permission": "manage"}
    ok(client.post("/access-control", json=entry, headers=ha), 201)
    hm = bearer(m["token"])
    admin = {"email": email("a2"), "password": PASSWORD, "role": "admin"}
    assert_error(client.post("/users", json=admin, headers=hm), 403, "forbidden")
    ok(client.post("/users", json={**admin, "role": "member"}, headers=hm), 201)
    assert_error(client.put(f"/users/{a['id']}", json=takeover, headers=hm), 403, "forbidden")
    # The owner (manage everywhere) still may.
    ok(client.put(f"/users/{viewer['id']}", json={"role": "admin"}, headers=ha))


# ---- 3. access entries grant at most what the granter holds -------------------------------


def test_access_managers_cannot_grant_themselves_more(client: httpx.Client) -> None:
    a = register(client, "granter")
    ha = bearer(a["token"])
    key_body = {"name": "acl", "scopes": ["access:admin"]}
    key = ok(client.post("/api-keys", json=key_body, headers=ha), 201)
    hk = {"X-API-Key": key["key"]}
    mine = {"identity": key["id"], "resourceType": "taskchains", "permission": "manage"}
    refused = client.post("/access-control", json=mine, headers=hk)
    assert_error(refused, 403, "forbidden", param="permission")
    assert_error(client.post("/taskchains", json=chain("acl1"), headers=hk), 403, "forbidden")
    # Within its reach it may: manage on access itself.
    ok(client.post("/access-control", json={**mine, "resourceType": "access"}, headers=hk), 201)

    m = add_user(client, ha, "member")
    theirs = {"identity": m["id"], "resourceType": "providers", "permission": "none"}
    entry = ok(client.post("/access-control", json=theirs, headers=ha), 201)
    # Changing an entry needs reach over what it grants now and what it will grant.
    assert_error(
        client.put(
            f"/access-control/{entry['id']}", json={**theirs, "permission": "view"}, headers=hk
        ),
        403,
        "forbidden",
    )
    moved = {**theirs, "resourceType": "access", "permission": "view"}
    assert_error(
        client.put(f"/access-control/{entry['id']}", json=moved, headers=hk), 403, "forbidden"
    )

    # A member given manage on access tops out at edit elsewhere.
    ok(
        client.post(
            "/access-control",
            json={"identity": m["id"], "resourceType": "access", "permission": "manage"},
            headers=ha,
        ),
        201,
    )
    hm = bearer(m["token"])
    own = {"identity": m["id"], "resourceType": "taskchains", "permission": "manage"}
    assert_error(client.post("/access-control", json=own, headers=hm), 403, "forbidden")
    ok(client.post("/access-control", json={**own, "permission": "edit"}, headers=hm), 201)

    # Deleting a restriction lifts it, so only a manager of that resource type may.
    assert_error(client.delete(f"/access-control/{entry['id']}", headers=hk), 403, "forbidden")
    assert_error(client.delete(f"/access-control/{entry['id']}", headers=hm), 403, "forbidden")
    assert ok(client.delete(f"/access-control/{entry['id']}", headers=ha)) == "access entry deleted"


# ---- 4. a key never holds more than its creator now does ---------------------------------


def test_keys_follow_their_creator(stack: Stack, client: httpx.Client, db: Database) -> None:
    a = register(client, "creator")
    ha = bearer(a["token"])
    # /register's key belongs to the registering user.
    assert ok(client.get("/me", headers={"X-API-Key": a["apiKey"]["key"]}))["userId"] == a["id"]
    d = add_user(client, ha, "admin")
    hk = {"X-API-Key": new_key(client, d["token"], ["admin"])}
    assert client.get("/users", headers=hk).status_code == 200
    assert ok(client.post("/taskchains", json=chain("cap1"), headers=hk), 201)

    ok(client.put(f"/users/{d['id']}", json={"role": "viewer"}, headers=ha))
    assert_error(client.get("/users", headers=hk), 403, "forbidden")
    assert_error(client.post("/taskchains", json=chain("cap2"), headers=hk), 403, "forbidden")
    assert client.get("/taskchains", headers=hk).status_code == 200
    # The creator's access entries cap it too.
    entry = {"identity": d["id"], "resourceType": "taskchains", "permission": "none"}
    ok(client.post("/access-control", json=entry, headers=ha), 201)
    assert_error(client.get("/taskchains", headers=hk), 403, "forbidden")

    # Gone from the tenant by any path: the key goes with them.
    with db.session() as session:
        session.exec(
            delete(MembershipRow).where(
                col(MembershipRow.tenant_id) == a["tenantId"],
                col(MembershipRow.user_id) == d["id"],
            )
        )
        session.commit()
    refused = assert_error(client.get("/taskchains", headers=hk), 401, "invalid_api_key")
    assert "no longer a member" in refused["error"]["message"]

    # A key the bootstrap key made answers to nobody.
    made = ok(stack.http.post("/api-keys", json={"name": "ops", "scopes": ["admin"]}), 201)
    assert client.get("/users", headers={"X-API-Key": made["key"]}).status_code == 200


# ---- 5. closed registration closes /projects too ------------------------------------------


def test_projects_follow_closed_registration(temporal_address: str, database_url: str) -> None:
    settings = Stack.settings_for(temporal_address, database_url, CHAINLOOM_REGISTRATION_OPEN=False)
    server = ApiThread(settings).start()
    boot = {"X-API-Key": Stack.API_KEY}
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            u = add_user(c, boot, "admin")
            hu = bearer(u["token"])
            refused = c.post("/projects", json={"name": "sneaky"}, headers=hu)
            assert_error(refused, 403, "registration_closed")
            assert [p["id"] for p in ok(c.get("/projects", headers=hu))] == [u["tenantId"]]
            ok(c.post("/system/admins", json={"email": u["email"]}, headers=boot), 201)
            ok(c.post("/projects", json={"name": "allowed"}, headers=hu), 201)
            ok(c.delete(f"/system/admins/{u['id']}", headers=boot))
    finally:
        server.stop()


# ---- 8. rate limits on failures and shared counters ---------------------------------------


def _from(ip: str) -> dict[str, str]:
    # The API below trusts its loopback peer as a proxy (CHAINLOOM_TRUSTED_PROXIES), so each
    # test client can be its own address.
    return {"X-Forwarded-For": ip}


def _remaining(resp: httpx.Response) -> int:
    return int(resp.headers["X-RateLimit-Remaining"])


def _limited(resp: httpx.Response) -> None:
    assert_error(resp, 429, "rate_limited")
    assert 1 <= int(resp.headers["Retry-After"]) <= 61


def test_failures_and_related_routes_share_counters(tmp_path: Path, temporal_address: str) -> None:
    server = api(
        tmp_path,
        temporal_address,
        CHAINLOOM_LOGIN_RATE_LIMIT="3/minute",
        CHAINLOOM_TRUSTED_PROXIES="127.0.0.1",
    )
    try:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            # (a) Guessing keys is counted per address, and answered 429 once over.
            bad = {**_from("10.0.0.1"), "X-API-Key": "ck_guess_" + "x" * 40}
            for left in (2, 1, 0):
                resp = c.get("/taskchains", headers=bad)
                assert_error(resp, 401, "invalid_api_key")
                assert resp.headers["X-RateLimit-Limit"] == "3" and _remaining(resp) == left
            _limited(c.get("/me", headers={**_from("10.0.0.1"), "Authorization": "Bearer eyJ.a.b"}))
            good = {**_from("10.0.0.1"), "X-API-Key": Stack.API_KEY}
            assert c.get("/taskchains", headers=good).status_code == 200

            # (b) /login and /ui/login share one counter per address, the refresh routes another.
            wrong = {"password": "wrong password"}
            for path in ("/login", "/ui/login", "/login"):
                body = {**wrong, "email": email("x")}
                assert c.post(path, json=body, headers=_from("10.0.0.2")).status_code == 401
            _limited(
                c.post("/ui/login", json={**wrong, "email": email("x")}, headers=_from("10.0.0.2"))
            )
            junk = {"token": "eyJ.junk.junk"}
            for path in ("/token_refresh", "/ui/token_refresh", "/token_refresh"):
                assert c.post(path, json=junk, headers=_from("10.0.0.3")).status_code == 401
            _limited(c.post("/logout", headers=_from("10.0.0.3")))

            # (c) One account is limited however many addresses try it.
            target = {**wrong, "email": email("target")}
            for n in range(3):
                resp = c.post("/login", json=target, headers=_from(f"10.0.1.{n}"))
                assert resp.status_code == 401, resp.text
            _limited(c.post("/login", json=target, headers=_from("10.0.1.9")))
            _limited(c.post("/ui/login", json=target, headers=_from("10.0.1.10")))
    finally:
        server.stop()


# ---- 9. a registration is in the new tenant's audit ----------------------------------------


def test_registration_is_audited(client: httpx.Client) -> None:
    for path in ("/register", "/ui/register"):
        made = ok(client.post(path, json={"email": email("audit"), "password": PASSWORD}), 201)
        entries = ok(client.get("/audit", headers=bearer(made["token"])))
        first = [e for e in entries if e["path"] == path]
        assert len(first) == 1, entries
        assert first[0]["identity"] == made["id"] and first[0]["identityKind"] == "user"
        assert first[0]["status"] == 201 and first[0]["method"] == "POST"
