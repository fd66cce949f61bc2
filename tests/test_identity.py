"""Users and sessions over real HTTP: register, login, refresh, /ui/*, /me, /projects, /users."""

import uuid
from datetime import timedelta
from typing import Any

import httpx

from core.db import Database
from core.identity.credentials import Tokens
from core.models import RevokedTokenRow, utcnow
from core.secrets import SecretBox
from tests.stack import ApiThread, Stack
from tests.test_api_resources import assert_error

PASSWORD = "correct horse battery"


def email(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}@Example.com"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def register(client: httpx.Client, tag: str, **extra: Any) -> dict[str, Any]:
    resp = client.post("/register", json={"email": email(tag), "password": PASSWORD, **extra})
    assert resp.status_code == 201, resp.text
    return resp.json()


def login(client: httpx.Client, address: str, password: str = PASSWORD) -> dict[str, Any]:
    resp = client.post("/login", json={"email": address, "password": password})
    assert resp.status_code == 200, resp.text
    return resp.json()


def chain(chain_id: str) -> dict[str, Any]:
    return {
        "id": chain_id,
        "tasks": [
            {
                "id": "echo",
                "handler": "noop",
                "transition": {"branches": [{"operator": "default", "goto": "end"}]},
            }
        ],
    }


def test_register_and_login(client: httpx.Client) -> None:
    a = register(client, "alice", friendlyName="Alice", allowedResources=[{}])
    assert a["email"] == a["email"].lower() and a["friendlyName"] == "Alice"
    assert a["role"] == "admin" and a["tenantId"] and a["subject"] and a["token"]
    assert a["apiKey"]["key"].startswith("ck_") and a["apiKey"]["scopes"] == ["admin"]
    assert not any("password" in k.lower() for k in a)
    b = register(client, "bob")
    assert b["tenantId"] != a["tenantId"]

    me = client.get("/me", headers=bearer(a["token"]))
    assert me.status_code == 200, me.text
    assert me.json()["id"] == a["id"] and me.json()["tenantId"] == a["tenantId"]
    assert me.json()["kind"] == "user" and me.json()["role"] == "admin"
    by_key = client.get("/me", headers={"X-API-Key": a["apiKey"]["key"]}).json()
    assert by_key["kind"] == "key" and by_key["tenantId"] == a["tenantId"]

    # Login is case-insensitive on the email; the token reaches the home tenant.
    session = login(client, a["email"].upper())
    assert session["tokenType"] == "bearer" and session["tenantId"] == a["tenantId"]
    assert session["user"]["id"] == a["id"] and session["refreshToken"]
    assert client.get("/me", headers=bearer(session["token"])).status_code == 200

    wrong = assert_error(
        client.post("/login", json={"email": a["email"], "password": "not it at all"}),
        401,
        "invalid_credentials",
    )
    unknown = assert_error(
        client.post("/login", json={"email": email("nobody"), "password": PASSWORD}),
        401,
        "invalid_credentials",
    )
    assert wrong["error"]["message"] == unknown["error"]["message"]
    assert_error(
        client.post(
            "/login", json={"email": a["email"], "password": PASSWORD, "tenantId": b["tenantId"]}
        ),
        403,
        "forbidden",
    )

    again = {"email": a["email"].upper(), "password": PASSWORD}
    assert_error(client.post("/register", json=again), 409, "email_taken")
    short = {"email": email("short"), "password": "short"}
    assert_error(client.post("/register", json=short), 422, "validation_error")
    bad = {"email": "not-an-email", "password": PASSWORD}
    assert_error(client.post("/register", json=bad), 422, "validation_error")
    nul = {"email": "a\x00b@example.com", "password": PASSWORD}
    assert_error(client.post("/register", json=nul), 422, "validation_error")
    assert_error(client.post("/login", json=nul), 422, "validation_error")
    assert client.get("/me").status_code == 401


def test_token_refresh(stack: Stack, client: httpx.Client) -> None:
    a = register(client, "refresh")
    fresh = client.post("/token_refresh", json={"token": a["refreshToken"]})
    assert fresh.status_code == 200, fresh.text
    assert set(fresh.json()) == {"token", "refreshToken", "expiresAt"}
    assert client.get("/me", headers=bearer(fresh.json()["token"])).status_code == 200
    # A refresh token is not an access token.
    assert_error(client.get("/me", headers=bearer(a["refreshToken"])), 401, "invalid_token")

    settings = stack.settings
    secret = settings.jwt_secret.encode() or SecretBox.from_settings(settings).derive("jwt")
    ttl = settings.refresh_token_ttl
    recently = Tokens(secret, -60, ttl).issue(a["id"], a["tenantId"], 0)
    # An expired access token refreshes for one access lifetime after expiry, no longer.
    stale = Tokens(secret, -(settings.access_token_ttl + 60), ttl).issue(a["id"], a["tenantId"], 0)
    long_ago = Tokens(secret, -(ttl + 60), ttl).issue(a["id"], a["tenantId"], 0)
    assert_error(client.get("/me", headers=bearer(recently)), 401, "invalid_token")
    assert client.post("/token_refresh", json={"token": recently}).status_code == 200
    assert_error(client.post("/token_refresh", json={"token": stale}), 401, "invalid_token")
    assert_error(client.post("/token_refresh", json={"token": long_ago}), 401, "invalid_token")
    assert_error(client.post("/token_refresh", json={"token": "eyJ.x.y"}), 401, "invalid_token")
    forged = Tokens(b"another secret, 32 bytes or longer", 60, ttl).issue(
        a["id"], a["tenantId"], 0, "refresh"
    )
    assert_error(client.post("/token_refresh", json={"token": forged}), 401, "invalid_token")


def _db(stack: Stack) -> Database:
    return Database(stack.settings.resolved_database_url())


def test_refresh_tokens_are_single_use(stack: Stack, client: httpx.Client) -> None:
    a = register(client, "rotate")
    # A leftover of a token that can no longer be used is pruned on the next revocation.
    db = _db(stack)
    dead = "dead-" + uuid.uuid4().hex
    try:
        with db.session() as session:
            session.add(
                RevokedTokenRow(
                    jti=dead,
                    tenant_id=a["tenantId"],
                    user_id=a["id"],
                    reason="logout",
                    expires_at=utcnow() - timedelta(seconds=1),
                )
            )
            session.commit()
        first = client.post("/token_refresh", json={"token": a["refreshToken"]})
        assert first.status_code == 200, first.text
        with db.session() as session:
            assert session.get(RevokedTokenRow, dead) is None
    finally:
        db.dispose()
    again = client.post("/token_refresh", json={"token": a["refreshToken"]})
    assert "already used" in assert_error(again, 401, "invalid_token")["error"]["message"]
    # A reused token may be a stolen one: every session of the user ends, the pair the
    # first refresh gave included.
    assert_error(client.get("/me", headers=bearer(first.json()["token"])), 401, "invalid_token")
    spent = client.post("/token_refresh", json={"token": first.json()["refreshToken"]})
    assert_error(spent, 401, "invalid_token")
    # A new login's pair works; an access token used to refresh is spent as well, for
    # refreshing and for calls.
    fresh = login(client, a["email"])
    second = client.post("/token_refresh", json={"token": fresh["refreshToken"]})
    assert second.status_code == 200, second.text
    access = second.json()["token"]
    assert client.post("/token_refresh", json={"token": access}).status_code == 200
    assert_error(client.get("/me", headers=bearer(access)), 401, "invalid_token")
    assert_error(client.post("/token_refresh", json={"token": access}), 401, "invalid_token")

    # The cookie flow rotates the same way.
    ui = client.post("/ui/login", json={"email": a["email"], "password": PASSWORD})
    cookie = {"Cookie": f"chainloom_refresh={ui.cookies['chainloom_refresh']}"}
    assert client.post("/ui/token_refresh", headers=cookie).status_code == 200
    assert_error(client.post("/ui/token_refresh", headers=cookie), 401, "invalid_token")


def test_logout_revokes_tokens(client: httpx.Client) -> None:
    a = register(client, "logout")
    session = login(client, a["email"])
    token, refresh = session["token"], session["refreshToken"]
    assert_error(client.post("/logout"), 401, "invalid_token")
    key = {"Authorization": f"Bearer {a['apiKey']['key']}"}
    assert_error(client.post("/logout", headers=key), 401, "invalid_token")
    stranger = register(client, "stranger")
    mixed = client.post(
        "/logout", json={"refreshToken": stranger["refreshToken"]}, headers=bearer(token)
    )
    assert_error(mixed, 401, "invalid_token", param="refreshToken")
    assert client.get("/me", headers=bearer(token)).status_code == 200

    out = client.post("/logout", json={"refreshToken": refresh}, headers=bearer(token))
    assert out.status_code == 200 and out.json() == "logged out"
    assert_error(client.get("/me", headers=bearer(token)), 401, "invalid_token")
    refused = client.post("/token_refresh", json={"token": refresh})
    assert "logged out" in assert_error(refused, 401, "invalid_token")["error"]["message"]
    assert_error(client.post("/token_refresh", json={"token": token}), 401, "invalid_token")
    assert client.post("/logout", headers=bearer(token)).status_code == 200  # idempotent
    # Other sessions of the user go on: a logged-out token is no sign of theft.
    assert client.get("/me", headers=bearer(a["token"])).status_code == 200

    # /ui/logout revokes what the cookies held, not only the cookies.
    ui = client.post("/ui/login", json={"email": a["email"], "password": PASSWORD})
    held = ui.cookies["chainloom_session"], ui.cookies["chainloom_refresh"]
    cookies = f"chainloom_session={held[0]}; chainloom_refresh={held[1]}"
    assert client.post("/ui/logout", headers={"Cookie": cookies}).status_code == 200
    assert_error(
        client.get("/ui/me", headers={"Cookie": f"chainloom_session={held[0]}"}),
        401,
        "invalid_token",
    )
    assert_error(
        client.post("/ui/token_refresh", headers={"Cookie": f"chainloom_refresh={held[1]}"}),
        401,
        "invalid_token",
    )


def test_password_change_ends_old_sessions(client: httpx.Client) -> None:
    a = register(client, "changer")
    old = a["token"]
    renamed = client.patch("/me", json={"friendlyName": "Renamed"}, headers=bearer(old))
    assert renamed.status_code == 200 and renamed.json()["friendlyName"] == "Renamed"

    change = {"password": "a brand new password"}
    assert_error(client.patch("/me", json=change, headers=bearer(old)), 403, "wrong_password")
    wrong = {**change, "currentPassword": "guess guess"}
    assert_error(client.patch("/me", json=wrong, headers=bearer(old)), 403, "wrong_password")
    done = client.patch("/me", json={**change, "currentPassword": PASSWORD}, headers=bearer(old))
    assert done.status_code == 200, done.text

    assert_error(client.get("/me", headers=bearer(old)), 401, "invalid_token")
    refresh = client.post("/token_refresh", json={"token": a["refreshToken"]})
    assert_error(refresh, 401, "invalid_token")
    assert client.get("/me", headers=bearer(done.json()["token"])).status_code == 200
    assert (
        client.post("/login", json={"email": a["email"], "password": PASSWORD}).status_code == 401
    )
    login(client, a["email"], "a brand new password")


def _cookies(resp: httpx.Response) -> dict[str, str]:
    return {c.split("=", 1)[0]: c for c in resp.headers.get_list("set-cookie")}


def test_ui_cookie_session(client: httpx.Client) -> None:
    reg = client.post("/ui/register", json={"email": email("ui"), "password": PASSWORD})
    assert reg.status_code == 201, reg.text
    assert "chainloom_session" in _cookies(reg)

    resp = client.post("/ui/login", json={"email": reg.json()["email"], "password": PASSWORD})
    assert resp.status_code == 200, resp.text
    cookies = _cookies(resp)
    session = cookies["chainloom_session"].lower()
    assert "httponly" in session and "samesite=strict" in session and "path=/;" in session
    assert "path=/ui/token_refresh" in cookies["chainloom_refresh"].lower()
    token = resp.cookies["chainloom_session"]
    refresh = resp.cookies["chainloom_refresh"]

    me = client.get("/ui/me", headers={"Cookie": f"chainloom_session={token}"})
    assert me.status_code == 200, me.text
    assert me.json()["email"] == reg.json()["email"]
    assert client.get("/ui/me").status_code == 401

    renewed = client.post("/ui/token_refresh", headers={"Cookie": f"chainloom_refresh={refresh}"})
    assert renewed.status_code == 200 and renewed.json() == "token refreshed"
    new_token = renewed.cookies["chainloom_session"]
    assert client.get("/ui/me", headers={"Cookie": f"chainloom_session={new_token}"}).is_success
    assert_error(client.post("/ui/token_refresh"), 401, "invalid_token")

    out = client.post("/ui/logout")
    assert out.status_code == 200 and out.json() == "logged out"
    cleared = _cookies(out)
    for name in ("chainloom_session", "chainloom_refresh"):
        assert cleared[name].startswith(f'{name}="";') or "max-age=0" in cleared[name].lower()


def test_users_roles_and_isolation(client: httpx.Client) -> None:
    a = register(client, "owner")
    b = register(client, "outsider")
    ha, hb = bearer(a["token"]), bearer(b["token"])

    new = {"email": email("viewer"), "password": PASSWORD, "role": "viewer"}
    viewer = client.post("/users", json=new, headers=ha)
    assert viewer.status_code == 201, viewer.text
    v = viewer.json()
    assert v["role"] == "viewer" and v["tenantId"] == a["tenantId"]
    assert set(v) == {"id", "email", "friendlyName", "subject", "role", "tenantId"} | {
        "createdAt",
        "updatedAt",
    }
    member = client.post(
        "/users", json={"email": email("member"), "password": PASSWORD}, headers=ha
    )
    m = member.json()
    assert member.status_code == 201 and m["role"] == "member"
    assert_error(client.post("/users", json=new, headers=ha), 409, "email_taken")
    odd = {**new, "email": email("odd"), "role": "owner"}
    assert_error(client.post("/users", json=odd, headers=ha), 422, "validation_error")

    listed = client.get("/users", headers=ha).json()
    assert [u["id"] for u in listed] == [m["id"], v["id"], a["id"]]  # newest first
    page = client.get("/users", params={"limit": 1, "cursor": listed[0]["createdAt"]}, headers=ha)
    assert [u["id"] for u in page.json()] == [v["id"]]
    assert [u["id"] for u in client.get("/users", headers=hb).json()] == [b["id"]]

    # Another tenant's admin sees nothing and changes nothing.
    assert_error(client.get(f"/users/{v['id']}", headers=hb), 404, "not_found")
    assert_error(
        client.put(f"/users/{v['id']}", json={"role": "admin"}, headers=hb), 404, "not_found"
    )
    assert_error(client.delete(f"/users/{v['id']}", headers=hb), 404, "not_found")
    assert client.get(f"/users/{v['id']}", headers=ha).json()["role"] == "viewer"

    # A viewer reads but does not write, and does not manage users.
    hv = bearer(login(client, new["email"])["token"])
    assert client.get("/taskchains", headers=hv).status_code == 200
    assert_error(client.post("/taskchains", json=chain("v1"), headers=hv), 403, "forbidden")
    assert_error(client.get("/users", headers=hv), 403, "forbidden")
    promoted = client.put(f"/users/{v['id']}", json={"role": "member"}, headers=ha)
    assert promoted.status_code == 200 and promoted.json()["role"] == "member"
    assert client.post("/taskchains", json=chain("v1"), headers=hv).status_code == 201

    assert_error(
        client.put(f"/users/{a['id']}", json={"role": "viewer"}, headers=ha), 409, "last_admin"
    )
    assert_error(client.delete(f"/users/{a['id']}", headers=ha), 409, "cannot_delete_self")

    hm = bearer(login(client, m["email"])["token"])
    gone = client.delete(f"/users/{m['id']}", headers=ha)
    assert gone.status_code == 200 and gone.json() == "user deleted"
    assert_error(client.get("/me", headers=hm), 401, "invalid_token")
    assert_error(client.get(f"/users/{m['id']}", headers=ha), 404, "not_found")
    assert (
        client.post("/login", json={"email": m["email"], "password": PASSWORD}).status_code == 401
    )


def test_project_tokens(client: httpx.Client) -> None:
    a = register(client, "projects")
    other = register(client, "stranger")
    ha = bearer(a["token"])
    created = client.post("/projects", json={"name": "second"}, headers=ha)
    assert created.status_code == 201, created.text
    second = created.json()
    assert second["role"] == "admin" and second["name"] == "second"
    listed = client.get("/projects", headers=ha).json()
    assert {p["id"] for p in listed} == {a["tenantId"], second["id"]}

    scoped = client.post(f"/projects/{second['id']}/token", headers=ha)
    assert scoped.status_code == 200, scoped.text
    assert scoped.json()["tenantId"] == second["id"]
    hb = bearer(scoped.json()["token"])
    chain_id = "scoped-" + uuid.uuid4().hex[:8]
    assert client.post("/taskchains", json=chain(chain_id), headers=hb).status_code == 201
    assert client.get(f"/taskchains/{chain_id}", headers=hb).status_code == 200
    assert_error(client.get(f"/taskchains/{chain_id}", headers=ha), 404, "not_found")
    assert chain_id not in {c["id"] for c in client.get("/taskchains", headers=ha).json()}

    # Login can name the project too; a project the user is not in is not found.
    named = client.post(
        "/login", json={"email": a["email"], "password": PASSWORD, "tenantId": second["id"]}
    )
    assert named.json()["tenantId"] == second["id"]
    assert_error(client.post(f"/projects/{other['tenantId']}/token", headers=ha), 404, "not_found")
    key = {"X-API-Key": a["apiKey"]["key"]}
    assert_error(client.post("/projects", json={"name": "x"}, headers=key), 403, "forbidden")


def test_registration_closed(temporal_address: str, database_url: str) -> None:
    settings = Stack.settings_for(temporal_address, database_url, CHAINLOOM_REGISTRATION_OPEN=False)
    api = ApiThread(settings).start()
    try:
        with httpx.Client(base_url=api.url, timeout=60) as c:
            body = {"email": email("closed"), "password": PASSWORD}
            assert_error(c.post("/register", json=body), 403, "registration_closed")
            assert_error(c.post("/ui/register", json=body), 403, "registration_closed")
    finally:
        api.stop()
