"""Rate limits over real HTTP: per key or user, per tenant (with overrides), per client on
/login, and shared between API processes through Redis."""

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from tests.stack import ApiThread, Stack
from tests.test_ops import make_key

REDIS_URL = "redis://127.0.0.1:6379/15"

StackFactory = Callable[..., Stack]


@pytest.fixture
def make_stack(temporal_address: str) -> Iterator[Callable[..., Stack]]:
    """Builds small stacks with their own settings, each with a tenant of its own so that
    usage left in the shared database by other tests cannot reach it; closes them after."""
    made: list[Stack] = []

    def build(database_url: str, **env: Any) -> Stack:
        env.setdefault("CHAINLOOM_DEFAULT_TENANT", "t-" + uuid.uuid4().hex[:12])
        stack = Stack(temporal_address, database_url, **env)
        made.append(stack)
        return stack

    yield build
    for stack in made:
        stack.close()


def tenant_of(stack: Stack) -> str:
    return stack.settings.default_tenant


def key_client(stack: Stack, scopes: list[str], tenant_id: str | None = None) -> httpx.Client:
    """A client with a fresh API key of the tenant, written straight to the database."""
    url = stack.settings.resolved_database_url()
    key = make_key(url, tenant_id or tenant_of(stack), scopes)
    return httpx.Client(base_url=stack.api.url, headers={"X-API-Key": key}, timeout=30)


def remaining(resp: httpx.Response) -> int:
    return int(resp.headers["X-RateLimit-Remaining"])


def assert_rate_limited(resp: httpx.Response, limit: int) -> None:
    assert resp.status_code == 429, resp.text
    assert resp.headers["X-RateLimit-Limit"] == str(limit)
    assert resp.headers["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(resp.headers["Retry-After"]) <= 61  # a minute, rounded up
    error = resp.json()["error"]
    assert error["code"] == "rate_limited"
    assert f"rate limit of {limit} requests exceeded" in error["message"]
    assert "retry after" in error["message"]


def test_headers_count_down_then_429_per_key(make_stack: StackFactory, sqlite_url: str) -> None:
    stack = make_stack(
        sqlite_url, CHAINLOOM_RATE_LIMIT="5/minute", CHAINLOOM_TENANT_RATE_LIMIT="100/minute"
    )
    seen = []
    for path in ("/usage", "/taskchains", "/backends", "/usage", "/tenants"):
        resp = stack.http.get(path)
        assert resp.status_code == 200, resp.text
        assert resp.headers["X-RateLimit-Limit"] == "5"
        assert int(resp.headers["X-RateLimit-Reset"]) > 0
        seen.append(remaining(resp))
    assert seen == [4, 3, 2, 1, 0]
    assert_rate_limited(stack.http.get("/usage"), 5)
    # Refused requests are refused whatever they ask for, unknown routes aside.
    assert_rate_limited(stack.http.post("/taskchains", json={}), 5)

    # Another key of the same tenant has a counter of its own.
    with key_client(stack, ["admin"]) as other:
        resp = other.get("/usage")
        assert resp.status_code == 200, resp.text
        assert remaining(resp) == 4
        assert resp.json()["rateLimit"] == {
            "limit": 5,
            "remaining": 4,
            "reset": resp.json()["rateLimit"]["reset"],
        }


def test_tenant_limit_counts_every_key(make_stack: StackFactory, sqlite_url: str) -> None:
    stack = make_stack(
        sqlite_url, CHAINLOOM_RATE_LIMIT="100/minute", CHAINLOOM_TENANT_RATE_LIMIT="5/minute"
    )
    with key_client(stack, ["read"]) as a, key_client(stack, ["read"]) as b:
        seen = [remaining(client.get("/taskchains")) for client in (a, b, a, b, a)]
        # The headers report the tighter counter: the tenant's, shared by both keys.
        assert seen == [4, 3, 2, 1, 0]
        assert_rate_limited(b.get("/taskchains"), 5)
        assert_rate_limited(a.get("/taskchains"), 5)
        # Nor does the bootstrap key escape its tenant's limit.
        assert_rate_limited(stack.http.get("/usage"), 5)
        # Another tenant is not affected.
        with key_client(stack, ["read"], tenant_id="t-" + uuid.uuid4().hex[:12]) as outsider:
            resp = outsider.get("/taskchains")
            assert resp.status_code == 200, resp.text
            assert remaining(resp) == 4


def test_tenant_override_applies_at_once(make_stack: StackFactory, sqlite_url: str) -> None:
    stack = make_stack(
        sqlite_url, CHAINLOOM_RATE_LIMIT="100/minute", CHAINLOOM_TENANT_RATE_LIMIT="50/minute"
    )
    tenant = tenant_of(stack)
    with key_client(stack, ["admin"]) as member:
        # Only system administrators change tenants, even with an admin-scoped key.
        resp = member.patch(f"/tenants/{tenant}", json={"rateLimit": "3/minute"})
        assert resp.status_code == 403, resp.text
        bad = stack.http.patch(f"/tenants/{tenant}", json={"rateLimit": "lots"})
        assert bad.status_code == 422, bad.text
        assert "rate limit" in bad.text
        resp = stack.http.patch(f"/tenants/{tenant}", json={"rateLimit": "3/minute"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["rateLimit"] == "3/minute"

        first = member.get("/usage")
        assert first.status_code == 200, first.text
        assert first.headers["X-RateLimit-Limit"] == "3"
        assert first.json()["tenantRateLimit"]["limit"] == 3
        assert [r.status_code for r in (stack.http.get("/usage"), member.get("/usage"))] == [
            200,
            200,
        ]
        assert_rate_limited(member.get("/usage"), 3)
        assert_rate_limited(stack.http.get("/tenants"), 3)


def test_login_is_limited_per_client(make_stack: StackFactory, sqlite_url: str) -> None:
    stack = make_stack(sqlite_url, CHAINLOOM_LOGIN_RATE_LIMIT="3/minute")
    with httpx.Client(base_url=stack.api.url, timeout=30) as anonymous:
        body = {"email": "nobody@example.com", "password": "wrong password"}
        for expected in (2, 1, 0):
            resp = anonymous.post("/login", json=body)
            assert resp.status_code == 401, resp.text
            assert resp.headers["X-RateLimit-Limit"] == "3"
            assert remaining(resp) == expected
        resp = anonymous.post("/login", json=body)
        assert resp.status_code == 429, resp.text
        assert resp.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(resp.headers["Retry-After"]) <= 61  # a minute, rounded up
        # Authenticated routes count the key, not the address.
        assert stack.http.get("/usage").status_code == 200


@pytest.fixture
def redis_db() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def test_redis_shares_counters_between_processes(
    make_stack: StackFactory, sqlite_url: str, redis_db: redis.Redis
) -> None:
    stack = make_stack(
        sqlite_url,
        REDIS_URL=REDIS_URL,
        CHAINLOOM_RATE_LIMIT="5/minute",
        CHAINLOOM_TENANT_RATE_LIMIT="100/minute",
    )
    second = ApiThread(stack.settings).start()
    try:
        with httpx.Client(
            base_url=second.url, headers={"X-API-Key": Stack.API_KEY}, timeout=30
        ) as other:
            clients = (stack.http, other, stack.http, other, stack.http)
            assert [remaining(c.get("/usage")) for c in clients] == [4, 3, 2, 1, 0]
            assert_rate_limited(other.get("/usage"), 5)
            assert_rate_limited(stack.http.get("/usage"), 5)
        size: Any = redis_db.dbsize()  # redis-py types it sync-or-async
        assert size > 0  # the counters live in Redis, not in either process
    finally:
        second.stop()


def test_invalid_limit_settings_are_refused(temporal_address: str, sqlite_url: str) -> None:
    from core.metering.ratelimit import RateLimiter

    for text in ("fast", "0/minute", "5/minute;10/hour"):
        settings = Stack.settings_for(temporal_address, sqlite_url, CHAINLOOM_RATE_LIMIT=text)
        with pytest.raises(ValueError, match="CHAINLOOM_RATE_LIMIT"):
            RateLimiter(settings)


def test_limit_lifts_after_retry_after(make_stack: StackFactory, sqlite_url: str) -> None:
    stack = make_stack(sqlite_url, CHAINLOOM_RATE_LIMIT="2/second")
    assert [stack.http.get("/usage").status_code for _ in range(2)] == [200, 200]
    refused = stack.http.get("/usage")
    assert refused.status_code == 429, refused.text
    time.sleep(int(refused.headers["Retry-After"]) + 0.2)
    later = stack.http.get("/usage")
    assert later.status_code == 200, later.text
    assert remaining(later) == 1
