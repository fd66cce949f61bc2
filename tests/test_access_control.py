"""/access-control as a client reads it: who each entry names, filters, paging and refusals."""

from typing import Any

import httpx

from tests.test_api_resources import assert_error
from tests.test_identity import bearer, register
from tests.test_privileges import add_user, ok


def _grant(client: httpx.Client, headers: dict[str, str], identity: str, kind: str) -> Any:
    entry = {"identity": identity, "resourceType": kind, "permission": "view"}
    return ok(client.post("/access-control", json=entry, headers=headers), 201)


def test_entries_name_their_users_and_keys(client: httpx.Client) -> None:
    owner = register(client, "acl-owner")
    ho = bearer(owner["token"])
    users = [add_user(client, ho, "viewer") for _ in range(3)]
    key = ok(client.post("/api-keys", json={"name": "ci", "scopes": ["read"]}, headers=ho), 201)
    made = [_grant(client, ho, user["id"], "taskchains") for user in users]
    made.append(_grant(client, ho, key["id"], "runs"))
    # What POST answers names the identity as the list does.
    assert made[0]["identityType"] == "user"
    assert made[0]["identityDetails"]["email"] == users[0]["email"]
    assert made[-1]["identityType"] == "key"

    listed = ok(client.get("/access-control", params={"expand": "user"}, headers=ho))
    assert [e["id"] for e in listed] == [e["id"] for e in made]
    for entry, user in zip(listed, users, strict=False):
        assert entry["identityType"] == "user"
        assert entry["identityDetails"] == {
            "id": user["id"],
            "email": user["email"],
            "friendlyName": user["friendlyName"],
            "role": "viewer",
        }
    assert listed[-1]["identityType"] == "key"
    assert listed[-1]["identityDetails"] == {
        "id": key["id"],
        "name": "ci",
        "prefix": key["prefix"],
    }
    # Without expand, the kind but no details.
    plain = ok(client.get("/access-control", headers=ho))
    assert [e["identityType"] for e in plain] == ["user", "user", "user", "key"]
    assert all(e["identityDetails"] is None for e in plain)
    one = ok(client.get(f"/access-control/{made[1]['id']}", params={"expand": "user"}, headers=ho))
    assert one["identityDetails"]["id"] == users[1]["id"]

    # Filter by identity, and page with `from` (createdAt of the last entry seen).
    mine = ok(client.get("/access-control", params={"identity": key["id"]}, headers=ho))
    assert [e["id"] for e in mine] == [made[-1]["id"]]
    first = ok(client.get("/access-control", params={"limit": 2}, headers=ho))
    rest = ok(client.get("/access-control", params={"from": first[-1]["createdAt"]}, headers=ho))
    assert [e["id"] for e in first + rest] == [e["id"] for e in made]


def test_entries_refuse_strangers_and_bad_input(client: httpx.Client) -> None:
    owner = register(client, "acl-a")
    other = register(client, "acl-b")
    ho = bearer(owner["token"])
    body = {"identity": other["id"], "resourceType": "taskchains", "permission": "view"}
    assert_error(
        client.post("/access-control", json=body, headers=ho),
        422,
        "unknown_identity",
        param="identity",
    )
    assert_error(
        client.get("/access-control", params={"expand": "keys"}, headers=ho),
        400,
        "invalid_expand",
        param="expand",
    )
    for bad in ({**body, "permission": "own"}, {**body, "resourceType": "planets"}):
        assert client.post("/access-control", json=bad, headers=ho).status_code == 422
    assert ok(client.get("/permissions", headers=ho)) == ["none", "view", "edit", "manage"]
