"""/api-keys over real HTTP: shown once, stored as SHA-256 only, scoped, revocable, expiring."""

import hashlib
from datetime import timedelta
from typing import Any

import httpx
from sqlmodel import Session

from core.db import Database
from core.models import ApiKeyRow, utcnow
from tests.test_api_resources import assert_error
from tests.test_identity import PASSWORD, bearer, chain, email, login, register


def new_key(client: httpx.Client, token: str, **body: Any) -> dict[str, Any]:
    resp = client.post("/api-keys", json={"name": "ci", **body}, headers=bearer(token))
    assert resp.status_code == 201, resp.text
    return resp.json()


def key_row(db: Database, key_id: str) -> ApiKeyRow:
    with Session(db.engine) as session:
        row = session.get(ApiKeyRow, key_id)
        assert row is not None
        return row


def test_key_shown_once_and_stored_hashed(client: httpx.Client, db: Database) -> None:
    a = register(client, "keys")
    created = new_key(client, a["token"], scopes=["read"])
    plain = created["key"]
    assert created["prefix"] and plain.startswith(created["prefix"] + "_")
    assert created["scopes"] == ["read"] and created["lastUsedAt"] is None

    for url in ("/api-keys", f"/api-keys/{created['id']}"):
        resp = client.get(url, headers=bearer(a["token"]))
        assert resp.status_code == 200, resp.text
        assert plain not in resp.text and '"key"' not in resp.text
    listed = client.get("/api-keys", headers=bearer(a["token"])).json()
    assert {k["id"] for k in listed} == {a["apiKey"]["id"], created["id"]}

    for key_id, secret in ((created["id"], plain), (a["apiKey"]["id"], a["apiKey"]["key"])):
        row = key_row(db, key_id)
        assert row.key_hash == hashlib.sha256(secret.encode()).hexdigest()
        for column in ApiKeyRow.__table__.columns:  # type: ignore[attr-defined]
            assert secret not in str(getattr(row, column.name))


def test_key_scopes_and_last_used(client: httpx.Client, db: Database) -> None:
    a = register(client, "scopes")
    read = new_key(client, a["token"])  # scopes default to read
    assert read["scopes"] == ["read"]
    hr = {"X-API-Key": read["key"]}
    assert client.get("/taskchains", headers=hr).status_code == 200
    assert_error(client.post("/taskchains", json=chain("k1"), headers=hr), 403, "forbidden")
    assert_error(client.get("/api-keys", headers=hr), 403, "forbidden")
    used = client.get(f"/api-keys/{read['id']}", headers=bearer(a["token"])).json()
    assert used["lastUsedAt"] is not None
    assert key_row(db, read["id"]).last_used_at is not None

    write = new_key(client, a["token"], scopes=["taskchains:write"], expiresInDays=7)
    assert write["expiresAt"] is not None
    hw = {"Authorization": f"Bearer {write['key']}"}
    assert client.post("/taskchains", json=chain("k1"), headers=hw).status_code == 201
    assert_error(client.get("/backends", headers=hw), 403, "forbidden")

    bad = client.post(
        "/api-keys", json={"name": "x", "scopes": ["root"]}, headers=bearer(a["token"])
    )
    assert "root" in assert_error(bad, 422, "invalid_scope", param="scopes")["error"]["message"]
    past = {"name": "x", "expiresAt": "2001-01-01T00:00:00Z"}
    assert_error(
        client.post("/api-keys", json=past, headers=bearer(a["token"])), 422, "invalid_expiry"
    )
    # Valid times whose UTC value falls outside the years 1 to 9999.
    for edge in ("9999-12-31T23:59:59-05:00", "0001-01-01T00:00:00+05:00"):
        out_of_range = {"name": "x", "expiresAt": edge}
        resp = client.post("/api-keys", json=out_of_range, headers=bearer(a["token"]))
        assert_error(resp, 422, "invalid_expiry", param="expiresAt")

    # A key that may manage keys still cannot mint one stronger than itself.
    keyadmin = new_key(client, a["token"], scopes=["apikeys:admin"])
    hk = {"X-API-Key": keyadmin["key"]}
    stronger = client.post("/api-keys", json={"name": "y", "scopes": ["admin"]}, headers=hk)
    assert_error(stronger, 403, "forbidden", param="scopes")
    weaker = client.post("/api-keys", json={"name": "y", "scopes": ["apikeys:read"]}, headers=hk)
    assert weaker.status_code == 201, weaker.text


def test_revoke_and_expiry(client: httpx.Client, db: Database) -> None:
    a = register(client, "revoke")
    b = register(client, "other")
    key = new_key(client, a["token"], scopes=["write"])
    hk = {"X-API-Key": key["key"]}
    assert client.get("/taskchains", headers=hk).status_code == 200

    assert_error(client.get(f"/api-keys/{key['id']}", headers=bearer(b["token"])), 404, "not_found")
    assert_error(
        client.delete(f"/api-keys/{key['id']}", headers=bearer(b["token"])), 404, "not_found"
    )
    assert client.get("/taskchains", headers=hk).status_code == 200

    gone = client.delete(f"/api-keys/{key['id']}", headers=bearer(a["token"]))
    assert gone.status_code == 200 and gone.json() == "api key revoked"
    assert_error(client.get("/taskchains", headers=hk), 401, "revoked_api_key")
    shown = client.get(f"/api-keys/{key['id']}", headers=bearer(a["token"])).json()
    assert shown["revokedAt"] is not None

    expiring = new_key(client, a["token"], expiresInDays=1)
    he = {"X-API-Key": expiring["key"]}
    assert client.get("/taskchains", headers=he).status_code == 200
    with Session(db.engine) as session:
        row = session.get(ApiKeyRow, expiring["id"])
        assert row is not None
        row.expires_at = utcnow() - timedelta(minutes=1)
        session.add(row)
        session.commit()
    assert_error(client.get("/taskchains", headers=he), 401, "expired_api_key")
    assert_error(
        client.get("/taskchains", headers={"X-API-Key": "ck_nope_nope"}), 401, "invalid_api_key"
    )


def test_removing_a_user_revokes_their_keys(client: httpx.Client) -> None:
    a = register(client, "boss")
    admin = {"email": email("deputy"), "password": PASSWORD, "role": "admin"}
    made = client.post("/users", json=admin, headers=bearer(a["token"]))
    assert made.status_code == 201, made.text
    deputy = login(client, admin["email"])
    key = new_key(client, deputy["token"], scopes=["read"])
    assert client.get("/taskchains", headers={"X-API-Key": key["key"]}).status_code == 200
    assert client.delete(f"/users/{made.json()['id']}", headers=bearer(a["token"])).is_success
    assert_error(
        client.get("/taskchains", headers={"X-API-Key": key["key"]}), 401, "revoked_api_key"
    )
