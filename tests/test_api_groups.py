"""/groups, /group-by-*, /backend-affinity and /model-affinity over real HTTP, on both databases.

The stack (and its database) is shared by the whole session, so every name here is unique.
"""

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from sqlmodel import select

from api.routes.groups import remove_memberships
from core.db import Database
from core.models import AffinityGroupRow, GroupBackendRow, GroupModelRow
from tests.stack import Stack
from tests.test_api_resources import assert_error

GROUP_KEYS = {"id", "name", "purposeType", "createdAt", "updatedAt"}
BACKEND_KEYS = {"id", "name", "baseUrl", "type", "providerKey", "createdAt", "updatedAt"}
MODEL_KEYS = {
    "id",
    "model",
    "canChat",
    "canEmbed",
    "canPrompt",
    "canStream",
    "contextLength",
    "createdAt",
    "updatedAt",
}


def uid() -> str:
    return uuid.uuid4().hex[:10]


def add_group(http: httpx.Client, name: str, purpose: str = "") -> dict[str, Any]:
    resp = http.post("/groups", json={"name": name, "purposeType": purpose})
    assert resp.status_code == 201, resp.text
    return resp.json()


def add_backend(http: httpx.Client, name: str) -> dict[str, Any]:
    # Never probed here: nothing in these tests lists /backends with live status.
    body = {"name": name, "baseUrl": "http://127.0.0.1:1/v1", "type": "openai"}
    resp = http.post("/backends", json=body)
    assert resp.status_code == 201, resp.text
    return resp.json()


def add_model(http: httpx.Client, name: str) -> dict[str, Any]:
    resp = http.post("/models", json={"model": name})
    assert resp.status_code == 201, resp.text
    return resp.json()


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["id"] for item in items]


# --------------------------------------------------------------------------- /groups


def test_groups_crud(stack: Stack) -> None:
    http = stack.http
    name = f"chat-{uid()}"
    group = add_group(http, name, "Internal Tasks")
    assert set(group) == GROUP_KEYS
    assert group["name"] == name and group["purposeType"] == "Internal Tasks"
    assert group["createdAt"].endswith("Z") and group["updatedAt"].endswith("Z")
    assert http.get(f"/groups/{group['id']}").json() == group
    assert group["id"] in ids(http.get("/groups", params={"limit": 1000}).json())

    # purposeType is optional; the seed's full object (id, timestamps) is accepted and ignored.
    bare = http.post("/groups", json={"name": f"bare-{uid()}", "id": "mine", "createdAt": "x"})
    assert bare.status_code == 201, bare.text
    assert bare.json()["purposeType"] == "" and bare.json()["id"] != "mine"

    body = assert_error(
        http.post("/groups", json={"name": name}), 409, "already_exists", param="name"
    )
    assert body["error"]["type"] == "conflict_error" and name in body["error"]["message"]
    assert_error(http.post("/groups", json={}), 422, "validation_error", param="/name")
    assert_error(http.post("/groups", json={"name": ""}), 422, "validation_error", param="/name")
    assert_error(http.post("/groups", json={"name": "   "}), 422, "validation_error", param="/name")
    assert_error(
        http.post("/groups", json={"name": "x", "purposeType": 5}),
        422,
        "validation_error",
        param="/purposeType",
    )

    # PUT: the id in the URL wins over one in the body.
    renamed = f"renamed-{uid()}"
    resp = http.put(
        f"/groups/{group['id']}",
        json={"id": "other", "name": renamed, "purposeType": "Internal Embeddings"},
    )
    assert resp.status_code == 200, resp.text
    updated = resp.json()
    assert updated["id"] == group["id"] and updated["createdAt"] == group["createdAt"]
    assert updated["name"] == renamed and updated["purposeType"] == "Internal Embeddings"
    assert updated["updatedAt"] >= group["updatedAt"]
    assert http.get(f"/groups/{group['id']}").json() == updated
    assert_error(
        http.put(f"/groups/{group['id']}", json={"name": bare.json()["name"]}),
        409,
        "already_exists",
    )
    assert_error(http.put(f"/groups/{group['id']}", json={"name": ""}), 422, "validation_error")
    assert_error(http.put("/groups/missing", json={"name": f"n-{uid()}"}), 404, "not_found")

    # By name: the new name finds it, the old one no longer does.
    assert http.get(f"/group-by-name/{renamed}").json() == updated
    body = assert_error(http.get(f"/group-by-name/{name}"), 404, "not_found")
    assert body["error"]["type"] == "not_found_error" and name in body["error"]["message"]

    resp = http.delete(f"/groups/{group['id']}")
    assert resp.status_code == 200 and resp.json() == "deleted"
    assert_error(http.get(f"/groups/{group['id']}"), 404, "not_found")
    assert_error(http.delete(f"/groups/{group['id']}"), 404, "not_found")
    assert_error(http.get(f"/group-by-name/{renamed}"), 404, "not_found")
    assert group["id"] not in ids(http.get("/groups", params={"limit": 1000}).json())
    # The name is free again.
    add_group(http, renamed)


def test_groups_pagination_and_purpose(stack: Stack) -> None:
    http = stack.http
    purpose = f"purpose {uid()}"
    mine = [add_group(http, f"page-{i}-{uid()}", purpose) for i in range(3)]
    other = add_group(http, f"other-{uid()}", f"other {uid()}")

    listed = http.get(f"/group-by-purpose/{purpose}").json()
    assert listed == mine
    first = http.get(f"/group-by-purpose/{purpose}", params={"limit": 2}).json()
    assert ids(first) == ids(mine[:2])
    rest = http.get(
        f"/group-by-purpose/{purpose}", params={"limit": 2, "cursor": first[-1]["createdAt"]}
    ).json()
    assert ids(rest) == ids(mine[2:])
    assert http.get("/group-by-purpose/no-such-purpose-" + uid()).json() == []

    # Walking all of /groups page by page sees each group once, in creation order.
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = http.get("/groups", params=params).json()
        assert len(page) <= 2
        if not page:
            break
        seen += ids(page)
        cursor = page[-1]["createdAt"]
    assert len(seen) == len(set(seen))
    wanted = [*ids(mine), other["id"]]
    assert [i for i in seen if i in wanted] == wanted

    assert_error(http.get("/groups", params={"limit": "0"}), 400, "invalid_limit", param="limit")
    assert_error(
        http.get(f"/group-by-purpose/{purpose}", params={"limit": "x"}), 400, "invalid_limit"
    )
    assert_error(
        http.get("/groups", params={"cursor": "yesterday"}), 400, "invalid_cursor", param="cursor"
    )


def test_groups_of_other_tenants_are_invisible(stack: Stack, db: Database) -> None:
    http = stack.http
    foreign = AffinityGroupRow(tenant_id="other-" + uid(), name=f"foreign-{uid()}")
    with db.session() as session:
        session.add(foreign)
        session.commit()
    backend = add_backend(http, f"b-{uid()}")
    assert_error(http.get(f"/groups/{foreign.id}"), 404, "not_found")
    assert_error(http.get(f"/group-by-name/{foreign.name}"), 404, "not_found")
    assert_error(http.put(f"/groups/{foreign.id}", json={"name": "x"}), 404, "not_found")
    assert_error(http.delete(f"/groups/{foreign.id}"), 404, "not_found")
    assert_error(
        http.post(f"/backend-affinity/{foreign.id}/backends/{backend['id']}"), 404, "not_found"
    )
    assert_error(http.get(f"/backend-affinity/{foreign.id}/backends"), 404, "not_found")
    assert foreign.id not in ids(http.get("/groups", params={"limit": 1000}).json())
    # The same name is free in our tenant: uniqueness is per tenant.
    add_group(http, foreign.name)


# --------------------------------------------------------------------------- affinity


def test_backend_affinity(stack: Stack, db: Database) -> None:
    http = stack.http
    b1, b2 = add_backend(http, f"b1-{uid()}"), add_backend(http, f"b2-{uid()}")
    ga, gb = add_group(http, f"ga-{uid()}"), add_group(http, f"gb-{uid()}")

    resp = http.post(f"/backend-affinity/{ga['id']}/backends/{b1['id']}")
    assert resp.status_code == 201 and isinstance(resp.json(), str), resp.text
    # Assigning twice is no error and adds nothing.
    again = http.post(f"/backend-affinity/{ga['id']}/backends/{b1['id']}")
    assert again.status_code == 200 and isinstance(again.json(), str), again.text
    for group, backend in ((ga, b2), (gb, b1)):
        resp = http.post(f"/backend-affinity/{group['id']}/backends/{backend['id']}")
        assert resp.status_code == 201, resp.text

    listed = http.get(f"/backend-affinity/{ga['id']}/backends").json()
    assert listed == [b1, b2]
    assert all(set(item) == BACKEND_KEYS for item in listed)
    assert http.get(f"/backend-affinity/{gb['id']}/backends").json() == [b1]
    assert http.get(f"/backend-affinity/{b1['id']}/groups").json() == [ga, gb]
    assert http.get(f"/backend-affinity/{b2['id']}/groups").json() == [ga]

    assert_error(http.post(f"/backend-affinity/nope/backends/{b1['id']}"), 404, "not_found")
    assert_error(http.post(f"/backend-affinity/{ga['id']}/backends/nope"), 404, "not_found")
    assert_error(http.get("/backend-affinity/nope/backends"), 404, "not_found")
    assert_error(http.get("/backend-affinity/nope/groups"), 404, "not_found")
    body = assert_error(
        http.delete(f"/backend-affinity/{gb['id']}/backends/{b2['id']}"), 404, "not_found"
    )
    assert b2["id"] in body["error"]["message"]

    resp = http.delete(f"/backend-affinity/{ga['id']}/backends/{b2['id']}")
    assert resp.status_code == 200 and isinstance(resp.json(), str), resp.text
    assert http.get(f"/backend-affinity/{ga['id']}/backends").json() == [b1]
    assert http.get(f"/backend-affinity/{b2['id']}/groups").json() == []
    assert_error(http.delete(f"/backend-affinity/{ga['id']}/backends/{b2['id']}"), 404, "not_found")

    # A deleted backend never shows in a group, even if its memberships were left behind.
    assert http.delete(f"/backends/{b1['id']}").status_code == 200
    assert http.get(f"/backend-affinity/{ga['id']}/backends").json() == []
    assert http.get(f"/backend-affinity/{gb['id']}/backends").json() == []
    assert_error(http.get(f"/backend-affinity/{b1['id']}/groups"), 404, "not_found")

    # Deleting a group takes its memberships with it, and leaves the backend alone.
    assert http.post(f"/backend-affinity/{gb['id']}/backends/{b2['id']}").status_code == 201
    assert http.delete(f"/groups/{gb['id']}").status_code == 200
    with db.session() as session:
        left = session.exec(select(GroupBackendRow).where(GroupBackendRow.group_id == gb["id"]))
        assert left.all() == []
    assert http.get(f"/backend-affinity/{b2['id']}/groups").json() == []
    assert http.get(f"/backends/{b2['id']}").status_code == 200


def test_model_affinity(stack: Stack, db: Database) -> None:
    http = stack.http
    m1, m2 = add_model(http, f"m1-{uid()}"), add_model(http, f"m2-{uid()}")
    ga, gb = add_group(http, f"ga-{uid()}"), add_group(http, f"gb-{uid()}")

    resp = http.post(f"/model-affinity/{ga['id']}/models/{m1['id']}")
    assert resp.status_code == 201 and isinstance(resp.json(), str), resp.text
    again = http.post(f"/model-affinity/{ga['id']}/models/{m1['id']}")
    assert again.status_code == 200, again.text
    for group, model in ((ga, m2), (gb, m1)):
        resp = http.post(f"/model-affinity/{group['id']}/models/{model['id']}")
        assert resp.status_code == 201, resp.text

    listed = http.get(f"/model-affinity/{ga['id']}/models").json()
    assert listed == [m1, m2]
    assert all(set(item) == MODEL_KEYS for item in listed)
    assert http.get(f"/model-affinity/{m1['id']}/groups").json() == [ga, gb]

    assert_error(http.post(f"/model-affinity/nope/models/{m1['id']}"), 404, "not_found")
    assert_error(http.post(f"/model-affinity/{ga['id']}/models/nope"), 404, "not_found")
    assert_error(http.get("/model-affinity/nope/models"), 404, "not_found")
    assert_error(http.get("/model-affinity/nope/groups"), 404, "not_found")
    assert_error(http.delete(f"/model-affinity/{gb['id']}/models/{m2['id']}"), 404, "not_found")

    assert http.delete(f"/model-affinity/{ga['id']}/models/{m2['id']}").status_code == 200
    assert http.get(f"/model-affinity/{ga['id']}/models").json() == [m1]
    assert http.get(f"/model-affinity/{m2['id']}/groups").json() == []

    assert http.delete(f"/models/{m1['id']}").status_code == 200
    assert http.get(f"/model-affinity/{ga['id']}/models").json() == []
    assert http.get(f"/model-affinity/{gb['id']}/models").json() == []
    assert_error(http.get(f"/model-affinity/{m1['id']}/groups"), 404, "not_found")

    assert http.post(f"/model-affinity/{gb['id']}/models/{m2['id']}").status_code == 201
    assert http.delete(f"/groups/{gb['id']}").status_code == 200
    with db.session() as session:
        left = session.exec(select(GroupModelRow).where(GroupModelRow.group_id == gb["id"]))
        assert left.all() == []
    assert http.get(f"/model-affinity/{m2['id']}/groups").json() == []


def test_remove_memberships(stack: Stack, db: Database) -> None:
    """The helper DELETE /backends/{id} and /models/{id} call to drop a resource's groups."""
    http = stack.http
    backend, model = add_backend(http, f"b-{uid()}"), add_model(http, f"m-{uid()}")
    keep_backend = add_backend(http, f"keep-{uid()}")
    group = add_group(http, f"g-{uid()}")
    for path in (
        f"/backend-affinity/{group['id']}/backends/{backend['id']}",
        f"/backend-affinity/{group['id']}/backends/{keep_backend['id']}",
        f"/model-affinity/{group['id']}/models/{model['id']}",
    ):
        assert http.post(path).status_code == 201

    with db.session() as session:
        remove_memberships(session, backend_id=backend["id"], model_id=model["id"])
        session.commit()
    with db.session() as session:
        backends = session.exec(
            select(GroupBackendRow).where(GroupBackendRow.group_id == group["id"])
        )
        assert [row.backend_id for row in backends.all()] == [keep_backend["id"]]
        models = session.exec(select(GroupModelRow).where(GroupModelRow.group_id == group["id"]))
        assert models.all() == []
    # Nothing to remove is fine too.
    with db.session() as session:
        remove_memberships(session, backend_id="nope")
        remove_memberships(session)
        session.commit()


def test_openapi_lists_group_routes(stack: Stack) -> None:
    with httpx.Client(base_url=stack.api.url, timeout=30) as anon:
        paths = anon.get("/openapi.json").json()["paths"]
    expected = {
        "/groups": {"get", "post"},
        "/groups/{id}": {"get", "put", "delete"},
        "/group-by-name/{name}": {"get"},
        "/group-by-purpose/{purpose}": {"get"},
        "/backend-affinity/{groupID}/backends/{backendID}": {"post", "delete"},
        "/backend-affinity/{groupID}/backends": {"get"},
        "/backend-affinity/{backendID}/groups": {"get"},
        "/model-affinity/{groupID}/models/{modelID}": {"post", "delete"},
        "/model-affinity/{groupID}/models": {"get"},
        "/model-affinity/{modelID}/groups": {"get"},
    }
    for path, methods in expected.items():
        assert path in paths, f"{path} missing from /openapi.json"
        assert methods <= set(paths[path]), (path, sorted(paths[path]))
        for method in methods:
            assert paths[path][method].get("security"), (path, method)
    with httpx.Client(base_url=stack.api.url, timeout=30) as anon:
        assert_error(anon.get("/groups"), 401, "missing_api_key")


def test_concurrent_assigns_make_one_membership(stack: Stack, db: Database) -> None:
    http = stack.http
    backend, group = add_backend(http, f"b-{uid()}"), add_group(http, f"g-{uid()}")
    path = f"/backend-affinity/{group['id']}/backends/{backend['id']}"
    with ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(lambda _: http.post(path).status_code, range(8)))
    assert codes == [200] * 7 + [201]
    assert http.get(f"/backend-affinity/{group['id']}/backends").json() == [backend]
