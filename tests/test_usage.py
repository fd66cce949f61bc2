"""Monthly request and token quotas, GET /usage, /tenants, and token accounting by the worker."""

import asyncio
import time
import uuid
from typing import Any

import httpx

from activities.llm import LLMActivities
from core.backends.providers import ProviderClients
from core.db import Database
from core.metering.usage import period_of
from core.models import UsageRow
from tests import test_rate_limits
from tests.scripted_llm import ScriptedLLM
from tests.scripted_text import count_tokens, last_user_text, messages_tokens
from tests.test_api_tasks import add_backend, sentiment_chain
from tests.test_rate_limits import StackFactory, key_client, tenant_of

make_stack = test_rate_limits.make_stack  # the fixture, shared


def usage_of(client: httpx.Client) -> dict[str, Any]:
    resp = client.get("/usage")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def wait_for_tokens(client: httpx.Client, expected: int, timeout: float = 10.0) -> dict[str, Any]:
    """The API rereads stored usage every second; wait for the worker's count to show."""
    deadline = time.monotonic() + timeout
    while True:
        body = usage_of(client)
        if body["tokens"]["used"] >= expected or time.monotonic() > deadline:
            return body
        time.sleep(0.2)


def reported_tokens(llm: ScriptedLLM, replies: dict[str, str]) -> int:
    """What the scripted backend told the worker it used: prompt words plus reply words."""
    total = 0
    for rec in llm.requests:
        if rec.path != "/v1/chat/completions":
            continue
        messages = rec.body["messages"]
        prompt = last_user_text(messages).lower()
        reply = next(text for word, text in replies.items() if word in prompt)
        total += messages_tokens(messages) + count_tokens(reply)
    return total


def test_request_quota_counts_down_then_refuses(
    make_stack: StackFactory, database_url: str
) -> None:
    stack = make_stack(database_url, CHAINLOOM_MONTHLY_REQUEST_QUOTA="5")
    seen = []
    for _ in range(5):
        resp = stack.http.get("/taskchains")
        assert resp.status_code == 200, resp.text
        seen.append(int(resp.headers["X-Usage-Requests-Remaining"]))
    assert seen == [4, 3, 2, 1, 0]
    resp = stack.http.get("/taskchains")
    assert resp.status_code == 429, resp.text
    error = resp.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert "monthly request quota of 5" in error["message"]
    assert resp.headers["X-Usage-Requests-Remaining"] == "0"
    assert resp.headers["X-Usage-Requests-Percent"] == "100.00"
    assert int(resp.headers["Retry-After"]) >= 1
    # Every key of the tenant shares the quota.
    with key_client(stack, ["read"]) as other:
        assert other.get("/usage").status_code == 429
    # The count reaches the database (flushed at shutdown), without the refused requests.
    stack.api.stop()
    db = Database(stack.settings.resolved_database_url())
    try:
        with db.session() as session:
            row = session.get(UsageRow, (tenant_of(stack), period_of()))
            assert row is not None and row.requests == 5
    finally:
        db.dispose()


def test_tenant_quota_override_applies_at_once(make_stack: StackFactory, database_url: str) -> None:
    stack = make_stack(database_url, CHAINLOOM_MONTHLY_REQUEST_QUOTA="3")
    tenant = tenant_of(stack)
    # 0 lifts the quota for this tenant, whatever the server default.
    resp = stack.http.patch(f"/tenants/{tenant}", json={"requestQuota": 0})
    assert resp.status_code == 200, resp.text
    for _ in range(4):
        resp = stack.http.get("/usage")
        assert resp.status_code == 200, resp.text
        assert "X-Usage-Requests-Remaining" not in resp.headers
    assert resp.json()["requests"]["limit"] is None
    assert resp.json()["requests"]["used"] == 5

    resp = stack.http.patch(f"/tenants/{tenant}", json={"requestQuota": 8})
    assert resp.status_code == 200, resp.text
    assert resp.json()["requestQuota"] == 8
    body = usage_of(stack.http)  # the seventh request of the month
    assert body["requests"] == {"used": 7, "limit": 8, "remaining": 1, "percentUsed": 87.5}
    assert stack.http.get("/usage").headers["X-Usage-Requests-Remaining"] == "0"
    assert stack.http.get("/usage").json()["error"]["code"] == "quota_exceeded"


def test_token_quota_stops_new_runs_only(
    make_stack: StackFactory, database_url: str, llm: ScriptedLLM
) -> None:
    stack = make_stack(database_url, CHAINLOOM_MONTHLY_TOKEN_QUOTA="20")
    add_backend(stack, llm)
    replies = {"sentiment": "Positive.", "thanking": "Thank you so much for the kind words!"}
    for word, text in replies.items():
        llm.reply(word, text)
    assert usage_of(stack.http)["tokens"]["used"] == 0

    # Both calls of the first run fit under a raised quota (the worker checks it before
    # every model call), then the tenant falls back to the default of 20.
    tenant = f"/tenants/{tenant_of(stack)}"
    assert stack.http.patch(tenant, json={"tokenQuota": 10_000}).status_code == 200
    resp = stack.http.post(
        "/tasks", json={"chain": sentiment_chain(), "input": "I love this product"}
    )
    assert resp.status_code == 200, resp.text
    assert stack.http.patch(tenant, json={"tokenQuota": None}).status_code == 200
    expected = reported_tokens(llm, replies)
    assert expected > 20
    body = wait_for_tokens(stack.http, expected)
    assert body["tokens"]["used"] == expected
    assert body["tokens"]["limit"] == 20 and body["tokens"]["remaining"] == 0
    assert body["history"][0] == {
        "period": period_of(),
        "requests": body["requests"]["used"],
        "tokens": expected,
    }

    refused = stack.http.post(
        "/tasks", json={"chain": sentiment_chain(), "input": "I love this product"}
    )
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "quota_exceeded"
    assert "monthly token quota of 20" in refused.json()["error"]["message"]
    assert refused.headers["X-Usage-Tokens-Remaining"] == "0"
    assert llm.count("/v1/chat/completions") == 2  # the refused run called no model
    started = stack.http.post("/runs", json={"chain": sentiment_chain(), "input": "hi"})
    assert started.status_code == 429, started.text
    # Reading, cancelling runs and changing other things still work.
    assert stack.http.post("/runs/no-such-run/cancel").status_code == 404
    assert stack.http.get("/taskchains").status_code == 200
    assert stack.http.get("/backends").status_code == 200

    # Raising the tenant's quota lets runs start again at once.
    patched = stack.http.patch(f"/tenants/{tenant_of(stack)}", json={"tokenQuota": 10_000})
    assert patched.status_code == 200, patched.text
    again = stack.http.post(
        "/tasks", json={"chain": sentiment_chain(), "input": "I love this product"}
    )
    assert again.status_code == 200, again.text


def test_usage_document(make_stack: StackFactory, database_url: str) -> None:
    stack = make_stack(
        database_url,
        CHAINLOOM_RATE_LIMIT="10/minute",
        CHAINLOOM_TENANT_RATE_LIMIT="1000/minute",
        CHAINLOOM_MONTHLY_REQUEST_QUOTA="100",
    )
    first = stack.http.get("/usage")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["tenantId"] == tenant_of(stack)
    assert body["period"] == period_of()
    assert body["resetsAt"].endswith("-01T00:00:00Z")
    assert body["requests"] == {"used": 1, "limit": 100, "remaining": 99, "percentUsed": 1.0}
    assert body["tokens"] == {"used": 0, "limit": None, "remaining": None, "percentUsed": None}
    # This request is counted once: the body agrees with the headers require_auth set.
    assert body["rateLimit"]["limit"] == 10
    assert body["rateLimit"]["remaining"] == int(first.headers["X-RateLimit-Remaining"]) == 9
    assert body["tenantRateLimit"]["remaining"] == 999
    assert body["history"] == [{"period": period_of(), "requests": 1, "tokens": 0}]
    second = usage_of(stack.http)
    assert second["rateLimit"]["remaining"] == 8
    assert second["requests"]["used"] == 2
    assert stack.http.get("/usage", params={"months": 0}).status_code == 422

    # A key of another tenant sees its own tenant only.
    outsider_tenant = "t-" + uuid.uuid4().hex[:12]
    with key_client(stack, ["read"], tenant_id=outsider_tenant) as outsider:
        own = usage_of(outsider)
        assert own["tenantId"] == outsider_tenant
        assert own["requests"]["used"] == 1
        resp = outsider.get("/usage", params={"tenantId": tenant_of(stack)})
        assert resp.status_code == 404, resp.text
    # A system administrator may look at any tenant.
    other = stack.http.get("/usage", params={"tenantId": outsider_tenant})
    assert other.status_code == 200, other.text
    assert other.json()["tenantId"] == outsider_tenant
    assert other.json()["requests"]["used"] == 2


def test_tenants_routes(make_stack: StackFactory, database_url: str) -> None:
    stack = make_stack(database_url)
    tenant = tenant_of(stack)
    # The bootstrap key's tenant never went through /register; it still has a tenant.
    own = stack.http.get(f"/tenants/{tenant}")
    assert own.status_code == 200, own.text
    assert own.json()["id"] == tenant and own.json()["name"] == tenant
    assert own.json()["rateLimit"] is None and own.json()["requestQuota"] is None

    made = stack.http.post(
        "/tenants", json={"name": "acme", "requestQuota": 1000, "rateLimit": "100/minute"}
    )
    assert made.status_code == 201, made.text
    acme = made.json()
    assert acme["name"] == "acme" and acme["requestQuota"] == 1000
    assert acme["tokenQuota"] is None and acme["rateLimit"] == "100/minute"
    assert set(acme) >= {"id", "name", "createdAt", "requestQuota", "tokenQuota", "rateLimit"}

    # A system administrator pages through every tenant.
    ids: list[str] = []
    cursor = None
    while True:
        params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
        page = stack.http.get("/tenants", params=params)
        assert page.status_code == 200, page.text
        if not page.json():
            break
        ids += [t["id"] for t in page.json()]
        cursor = page.json()[-1]["createdAt"]
    assert {tenant, acme["id"]} <= set(ids)
    assert len(ids) == len(set(ids))

    for body in (
        {"requestQuota": -1},
        {"tokenQuota": "many"},
        {"rateLimit": "0/minute"},
        {"rateLimit": "quickly"},
        {"name": None},
        {"name": ""},
        {"requestQuota": 2**70},
    ):
        resp = stack.http.patch(f"/tenants/{acme['id']}", json=body)
        assert resp.status_code == 422, (body, resp.text)
    resp = stack.http.patch(
        f"/tenants/{acme['id']}", json={"name": "acme2", "requestQuota": None, "tokenQuota": 0}
    )
    assert resp.status_code == 200, resp.text
    changed = resp.json()
    assert changed["name"] == "acme2" and changed["requestQuota"] is None
    assert changed["tokenQuota"] == 0 and changed["rateLimit"] == "100/minute"
    assert stack.http.patch("/tenants/no-such", json={"name": "x"}).status_code == 404
    # PostgreSQL text holds no NUL: refused as bad input, not a server error.
    assert stack.http.get("/tenants/a%00b").status_code == 400  # refused by the middleware
    assert stack.http.patch("/tenants/a%00b", json={"name": "x"}).status_code == 400
    assert stack.http.get("/usage", params={"tenantId": "a\x00b"}).status_code == 400
    assert stack.http.post("/tenants", json={"name": "a\x00b"}).status_code == 422
    assert stack.http.post("/tenants", json={"name": "  "}).status_code == 422
    assert stack.http.patch(f"/tenants/{acme['id']}", json={"name": " "}).status_code == 422
    assert stack.http.post("/tenants", json={}).status_code == 422

    # A member of acme sees acme only, and changes nothing.
    with key_client(stack, ["admin"], tenant_id=acme["id"]) as member:
        listed = member.get("/tenants")
        assert listed.status_code == 200, listed.text
        assert [t["id"] for t in listed.json()] == [acme["id"]]
        assert member.get(f"/tenants/{acme['id']}").json()["name"] == "acme2"
        assert member.get(f"/tenants/{tenant}").status_code == 404
        assert member.get("/tenants/no-such").status_code == 404
        assert member.post("/tenants", json={"name": "mine"}).status_code == 403
        assert member.patch(f"/tenants/{acme['id']}", json={"name": "x"}).status_code == 403
    with key_client(stack, ["apikeys:read"], tenant_id=acme["id"]) as narrow:
        assert narrow.get("/tenants").status_code == 403


def test_token_count_never_fails_the_call() -> None:
    class BrokenDatabase:
        def session(self) -> Any:
            raise RuntimeError("database is down")

    acts = LLMActivities(BrokenDatabase(), ProviderClients())  # type: ignore[arg-type]

    async def count() -> None:
        acts._count_tokens("tenant", 12)
        acts._count_tokens("tenant", 0)
        await acts.tokens.close()  # the write fails: logged, and the count is kept

    asyncio.run(count())
    assert acts.tokens.pending("tenant") == 12


def test_embedding_tokens_count_too(
    make_stack: StackFactory, database_url: str, llm: ScriptedLLM
) -> None:
    stack = make_stack(database_url)
    add_backend(stack, llm)
    chain = {
        "id": "embed-" + uuid.uuid4().hex[:8],
        "tasks": [
            {
                "id": "vector",
                "handler": "text_to_embedding",
                "execute_config": {"model": "nomic-embed-text"},
            }
        ],
    }
    text = "count these words please"
    resp = stack.http.post("/tasks", json={"chain": chain, "input": text})
    assert resp.status_code == 200, resp.text
    assert llm.count("/v1/embeddings") == 1
    # The scripted server reports usage.prompt_tokens exactly as it counts them.
    body = wait_for_tokens(stack.http, count_tokens(text))
    assert body["tokens"]["used"] == count_tokens(text) > 0


def test_a_run_going_when_the_quota_runs_out_stops_at_its_next_model_call(
    make_stack: StackFactory, database_url: str, llm: ScriptedLLM
) -> None:
    """The worker checks the quota too, so runs already going (or started by triggers)
    cannot spend past it by more than the call in flight."""
    stack = make_stack(database_url, CHAINLOOM_MONTHLY_TOKEN_QUOTA="1")
    add_backend(stack, llm)
    llm.reply("sentiment", "Positive.")
    resp = stack.http.post(
        "/tasks", json={"chain": sentiment_chain(), "input": "I love this product"}
    )
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["error"]["code"] == "chain_failed"
    assert "monthly token quota of 1 is used up" in body["error"]["message"]
    assert llm.count("/v1/chat/completions") == 1  # the second call was never made
