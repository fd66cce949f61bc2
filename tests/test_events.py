"""The event store over real HTTP on both databases: append, queries, types, delete, raw events,
ingest with mappings, replay, sync and the live SSE stream with Last-Event-ID resume."""

import contextlib
import json
import queue
import socket
import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from core.db import Database
from core.events import mappings, queries, store
from core.models import EventMappingRow, rfc3339
from tests.stack import Stack


def uniq(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:8]}"


def ago(**delta: float) -> str:
    return rfc3339(datetime.now(UTC) - timedelta(**delta))


def append(stack: Stack, status: int = 201, **event: Any) -> dict[str, Any]:
    resp = stack.http.post("/events", json=event)
    assert resp.status_code == status, resp.text
    body: dict[str, Any] = resp.json()
    return body


def assert_error(resp: httpx.Response, status: int, code: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"]["code"] == code, body
    assert body["detail"] == body["error"]["message"]
    message: str = body["error"]["message"]
    return message


class SSEReader:
    """Reads an SSE response on a thread of its own; messages arrive on a queue."""

    def __init__(self, stack: Stack, path: str, headers: dict[str, str] | None = None) -> None:
        self.client = httpx.Client(
            base_url=stack.api.url,
            headers={"X-API-Key": stack.API_KEY, **(headers or {})},
            timeout=httpx.Timeout(10, read=None),
        )
        self.path = path
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.status = 0
        self.content_type = ""
        self._socket: socket.socket | None = None
        self._open = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> "SSEReader":
        self._thread.start()
        assert self._open.wait(10), "the stream did not open"
        assert self.status == 200
        return self

    def __exit__(self, *exc: object) -> None:
        # Closing the client from this thread does not wake a blocked read; shutting the
        # socket down does, and the server sees the disconnect at once.
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self.client.close()

    def _read(self) -> None:
        try:
            with self.client.stream("GET", self.path) as resp:
                self.status = resp.status_code
                self._socket = resp.extensions["network_stream"].get_extra_info("socket")
                self.content_type = resp.headers.get("content-type", "")
                self._open.set()
                fields: dict[str, str] = {}
                for line in resp.iter_lines():
                    if line == "":
                        if "data" in fields:
                            self.messages.put(fields)
                        fields = {}
                    elif not line.startswith(":"):
                        name, _, value = line.partition(":")
                        fields[name] = value.removeprefix(" ")
        except (httpx.HTTPError, RuntimeError):
            pass  # closed by __exit__
        finally:
            self._open.set()

    def next(self, timeout: float = 10) -> dict[str, Any]:
        message = self.messages.get(timeout=timeout)
        event: dict[str, Any] = json.loads(message["data"])
        assert message["id"] == str(event["nid"])
        return event

    def expect_nothing(self, wait: float = 1.0) -> None:
        with pytest.raises(queue.Empty):
            self.messages.get(timeout=wait)


# --------------------------------------------------------------------------- append


def test_append_validates_and_returns_json_objects(stack: Stack) -> None:
    kind = uniq("order.created")
    event = append(
        stack,
        event_type=kind,
        event_source="shop",
        aggregate_type="order",
        aggregate_id="o-1",
        version=3,
        data=json.dumps({"total": 12.5}),  # seed 003 sends JSON-encoded strings
        metadata='{"trace": "abc"}',
    )
    assert event["data"] == {"total": 12.5}
    assert event["metadata"] == {"trace": "abc", "chainloom_depth": 0}
    assert event["version"] == 3 and event["event_source"] == "shop"
    assert isinstance(event["nid"], int) and event["nid"] > 0
    assert uuid.UUID(event["id"])
    created = datetime.fromisoformat(event["created_at"].replace("Z", "+00:00"))
    assert abs(created - datetime.now(UTC)) < timedelta(seconds=30)

    # objects are accepted as they are; an id and a created_at within ±10 minutes are kept
    own_id = str(uuid.uuid4())
    at = ago(minutes=9)
    other = append(stack, id=own_id, event_type=kind, data={"a": [1, 2]}, created_at=at)
    assert other["id"] == own_id and other["data"] == {"a": [1, 2]}
    assert other["created_at"] == at
    assert other["metadata"] == {"chainloom_depth": 0}
    assert other["nid"] > event["nid"]

    http = stack.http
    assert_error(http.post("/events", json={"id": own_id, "event_type": kind}), 409, "event_exists")
    message = assert_error(http.post("/events", json={"data": {}}), 422, "invalid_event")
    assert "event_type is required" in message
    assert_error(
        http.post("/events", json={"event_type": kind, "data": "{oops"}), 422, "invalid_json"
    )
    message = assert_error(
        http.post("/events", json={"event_type": kind, "metadata": "[1]"}), 422, "invalid_json"
    )
    assert "metadata must be a JSON object" in message
    assert_error(
        http.post("/events", json={"event_type": kind, "created_at": "yesterday"}),
        400,
        "invalid_time",
    )


def test_append_refuses_timestamps_outside_ten_minutes(stack: Stack) -> None:
    kind = uniq("clock")
    for created_at, word in ((ago(minutes=11), "behind"), (ago(minutes=-11), "ahead of")):
        resp = stack.http.post("/events", json={"event_type": kind, "created_at": created_at})
        message = assert_error(resp, 422, "created_at_out_of_range")
        assert f"minutes {word} the server clock" in message
        assert "±10 minutes" in message
        assert resp.json()["error"]["param"] == "created_at"
    # Go's zero time means "not set" to contenox clients
    event = append(stack, event_type=kind, created_at="0001-01-01T00:00:00Z")
    assert event["created_at"] > ago(minutes=1)
    assert stack.http.get("/events/type", params={"event_type": kind}).json() == [event]


# --------------------------------------------------------------------------- queries


def test_queries_by_type_source_aggregate_and_time(stack: Stack) -> None:
    kind, other_kind, source, user = uniq("q.type"), uniq("q.other"), uniq("src"), uniq("u")
    old = append(stack, event_type=kind, event_source=source, created_at=ago(minutes=8))
    mid = append(
        stack,
        event_type=kind,
        event_source=source,
        aggregate_type="user",
        aggregate_id=user,
        created_at=ago(minutes=4),
    )
    new = append(
        stack, event_type=other_kind, event_source=source, aggregate_type="user", aggregate_id=user
    )
    http = stack.http

    def ids(path: str, **params: Any) -> list[str]:
        resp = http.get(path, params=params)
        assert resp.status_code == 200, resp.text
        return [e["id"] for e in resp.json()]

    # by type: newest first by default, asc on request, limit, from/to inclusive
    assert ids("/events/type", event_type=kind) == [mid["id"], old["id"]]
    assert ids("/events/type", event_type=kind, order="asc") == [old["id"], mid["id"]]
    assert ids("/events/type", event_type=kind, limit=1) == [mid["id"]]
    assert ids("/events/type", event_type=kind, **{"from": ago(minutes=6)}) == [mid["id"]]
    assert ids("/events/type", event_type=kind, to=ago(minutes=6)) == [old["id"]]
    assert ids("/events/type", event_type=kind, to=old["created_at"]) == [old["id"]]
    # an unencoded "+00:00" arrives as " 00:00" and still parses
    plus = (datetime.now(UTC) - timedelta(minutes=6)).isoformat()
    assert ids("/events/type", event_type=kind, **{"from": plus.replace("+", " ")}) == [mid["id"]]

    # by source, optionally narrowed to a type
    assert ids("/events/source", event_source=source) == [new["id"], mid["id"], old["id"]]
    assert ids("/events/source", event_source=source, event_type=other_kind) == [new["id"]]

    # by aggregate, optionally narrowed to a type
    assert ids("/events/aggregate", aggregate_type="user", aggregate_id=user) == [
        new["id"],
        mid["id"],
    ]
    agg = ids("/events/aggregate", aggregate_type="user", aggregate_id=user, event_type=kind)
    assert agg == [mid["id"]]

    # refusals are 400s that name the parameter
    assert_error(http.get("/events/type"), 400, "missing_parameter")
    assert_error(http.get("/events/source"), 400, "missing_parameter")
    assert_error(
        http.get("/events/aggregate", params={"aggregate_type": "user"}), 400, "missing_parameter"
    )
    message = assert_error(
        http.get("/events/type", params={"event_type": kind, "from": ago(), "to": ago(hours=1)}),
        400,
        "invalid_time_range",
    )
    assert "is after" in message
    assert_error(
        http.get("/events/type", params={"event_type": kind, "limit": "x"}), 400, "invalid_limit"
    )
    assert_error(
        http.get("/events/type", params={"event_type": kind, "order": "up"}), 400, "invalid_order"
    )


def test_types_in_range_and_delete_by_type(stack: Stack) -> None:
    early, late = uniq("types.early"), uniq("types.late")
    append(stack, event_type=early, created_at=ago(minutes=9))
    append(stack, event_type=early, created_at=ago(minutes=8))
    kept = append(stack, event_type=early, created_at=ago(minutes=1))
    append(stack, event_type=late)
    http = stack.http

    everything = http.get("/events/types", params={"limit": 1000}).json()
    assert early in everything and late in everything
    assert everything == sorted(everything)
    window = http.get(
        "/events/types", params={"from": ago(minutes=10), "to": ago(minutes=5), "limit": 1000}
    ).json()
    assert early in window and late not in window
    assert len(http.get("/events/types", params={"limit": 1}).json()) == 1

    # delete only the early type's events within the window
    resp = http.delete(
        "/events/type", params={"event_type": early, "from": ago(minutes=10), "to": ago(minutes=5)}
    )
    assert resp.status_code == 200 and resp.json() == f"deleted 2 events of type {early}"
    assert [e["id"] for e in http.get("/events/type", params={"event_type": early}).json()] == [
        kept["id"]
    ]
    assert len(http.get("/events/type", params={"event_type": late}).json()) == 1
    assert_error(http.delete("/events/type"), 400, "missing_parameter")
    resp = http.delete("/events/type", params={"event_type": late})
    assert resp.json() == f"deleted 1 events of type {late}"
    assert late not in http.get("/events/types", params={"limit": 1000}).json()


def test_tenants_never_see_each_other(stack: Stack) -> None:
    kind = uniq("tenant")
    db = Database(stack.settings.resolved_database_url())
    try:
        theirs, _ = store.append_event(db, "someone-else", {"event_type": kind})
        assert queries.events_by_type(db, "someone-else", kind)[0]["id"] == theirs["id"]
    finally:
        db.dispose()
    assert stack.http.get("/events/type", params={"event_type": kind}).json() == []
    assert kind not in stack.http.get("/events/types", params={"limit": 1000}).json()
    resp = stack.http.delete("/events/type", params={"event_type": kind})
    assert resp.json() == f"deleted 0 events of type {kind}"


# ------------------------------------------------------------- raw events and mappings


def test_raw_events(stack: Stack) -> None:
    http = stack.http
    path = uniq("/hooks/raw")
    resp = http.post(
        "/raw-events", json={"path": path, "headers": {"X-Thing": "1"}, "payload": {"k": "v"}}
    )
    assert resp.status_code == 201, resp.text
    raw = resp.json()
    assert raw["payload"] == {"k": "v"} and raw["headers"] == {"x-thing": "1"}
    assert http.get(f"/raw-events/{raw['nid']}").json() == raw
    listed = http.get("/raw-events", params={"from": ago(minutes=1)}).json()
    assert raw in listed
    assert listed == sorted(listed, key=lambda r: r["received_at"], reverse=True)
    assert_error(
        http.get(f"/raw-events/{raw['nid']}", params={"to": ago(hours=1)}), 404, "not_found"
    )
    assert_error(http.get("/raw-events/0"), 400, "invalid_nid")
    assert_error(http.get("/raw-events/99999999"), 404, "not_found")


def test_out_of_range_numbers_and_bad_json_are_4xx(stack: Stack) -> None:
    """Found by fuzzing: each of these was a 500 (PostgreSQL integer overflow or an error
    raised inside a pydantic validator)."""
    http = stack.http
    kind = uniq("fuzz")
    message = assert_error(
        http.post("/events", json={"event_type": kind, "version": 2**53}), 422, "invalid_event"
    )
    assert "version must be an integer from 0 to 2147483647" in message
    assert append(stack, event_type=kind, version=2**31 - 1)["version"] == 2**31 - 1
    mapping = {"path": uniq("fuzz"), "eventType": kind}
    for bad in ({"version": 2**31}, {"metadataMapping": "[1]"}, {"metadataMapping": "{oops"}):
        resp = http.post("/mappings", json={**mapping, **bad})
        assert_error(resp, 422, "validation_error")
        assert resp.json()["error"]["param"] == "/" + next(iter(bad)), resp.text
        resp = http.put("/mapping", params={"path": mapping["path"]}, json={**mapping, **bad})
        assert_error(resp, 422, "validation_error")
    assert_error(http.get(f"/raw-events/{2**63}"), 400, "invalid_nid")
    resp = http.get(f"/events/stream/{kind}", headers={"Last-Event-ID": str(2**63)})
    assert_error(resp, 400, "invalid_last_event_id")


def test_mappings_crud_and_sync(stack: Stack) -> None:
    http = stack.http
    path = uniq("github")
    mapping = {
        "path": path,
        "eventTypeField": "$.action",
        "eventType": "github.unknown",
        "eventSource": "github.com",
        "aggregateType": "github.repo",
        "aggregateIDField": "repository.full_name",
        "eventIDField": "delivery",
        "version": 2,
        "metadataMapping": {"event": "header:X-GitHub-Event", "sender": "sender.login"},
    }
    resp = http.post("/mappings", json=mapping)
    assert resp.status_code == 201, resp.text
    assert resp.json() == {**mapping, "aggregateTypeField": "", "eventSourceField": ""}
    assert_error(http.post("/mappings", json=mapping), 409, "already_exists")
    assert_error(http.post("/mappings", json={"path": uniq("x")}), 422, "invalid_mapping")
    assert http.get("/mapping", params={"path": path}).json()["version"] == 2
    listed = http.get("/mappings").json()
    assert path in [m["path"] for m in listed]
    assert [m["path"] for m in listed] == sorted(m["path"] for m in listed)

    # PUT: the query path wins over the body's
    resp = http.put(
        "/mapping", params={"path": path}, json={**mapping, "path": "ignored", "version": 5}
    )
    assert resp.status_code == 200 and resp.json()["path"] == path
    assert http.get("/mapping", params={"path": path}).json()["version"] == 5
    assert_error(
        http.put("/mapping", params={"path": uniq("none")}, json=mapping), 404, "not_found"
    )
    assert http.post("/sync").json().startswith("mappings synced: ")

    assert http.delete("/mapping", params={"path": path}).json() == "mapping removed"
    assert_error(http.get("/mapping", params={"path": path}), 404, "not_found")
    assert_error(http.delete("/mapping", params={"path": path}), 404, "not_found")
    assert_error(http.get("/mapping"), 400, "missing_parameter")


def test_ingest_applies_the_mapping_and_replay_reemits(stack: Stack) -> None:
    http = stack.http
    path = uniq("hooks/github")
    kind = uniq("github.opened")
    payload = {
        "action": kind,
        "delivery": str(uuid.uuid4()),
        "repository": {"full_name": "octo/cat"},
        "sender": {"login": "ada"},
    }
    # no mapping yet: the payload is kept and the error says how to replay it
    resp = http.post(
        "/ingest", params={"path": path}, json=payload, headers={"X-GitHub-Event": "pull_request"}
    )
    message = assert_error(resp, 404, "mapping_not_found")
    raw_nid = resp.json()["raw_event"]["nid"]
    assert f"/replay?nid={raw_nid}" in message
    raw = http.get(f"/raw-events/{raw_nid}").json()
    assert raw["payload"] == payload and raw["path"] == path
    assert raw["headers"]["x-github-event"] == "pull_request"
    assert "x-api-key" not in raw["headers"]  # credentials are never stored

    mapping = {
        "path": path,
        "eventTypeField": "action",
        "eventSource": "github.com",
        "aggregateType": "github.repo",
        "aggregateIDField": "$.repository.full_name",
        "eventIDField": "delivery",
        "metadataMapping": {"event": "header:x-github-event", "sender": "sender.login"},
    }
    assert http.post("/mappings", json=mapping).status_code == 201
    # replay the kept raw event through the new mapping
    resp = http.post("/replay", params={"nid": raw_nid})
    assert resp.status_code == 201, resp.text
    replayed = resp.json()
    assert replayed["event_type"] == kind and replayed["aggregate_id"] == "octo/cat"
    assert replayed["event_source"] == "github.com" and replayed["aggregate_type"] == "github.repo"
    assert replayed["data"] == payload
    assert replayed["metadata"]["event"] == "pull_request"
    assert replayed["metadata"]["sender"] == "ada"
    assert replayed["metadata"]["raw_event_nid"] == raw_nid
    assert replayed["metadata"]["replayed"] is True

    # ingest now maps at once; the payload's delivery id becomes the event id
    resp = http.post(
        "/ingest", params={"path": path}, json=payload, headers={"X-GitHub-Event": "push"}
    )
    assert resp.status_code == 201, resp.text
    event = resp.json()
    assert event["id"] == payload["delivery"] and event["metadata"]["event"] == "push"
    found = http.get(
        "/events/aggregate",
        params={"aggregate_type": "github.repo", "aggregate_id": "octo/cat", "event_type": kind},
    )
    assert {e["id"] for e in found.json()} == {event["id"], replayed["id"]}

    # a payload the mapping gives no type for is refused (and kept)
    other = uniq("hooks/fixed")
    http.post("/mappings", json={"path": other, "eventTypeField": "kind"})
    assert_error(
        http.post("/ingest", params={"path": other}, json={"x": 1}), 422, "mapping_no_event_type"
    )
    assert_error(http.post("/replay", params={"nid": 99999999}), 404, "not_found")
    assert_error(http.post("/replay"), 400, "missing_parameter")
    assert_error(http.post("/ingest", json={}), 400, "missing_parameter")


def test_mapping_cache_is_refreshed_by_sync(stack: Stack) -> None:
    """Another process changing a mapping is seen after POST /sync (or the cache TTL)."""
    http = stack.http
    path = uniq("cache")
    http.post("/mappings", json={"path": path, "eventType": "first"})
    assert http.post("/ingest", params={"path": path}, json={}).json()["event_type"] == "first"
    # as another API process would: straight to the database, past this process's cache
    db = Database(stack.settings.resolved_database_url())
    try:
        with db.session() as session:
            row = session.get(EventMappingRow, (stack.settings.default_tenant, path))
            assert row is not None
            row.config = {**row.config, "eventType": "second"}
            session.add(row)
            session.commit()
    finally:
        db.dispose()
    assert http.post("/ingest", params={"path": path}, json={}).json()["event_type"] == "first"
    http.post("/sync")
    assert http.post("/ingest", params={"path": path}, json={}).json()["event_type"] == "second"


def test_extract_and_apply_mapping() -> None:
    payload = {"a": {"b": [{"c": 1}, {"c": "two"}]}, "x.y": 5, "n": None}
    assert mappings.extract(payload, "a.b[1].c") == "two"
    assert mappings.extract(payload, "$.a.b[0].c") == 1
    assert mappings.extract(payload, "a.b.0.c") == 1
    assert mappings.extract(payload, "['x.y']") == 5
    assert mappings.extract(payload, "a.missing.c") is None
    assert mappings.extract(payload, "a.b[9]") is None
    assert mappings.extract(payload, "n.deeper") is None
    config = mappings.MappingConfig.model_validate(
        {
            "path": "p",
            "eventType": "fixed",
            "eventTypeField": "kind",
            "aggregateIDField": "a.b",
            "metadataMapping": '{"h": "headers.X-Id", "v": "payload:a.b[1].c"}',
        }
    )
    event = mappings.apply_mapping(config, payload, {"x-id": "42"})
    # eventTypeField found nothing: the fixed eventType; an object is no aggregate id
    assert event["event_type"] == "fixed" and event["aggregate_id"] == ""
    assert event["metadata"] == {"h": "42", "v": "two"}
    assert "id" not in event


def test_parse_time_forms() -> None:
    expected = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    for text in (
        "2024-05-01T12:00:00.123456789Z",
        "2024-05-01T14:00:00.123456+02:00",
        "2024-05-01T12:00:00.123456 00:00",
        "2024-05-01T12:00:00.123456",
    ):
        assert store.parse_time(text, "from") == expected, text
    with pytest.raises(store.EventError):
        store.parse_time("2024-13-01", "from")


# --------------------------------------------------------------------------- the live stream


def test_stream_delivers_live_appends_and_resumes(stack: Stack) -> None:
    kind = uniq("live")
    before = append(stack, event_type=kind, data={"n": 0})  # before the stream: not sent
    with SSEReader(stack, f"/events/stream/{kind}") as reader:
        assert reader.content_type.startswith("text/event-stream")
        first = append(stack, event_type=kind, data={"n": 1})
        append(stack, event_type=uniq("noise"))  # another type: not on this stream
        second = append(stack, event_type=kind, data={"n": 2})
        got = [reader.next(), reader.next()]
        assert got == [first, second]
        reader.expect_nothing(0.8)
    assert before["nid"] < first["nid"]

    # the client was away while two events came; Last-Event-ID brings them, in order
    third = append(stack, event_type=kind, data={"n": 3})
    fourth = append(stack, event_type=kind, data={"n": 4})
    headers = {"Last-Event-ID": str(second["nid"])}
    with SSEReader(stack, f"/events/stream/{kind}", headers) as reader:
        assert [reader.next(), reader.next()] == [third, fourth]
        fifth = append(stack, event_type=kind, data={"n": 5})
        assert reader.next() == fifth
    # the query form for clients that cannot set headers; from the start of time
    with SSEReader(stack, f"/events/stream/{kind}?lastEventId=0") as reader:
        assert [reader.next()["data"]["n"] for _ in range(6)] == [0, 1, 2, 3, 4, 5]
    resp = stack.http.get(f"/events/stream/{kind}", headers={"Last-Event-ID": "abc"})
    assert_error(resp, 400, "invalid_last_event_id")


def test_stream_loses_nothing_under_concurrent_appends(stack: Stack) -> None:
    """Four writers at once: the stream sees every event, each once, in nid order."""
    kind = uniq("busy")
    appended: list[int] = []

    def writer(k: int) -> None:
        with httpx.Client(base_url=stack.api.url, headers={"X-API-Key": stack.API_KEY}) as http:
            for i in range(25):
                resp = http.post("/events", json={"event_type": kind, "data": {"k": k, "i": i}})
                assert resp.status_code == 201, resp.text
                appended.append(resp.json()["nid"])

    with SSEReader(stack, f"/events/stream/{kind}") as reader:
        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        received = [reader.next()["nid"] for _ in range(100)]
        reader.expect_nothing(0.5)
    assert received == sorted(appended)


def test_stream_needs_auth(stack: Stack) -> None:
    resp = httpx.get(f"{stack.api.url}/events/stream/x", timeout=10)
    assert resp.status_code == 401


# --------------------------------------------------------------------------- benchmark


@pytest.mark.bench
@pytest.mark.timeout(1200)
def test_event_store_benchmark(temporal_address: str, tmp_path: Any) -> None:
    """`make bench`: 1M events in a scratch PostgreSQL database; figures in docs/benchmarks.md."""
    from benchmarks.events import run

    results = run(
        events=1_000_000, temporal_address=temporal_address, json_path=tmp_path / "events.json"
    )
    for name, row in results["queries"].items():
        assert row["uses_index"], (name, row["plan"])
