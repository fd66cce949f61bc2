"""Every route of the OpenAPI document, called as nobody, as another tenant and as a viewer.

Tenant A (registered through /register) creates one of everything; each resource carries a
secret string that never appears in a URL. Then:
- anonymous callers get 401 on every route but the public ones;
- tenant B's admin, calling every route with A's ids filled in, never sees A's secret, gets
  403/404 wherever the path names one of A's rows, and leaves A's data exactly as it was;
- A's viewer (and a read-only API key) may read but gets 403 on every change, and on the
  identity and audit routes that need `manage`.
Adding a route without a permission rule fails `test_every_route_has_a_rule`.
"""

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from core.identity.permissions import SEGMENT_TYPES, SELF
from tests.scripted_llm import ScriptedLLM
from tests.stack import Stack

PUBLIC = {
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/ping"),
    ("POST", "/register"),
    ("POST", "/login"),
    ("POST", "/token_refresh"),
    ("POST", "/ui/login"),
    ("POST", "/ui/register"),
    ("POST", "/ui/logout"),
    ("POST", "/ui/token_refresh"),
    ("POST", "/logout"),
}
STREAMS = {("GET", "/events/stream/{eventType}"), ("GET", "/queue/inProgress")}
# Lists filtered by a name in the caller's own namespace: another tenant's name finds nothing.
NAME_FILTERS = {
    "/event-triggers/event-type/{eventType}",
    "/event-triggers/function/{functionName}",
    "/activity/operations/{op}/{subject}",
}
# Routes whose path parameter is a number counted per tenant (raw-event nids): the outsider's
# own row of that number is a right answer; the secret check still catches A's row.
TENANT_NUMBERED = {"/raw-events/{nid}"}
# Routes whose path parameters name rows of the caller's own tenant by id or name: called
# with A's values by an outsider, they must answer 403 or 404.
ROW_SEGMENTS = {
    "taskchains",
    "runs",
    "backends",
    "models",
    "groups",
    "group-by-name",
    "backend-affinity",
    "model-affinity",
    "hooks",
    "functions",
    "event-triggers",
    "raw-events",
    "users",
    "api-keys",
    "access-control",
    "tenants",
    "activity",
    "projects",
}
MANAGE_TO_READ = {"users", "access-control", "api-keys", "activity", "audit"}


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Operation:
    method: str
    template: str

    @property
    def segment(self) -> str:
        return self.template.strip("/").split("/", 1)[0]


@dataclass
class TenantA:
    secret: str
    values: dict[tuple[str, str], str] = field(default_factory=dict)
    queries: dict[str, dict[str, str]] = field(default_factory=dict)
    bodies: dict[str, Any] = field(default_factory=dict)
    put_bodies: dict[str, Any] = field(default_factory=dict)


def operations(spec: dict[str, Any]) -> list[Operation]:
    ops = []
    for template, methods in spec["paths"].items():
        for method in methods:
            if method.upper() in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                ops.append(Operation(method.upper(), template))
    return ops


def client(stack: Stack, credential: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    return httpx.Client(base_url=stack.api.url, headers=headers, timeout=60)


def register(stack: Stack, tag: str) -> dict[str, Any]:
    with client(stack, None) as anon:
        resp = anon.post(
            "/register",
            json={
                "email": f"{uniq(tag)}@example.com",
                "password": "correct horse battery",
                "friendlyName": tag,
            },
        )
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


def ok(resp: httpx.Response, *codes: int) -> dict[str, Any]:
    assert resp.status_code in (codes or (200, 201, 202)), f"{resp.request.url}: {resp.text}"
    body: dict[str, Any] = resp.json() if resp.content else {}
    return body


def populate(stack: Stack, http: httpx.Client, llm: ScriptedLLM) -> TenantA:
    """One of everything in tenant A, each holding `secret` somewhere no URL shows."""
    secret = uniq("SECRET")
    a = TenantA(secret)
    chain_id = uniq("chain")
    chain = {
        "id": chain_id,
        "description": secret,
        "tasks": [
            {
                "id": "only",
                "handler": "noop",
                "transition": {"branches": [{"operator": "default", "goto": "end"}]},
            }
        ],
    }
    ok(http.post("/taskchains", json=chain))
    run = ok(http.post("/runs", json={"chainId": chain_id, "input": secret}))
    backend = ok(
        http.post(
            "/backends", json={"name": uniq("be"), "baseUrl": llm.openai_base, "type": "openai"}
        )
    )
    model_name = uniq("model")
    model = ok(http.post("/models", json={"model": model_name}))
    group = ok(http.post("/groups", json={"name": uniq("grp"), "purposeType": uniq("purpose")}))
    ok(http.post(f"/backend-affinity/{group['id']}/backends/{backend['id']}"))
    ok(http.post(f"/model-affinity/{group['id']}/models/{model['id']}"))
    ok(http.post("/providers/openai/configure", json={"apiKey": f"sk-{secret}", "upsert": True}))
    hook = ok(http.post("/hooks/remote", json={"name": uniq("hook"), "endpointUrl": llm.url}))
    function = uniq("fn")
    ok(
        http.post(
            "/functions",
            json={"name": function, "script": f"function main(x) {{ return '{secret}'; }}"},
        )
    )
    event_type = uniq("evt")
    trigger = uniq("trg")
    ok(
        http.post(
            "/event-triggers",
            json={
                "name": trigger,
                "description": secret,
                "listenFor": {"type": uniq("never")},
                "type": "function",
                "function": function,
            },
        )
    )
    source, aggregate = uniq("src"), uniq("agg")
    ok(
        http.post(
            "/events",
            json={
                "event_type": event_type,
                "event_source": source,
                "aggregate_type": aggregate,
                "aggregate_id": "one",
                "data": {"secret": secret},
            },
        )
    )
    mapping_path = uniq("map")
    ok(
        http.post(
            "/mappings",
            json={
                "path": mapping_path,
                "eventType": event_type,
                "eventSource": secret,
                "aggregateType": aggregate,
                "aggregateIDField": "id",
            },
        )
    )
    raw = ok(http.post("/ingest", params={"path": mapping_path}, json={"id": secret}))
    raw_events = ok(http.get("/raw-events"))
    nid = str(raw_events[0]["nid"]) if isinstance(raw_events, list) and raw_events else "1"
    viewer = ok(
        http.post(
            "/users",
            json={
                "email": f"{uniq('viewer')}@example.com",
                "password": "viewer password 1",
                "friendlyName": secret,
                "role": "viewer",
            },
        )
    )
    key = ok(http.post("/api-keys", json={"name": secret, "scopes": ["read"]}))
    entry = ok(
        http.post(
            "/access-control",
            json={
                "identity": viewer["id"],
                "resourceType": "taskchains",
                "resource": chain_id,
                "permission": "view",
            },
        )
    )
    me = ok(http.get("/me"))
    requests = ok(http.get("/activity/requests"))
    request_id = requests[0]["id"] if isinstance(requests, list) and requests else "none"
    del raw
    by_segment = {
        "taskchains": chain_id,
        "runs": run["id"],
        "backends": backend["id"],
        "models": model["id"],
        "groups": group["id"],
        "hooks": hook["id"],
        "functions": function,
        "event-triggers": trigger,
        "raw-events": nid,
        "users": viewer["id"],
        "api-keys": key["id"],
        "access-control": entry["id"],
        "tenants": me.get("tenantId", ""),
        "projects": me.get("tenantId", ""),
        "activity": request_id,
    }
    a.values = {(seg, "id"): value for seg, value in by_segment.items()}
    a.values.update(
        {
            ("*", "groupID"): group["id"],
            ("*", "backendID"): backend["id"],
            ("*", "modelID"): model["id"],
            ("group-by-name", "name"): group["name"],
            ("group-by-purpose", "purpose"): group["purposeType"],
            ("hooks", "name"): hook["name"],
            ("functions", "name"): function,
            ("event-triggers", "name"): trigger,
            ("*", "functionName"): function,
            ("*", "eventType"): event_type,
            ("*", "providerType"): "openai",
            ("*", "model"): model_name,
            ("*", "nid"): nid,
            ("*", "seq"): "0",
            ("*", "op"): "create",
            ("*", "subject"): "taskchains",
            ("*", "userId"): viewer["id"],
            ("*", "tenantId"): me.get("tenantId", ""),
            ("*", "tenant_id"): me.get("tenantId", ""),
        }
    )
    a.queries = {
        "/mapping": {"path": mapping_path},
        "/events/type": {"event_type": event_type},
        "/events/source": {"event_source": source},
        "/events/aggregate": {"aggregate_type": aggregate, "aggregate_id": "one"},
        "/queue/cancel": {"model": model_name},
        "/ingest": {"path": mapping_path},
        "/replay": {"nid": nid},
    }
    a.bodies = {"viewer": viewer, "key": key, "run": run, "chain": chain}
    spec = ok(http.get("/openapi.json"))
    for op in operations(spec):
        if op.method == "PUT":
            current = http.get(fill(op, a), params=a.queries.get(op.template))
            if current.status_code == 200:
                a.put_bodies[op.template] = current.json()
    a.put_bodies["/models/{id}"] = {"model": model_name}
    a.put_bodies["/taskchains/{id}"] = chain
    return a


SNAPSHOT_ROUTES = (
    "/taskchains",
    "/backends",
    "/models",
    "/groups",
    "/backend-affinity/{groupID}/backends",
    "/model-affinity/{groupID}/models",
    "/providers/configs",
    "/hooks/remote",
    "/functions",
    "/event-triggers",
    "/mappings",
    "/users",
    "/access-control",
    "/tenants",
)


def take_snapshot(http: httpx.Client, a: TenantA) -> dict[str, Any]:
    shot = {}
    for route in SNAPSHOT_ROUTES:
        path = route.replace("{groupID}", a.values[("*", "groupID")])
        shot[route] = ok(http.get(path))
    shot["events"] = ok(http.get("/events/type", params=a.queries["/events/type"]))
    shot["run"] = ok(http.get(f"/runs/{a.values[('runs', 'id')]}"))["chainId"]
    keys = ok(http.get("/api-keys"))
    shot["keys"] = sorted((k["id"], k.get("revokedAt")) for k in keys)
    return shot


def fill(op: Operation, a: TenantA) -> str:
    path = op.template
    while "{" in path:
        start = path.index("{")
        name = path[start + 1 : path.index("}")]
        value = a.values.get((op.segment, name)) or a.values.get(("*", name))
        assert value is not None, f"no value for {{{name}}} in {op.template}"
        path = path[:start] + value + path[path.index("}") + 1 :]
    return path


def call(http: httpx.Client, op: Operation, a: TenantA, body: Any = None) -> httpx.Response:
    path = fill(op, a)
    params = a.queries.get(op.template)
    if (op.method, op.template) in STREAMS:
        return read_stream(http, path, params)
    if op.method in ("POST", "PUT", "PATCH"):
        return http.request(op.method, path, params=params, json=body if body is not None else {})
    return http.request(op.method, path, params=params)


def read_stream(http: httpx.Client, path: str, params: dict[str, str] | None) -> httpx.Response:
    """A streaming route's status and whatever it sends in its first second."""
    chunks: list[bytes] = []
    with http.stream("GET", path, params=params, timeout=httpx.Timeout(5, read=1.0)) as resp:
        deadline = time.monotonic() + 1.0
        try:
            for chunk in resp.iter_raw():
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    break
        except httpx.ReadTimeout:
            pass
    return httpx.Response(resp.status_code, content=b"".join(chunks), request=resp.request)


@pytest.fixture(scope="module")
def world(stack: Stack, llm_server: ScriptedLLM) -> Iterator[dict[str, Any]]:
    owner = register(stack, "tenant-a")
    outsider = register(stack, "tenant-b")
    with client(stack, owner["token"]) as http:
        a = populate(stack, http, llm_server)
        with client(stack, None) as anon:
            login = anon.post(
                "/login",
                json={"email": a.bodies["viewer"]["email"], "password": "viewer password 1"},
            )
        viewer_token = ok(login)["token"]
        spec = ok(http.get("/openapi.json"))
        yield {
            "stack": stack,
            "a": a,
            "owner": owner,
            "outsider": outsider,
            "viewer": viewer_token,
            "reader_key": a.bodies["key"]["key"],
            "ops": operations(spec),
        }


def test_every_route_has_a_rule(world: dict[str, Any]) -> None:
    unclassified = [
        f"{op.method} {op.template}"
        for op in world["ops"]
        if (op.method, op.template) not in PUBLIC and op.segment not in SEGMENT_TYPES
    ]
    assert not unclassified, f"routes without a permission rule: {unclassified}"
    assert len(world["ops"]) > 80


def test_anonymous_callers_get_401_everywhere_but_public_routes(world: dict[str, Any]) -> None:
    a: TenantA = world["a"]
    wrong = []
    with client(world["stack"], None) as anon:
        for op in world["ops"]:
            if (op.method, op.template) in PUBLIC:
                continue
            resp = call(anon, op, a)
            if resp.status_code != 401 or a.secret in resp.text:
                wrong.append(f"{op.method} {op.template} -> {resp.status_code}")
        with client(world["stack"], "ck_forged_" + "x" * 40) as forged:
            assert forged.get("/taskchains").status_code == 401
    assert not wrong, wrong


def test_another_tenant_sees_and_changes_nothing(world: dict[str, Any]) -> None:
    a: TenantA = world["a"]
    stack: Stack = world["stack"]
    with client(stack, world["owner"]["token"]) as owner:
        before = take_snapshot(owner, a)
    leaks, opened = [], []
    with client(stack, world["outsider"]["token"]) as outsider:
        for op in world["ops"]:
            if (op.method, op.template) in PUBLIC:
                continue
            # A valid body, so that a refusal cannot hide behind a 422.
            resp = call(outsider, op, a, a.put_bodies.get(op.template))
            if a.secret in resp.text:
                leaks.append(f"{op.method} {op.template} -> {resp.status_code}: {resp.text[:200]}")
            if (
                "{" in op.template
                and op.segment in ROW_SEGMENTS
                and op.template not in NAME_FILTERS | TENANT_NUMBERED
            ):
                if resp.status_code not in (403, 404):
                    opened.append(f"{op.method} {fill(op, a)} -> {resp.status_code}")
    assert not leaks, leaks
    assert not opened, opened
    with client(stack, world["owner"]["token"]) as owner:
        after = take_snapshot(owner, a)
    for route, value in before.items():
        assert after[route] == value, f"{route} changed by another tenant"


def _viewer_sweep(world: dict[str, Any], credential: str, kind: str) -> list[str]:
    a: TenantA = world["a"]
    wrong = []
    with client(world["stack"], credential) as http:
        for op in world["ops"]:
            if (op.method, op.template) in PUBLIC or op.segment in (SELF, "ui", "me"):
                continue
            if SEGMENT_TYPES.get(op.segment) == SELF:
                continue
            resp = call(http, op, a)
            must_refuse = (
                op.method != "GET" or op.segment in MANAGE_TO_READ or op.segment == "system"
            )
            if must_refuse and resp.status_code != 403:
                wrong.append(f"{kind} {op.method} {op.template} -> {resp.status_code}")
            if not must_refuse and resp.status_code in (401, 403):
                wrong.append(f"{kind} {op.method} {op.template} -> {resp.status_code} (may read)")
    return wrong


def test_a_viewer_reads_but_changes_nothing(world: dict[str, Any]) -> None:
    a: TenantA = world["a"]
    with client(world["stack"], world["owner"]["token"]) as owner:
        before = take_snapshot(owner, a)
    wrong = _viewer_sweep(world, world["viewer"], "viewer")
    wrong += _viewer_sweep(world, world["reader_key"], "read-only key")
    assert not wrong, wrong
    with client(world["stack"], world["owner"]["token"]) as owner:
        after = take_snapshot(owner, a)
    assert after == before


def test_event_stream_carries_only_the_callers_tenant(world: dict[str, Any]) -> None:
    a: TenantA = world["a"]
    stack: Stack = world["stack"]
    event_type = a.values[("*", "eventType")]
    got: list[bytes] = []
    with (
        client(stack, world["outsider"]["token"]) as outsider,
        client(stack, world["owner"]["token"]) as owner,
        outsider.stream(
            "GET", f"/events/stream/{event_type}", timeout=httpx.Timeout(5, read=0.5)
        ) as resp,
    ):
        assert resp.status_code == 200
        ok(owner.post("/events", json={"event_type": event_type, "data": {"s": a.secret}}))
        deadline = time.monotonic() + 2.0
        try:
            for chunk in resp.iter_raw():
                got.append(chunk)
                if time.monotonic() > deadline:
                    break
        except httpx.ReadTimeout:
            pass
    assert a.secret.encode() not in b"".join(got)
