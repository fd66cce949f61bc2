"""Event ids, raw-event ids and nids belong to the tenant, over real HTTP on both databases:
two tenants can use the same event id (issue #11: "two tenants can use the same event id"), a
tenant's own duplicate is still a 409, nothing answers differently because another tenant holds
an id, and the nids a tenant sees (and resumes its stream by) carry nothing of other tenants'
traffic, also under concurrent appends."""

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.stack import Stack
from tests.test_events import SSEReader, assert_error
from tests.test_ops import make_key


def uniq(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:8]}"


@pytest.fixture
def other(stack: Stack) -> Iterator[tuple[str, httpx.Client]]:
    """A second tenant's key and client on the same API."""
    tenant = "t-" + uuid.uuid4().hex[:12]
    key = make_key(stack.settings.resolved_database_url(), tenant, ["admin"])
    with httpx.Client(base_url=stack.api.url, headers={"X-API-Key": key}, timeout=30) as http:
        yield key, http


def post(http: httpx.Client, path: str, status: int = 201, **kwargs: Any) -> dict[str, Any]:
    resp = http.post(path, **kwargs)
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    return body


def test_two_tenants_use_the_same_event_id(stack: Stack, other: tuple[str, httpx.Client]) -> None:
    _, theirs = other
    mine = stack.http
    kind, order = uniq("order.created"), f"order-{uuid.uuid4().hex[:8]}"

    # the other tenant claims the id first; this tenant can still use it, and learns nothing
    first = post(theirs, "/events", json={"id": order, "event_type": kind, "data": {"who": "b"}})
    own = post(mine, "/events", json={"id": order, "event_type": kind, "data": {"who": "a"}})
    assert own["id"] == first["id"] == order
    # a tenant's own duplicate is still refused, with the same answer in both tenants
    again = {"id": order, "event_type": kind}
    mine_409 = assert_error(mine.post("/events", json=again), 409, "event_exists")
    theirs_409 = assert_error(theirs.post("/events", json=again), 409, "event_exists")
    assert mine_409 == theirs_409
    assert [e["data"] for e in mine.get("/events/type", params={"event_type": kind}).json()] == [
        {"who": "a"}
    ]
    assert [e["data"] for e in theirs.get("/events/type", params={"event_type": kind}).json()] == [
        {"who": "b"}
    ]

    # /ingest: a webhook's delivery id (eventIDField) is the event id, per tenant as well
    path = uniq("hooks/shop")
    mapping = {"path": path, "eventType": kind, "eventIDField": "delivery"}
    for http in (mine, theirs):
        post(http, "/mappings", json=mapping)
    delivery = {"delivery": f"d-{uuid.uuid4().hex[:8]}"}
    assert (
        post(theirs, "/ingest", params={"path": path}, json=delivery)["id"] == delivery["delivery"]
    )
    assert post(mine, "/ingest", params={"path": path}, json=delivery)["id"] == delivery["delivery"]
    assert_error(mine.post("/ingest", params={"path": path}, json=delivery), 409, "event_exists")

    # raw events: the same id in both tenants; each reads its own under its own nid
    raw_id = f"raw-{uuid.uuid4().hex[:8]}"
    raw_b = post(theirs, "/raw-events", json={"id": raw_id, "path": path, "payload": {"b": 1}})
    raw_a = post(mine, "/raw-events", json={"id": raw_id, "path": path, "payload": {"a": 1}})
    assert mine.get(f"/raw-events/{raw_a['nid']}").json()["payload"] == {"a": 1}
    assert theirs.get(f"/raw-events/{raw_b['nid']}").json()["payload"] == {"b": 1}
    refused = mine.post("/raw-events", json={"id": raw_id, "path": path})
    assert_error(refused, 409, "raw_event_exists")


def test_nids_carry_nothing_of_other_tenants_traffic(
    stack: Stack, other: tuple[str, httpx.Client]
) -> None:
    _, theirs = other
    mine = stack.http
    kind = uniq("nids")
    before = post(mine, "/events", json={"event_type": kind})
    # the other tenant starts at 1 and its traffic leaves no gap in this tenant's nids
    assert post(theirs, "/events", json={"event_type": kind})["nid"] == 1
    for _ in range(5):
        post(theirs, "/events", json={"event_type": kind})
    after = post(mine, "/events", json={"event_type": kind})
    assert after["nid"] == before["nid"] + 1
    raw_first = post(theirs, "/raw-events", json={"path": "p"})
    raw_mine = post(mine, "/raw-events", json={"path": "p"})
    raw_next = post(theirs, "/raw-events", json={"path": "p"})
    assert raw_next["nid"] == raw_first["nid"] + 1
    # another tenant's raw nid is simply not there (or is one of this tenant's own)
    assert_error(theirs.get(f"/raw-events/{raw_mine['nid'] + 1000}"), 404, "not_found")


def test_streams_resume_per_tenant_under_concurrent_appends(
    stack: Stack, other: tuple[str, httpx.Client]
) -> None:
    """Two tenants, two writers each, one event type: each tenant's stream gets exactly its
    own events, each once, in nid order, and its nids have no gaps; resuming by a nid of one
    tenant says nothing in the other."""
    key, _ = other
    kind = uniq("busy")
    appended: dict[str, list[int]] = {"mine": [], "theirs": []}

    def writer(who: str, api_key: str) -> None:
        with httpx.Client(base_url=stack.api.url, headers={"X-API-Key": api_key}) as http:
            for i in range(20):
                resp = http.post("/events", json={"event_type": kind, "data": {"i": i}})
                assert resp.status_code == 201, resp.text
                appended[who].append(resp.json()["nid"])

    with (
        SSEReader(stack, f"/events/stream/{kind}") as mine_stream,
        SSEReader(stack, f"/events/stream/{kind}", {"X-API-Key": key}) as their_stream,
    ):
        threads = [
            threading.Thread(target=writer, args=(who, api_key))
            for who, api_key in (("mine", stack.API_KEY), ("theirs", key)) * 2
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        mine_got = [mine_stream.next()["nid"] for _ in range(40)]
        their_got = [their_stream.next()["nid"] for _ in range(40)]
        mine_stream.expect_nothing(0.5)
        their_stream.expect_nothing(0.1)
    assert mine_got == sorted(appended["mine"])
    assert their_got == sorted(appended["theirs"]) == list(range(1, 41))
    assert mine_got == list(range(mine_got[0], mine_got[0] + 40))

    # resuming the other tenant's stream from its nid 30 gives its last ten, nothing of ours
    headers = {"X-API-Key": key, "Last-Event-ID": "30"}
    with SSEReader(stack, f"/events/stream/{kind}", headers) as resumed:
        assert [resumed.next()["nid"] for _ in range(10)] == list(range(31, 41))
        resumed.expect_nothing(0.5)
