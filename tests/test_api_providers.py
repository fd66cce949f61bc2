"""/providers: hosted providers' API keys, encrypted at rest and never shown in clear."""

import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from cryptography.fernet import Fernet

from core.backends.keys import PROVIDER_TYPES, provider_api_key, provider_api_keys
from core.db import Database
from core.models import ProviderConfigRow
from core.secrets import SecretBox, mask
from tests.stack import Stack
from tests.test_api_resources import assert_error

CONFIG_KEYS = {"APIKey", "Type", "baseUrl", "createdAt", "updatedAt"}


def secret() -> str:
    return "sk-test-" + uuid.uuid4().hex


def clear_configs(http: httpx.Client) -> None:
    for kind in PROVIDER_TYPES:
        resp = http.delete(f"/providers/{kind}/config")
        assert resp.status_code in (200, 404), resp.text


@pytest.fixture
def http(stack: Stack) -> Iterator[httpx.Client]:
    """The stack's client with no provider configured, before and after the test."""
    clear_configs(stack.http)
    yield stack.http
    clear_configs(stack.http)


@pytest.fixture
def db(stack: Stack) -> Iterator[Database]:
    database = Database(stack.settings.resolved_database_url())
    yield database
    database.dispose()


@pytest.fixture
def box(stack: Stack) -> SecretBox:
    # The same key file (or CHAINLOOM_SECRET_KEY) the API and the worker use.
    return SecretBox.from_settings(stack.settings)


def test_provider_key_round_trip(
    stack: Stack, http: httpx.Client, db: Database, box: SecretBox
) -> None:
    tenant = stack.settings.default_tenant
    key = secret()
    resp = http.post("/providers/openai/configure", json={"apiKey": key, "upsert": False})
    assert resp.status_code == 201, resp.text
    created = resp.json()
    assert set(created) == CONFIG_KEYS
    assert created["Type"] == "openai"
    assert created["APIKey"] == mask(key) and key not in resp.text
    assert created["createdAt"].endswith("Z")

    body = assert_error(
        http.post("/providers/openai/configure", json={"apiKey": secret()}),
        409,
        "already_exists",
        param="upsert",
    )
    assert "upsert" in body["error"]["message"]
    assert provider_api_key(db, box, tenant, "openai") == key

    new_key = secret()
    resp = http.post("/providers/openai/configure", json={"apiKey": new_key, "upsert": True})
    assert resp.status_code == 200, resp.text
    updated = resp.json()
    assert updated["APIKey"] == mask(new_key) and new_key not in resp.text
    assert updated["createdAt"] == created["createdAt"]
    assert updated["updatedAt"] >= created["updatedAt"]

    resp = http.get("/providers/openai/config")
    assert resp.status_code == 200 and resp.json() == updated, resp.text
    resp = http.get("/providers/configs")
    assert resp.status_code == 200 and resp.json() == [updated], resp.text
    assert new_key not in resp.text and key not in resp.text

    # At rest: ciphertext only, readable with the app's secret key.
    with db.session() as session:
        row = session.get(ProviderConfigRow, (tenant, "openai"))
        assert row is not None
    assert new_key not in row.api_key_encrypted and key not in row.api_key_encrypted
    assert box.decrypt(row.api_key_encrypted) == new_key
    assert provider_api_key(db, box, tenant, "openai") == new_key
    assert provider_api_key(db, box, tenant, "gemini") is None
    assert provider_api_key(db, box, "another-tenant", "openai") is None
    assert provider_api_keys(db, box, tenant) == {"openai": new_key}

    resp = http.delete("/providers/openai/config")
    assert resp.status_code == 200 and isinstance(resp.json(), str), resp.text
    assert_error(http.get("/providers/openai/config"), 404, "not_found")
    assert_error(http.delete("/providers/openai/config"), 404, "not_found")
    assert http.get("/providers/configs").json() == []
    assert provider_api_key(db, box, tenant, "openai") is None


def test_provider_validation(http: httpx.Client) -> None:
    for method, path in (
        ("POST", "/providers/bogus/configure"),
        ("GET", "/providers/bogus/config"),
        ("DELETE", "/providers/bogus/config"),
    ):
        resp = http.request(method, path, json={"apiKey": secret()})
        body = assert_error(resp, 422, "invalid_provider_type", param="providerType")
        message = body["error"]["message"]
        assert "bogus" in message and all(kind in message for kind in PROVIDER_TYPES)

    assert_error(http.post("/providers/gemini/configure", json={}), 422, "validation_error")
    for bad in ("", "   "):
        assert_error(
            http.post("/providers/gemini/configure", json={"apiKey": bad}),
            422,
            "validation_error",
        )
    assert_error(
        http.post("/providers/gemini/configure", json={"apiKey": "k", "upsert": "maybe"}),
        422,
        "validation_error",
        param="/upsert",
    )
    assert_error(http.get("/providers/gemini/config"), 404, "not_found")

    # The seed's own spelling of the field works, the type is matched case-insensitively, and
    # a short key is masked completely.
    resp = http.post("/providers/Gemini/configure", json={"APIKey": "short"})
    assert resp.status_code == 201, resp.text
    assert resp.json()["Type"] == "gemini" and resp.json()["APIKey"] == "****"


def test_provider_configs_pagination(http: httpx.Client) -> None:
    for kind in ("openai", "gemini", "vllm"):
        resp = http.post(f"/providers/{kind}/configure", json={"apiKey": secret()})
        assert resp.status_code == 201, resp.text
    everything = http.get("/providers/configs").json()
    assert [c["Type"] for c in everything] == ["openai", "gemini", "vllm"]
    first = http.get("/providers/configs", params={"limit": 2}).json()
    assert first == everything[:2]
    rest = http.get(
        "/providers/configs", params={"limit": 2, "cursor": first[-1]["createdAt"]}
    ).json()
    assert rest == everything[2:]
    assert_error(
        http.get("/providers/configs", params={"limit": "0"}), 400, "invalid_limit", param="limit"
    )
    assert_error(http.get("/providers/configs", params={"cursor": "soon"}), 400, "invalid_cursor")


def test_unreadable_key_is_masked_not_fatal(
    stack: Stack, http: httpx.Client, db: Database, box: SecretBox
) -> None:
    """A key encrypted with another secret key (e.g. after a lost key file) shows as ****."""
    tenant = stack.settings.default_tenant
    other = SecretBox([Fernet.generate_key().decode()])
    with db.session() as session:
        session.add(
            ProviderConfigRow(
                tenant_id=tenant, type="vllm", api_key_encrypted=other.encrypt(secret())
            )
        )
        session.commit()
    resp = http.get("/providers/vllm/config")
    assert resp.status_code == 200, resp.text
    assert resp.json()["APIKey"] == "****"
    assert provider_api_key(db, box, tenant, "vllm") is None
    # Replacing it with upsert repairs it.
    key = secret()
    resp = http.post("/providers/vllm/configure", json={"apiKey": key, "upsert": True})
    assert resp.status_code == 200, resp.text
    assert provider_api_key(db, box, tenant, "vllm") == key


def test_openapi_lists_provider_routes(stack: Stack) -> None:
    with httpx.Client(base_url=stack.api.url, timeout=30) as anon:
        paths = anon.get("/openapi.json").json()["paths"]
        assert_error(anon.get("/providers/configs"), 401, "missing_api_key")
    expected = {
        "/providers/configs": {"get"},
        "/providers/{providerType}/config": {"get", "delete"},
        "/providers/{providerType}/configure": {"post"},
    }
    for path, methods in expected.items():
        assert path in paths, f"{path} missing from /openapi.json"
        assert methods <= set(paths[path]), (path, sorted(paths[path]))
        for method in methods:
            assert paths[path][method].get("security"), (path, method)
    param = paths["/providers/{providerType}/config"]["get"]["parameters"][0]
    assert param["schema"]["enum"] == list(PROVIDER_TYPES)


def test_concurrent_upserts_keep_one_readable_key(
    stack: Stack, http: httpx.Client, db: Database, box: SecretBox
) -> None:
    keys = [secret() for _ in range(6)]
    with ThreadPoolExecutor(6) as pool:
        codes = sorted(
            pool.map(
                lambda k: (
                    http.post(
                        "/providers/ollama/configure", json={"apiKey": k, "upsert": True}
                    ).status_code
                ),
                keys,
            )
        )
    assert codes == [200] * 5 + [201]
    assert provider_api_key(db, box, stack.settings.default_tenant, "ollama") in keys
    assert len(http.get("/providers/configs").json()) == 1
