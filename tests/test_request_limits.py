"""Request limits (issue #16, findings 7 and 8): the body limit as the body streams in, the cap
on a run's encoded input, and whose X-Forwarded-For is believed for per-address limits.

The API under test is `chainloom api` itself where it matters how uvicorn is started (proxy
headers) and where the API's own memory is measured; the rest use an API thread."""

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api import body_limit
from api.proxies import TrustedProxies, rate_key
from core.devserver import free_port, wait_for_port
from tests.stack import ApiThread, Stack
from tests.test_api_resources import assert_error

ROOT = Path(__file__).parent.parent
MiB = 1024 * 1024
LIMIT = 10 * MiB  # the default CHAINLOOM_MAX_BODY_BYTES


def stream(total: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """`total` bytes without holding them: the client must not be what uses the memory."""
    sent = 0
    while sent < total:
        size = min(chunk, total - sent)
        sent += size
        yield b"x" * size


# --------------------------------------------------------------------------- client addresses


def test_trusted_proxies_and_the_rightmost_untrusted_hop() -> None:
    none = TrustedProxies.parse("")
    assert not none
    # Nothing trusted: the peer, whatever it forwards.
    assert none.client("127.0.0.1", ["6.6.6.6"]) == "127.0.0.1"

    proxies = TrustedProxies.parse(" 127.0.0.1 , 10.0.0.0/8,::1 ,")
    assert proxies.client("127.0.0.1", ["203.0.113.9"]) == "203.0.113.9"
    # Everything left of the hop our own proxy saw may be made up by the client.
    assert proxies.client("127.0.0.1", ["6.6.6.6, 198.51.100.4, 10.1.2.3"]) == "198.51.100.4"
    assert proxies.client("10.9.9.9", ["6.6.6.6", "198.51.100.4:5555"]) == "198.51.100.4"
    assert proxies.client("::1", ["[2001:db8::7]:443"]) == "2001:db8::7"
    # An untrusted peer's header is ignored, a dual-stack IPv4 peer is itself.
    assert proxies.client("192.0.2.1", ["6.6.6.6"]) == "192.0.2.1"
    assert proxies.client("::ffff:10.0.0.5", ["203.0.113.1"]) == "203.0.113.1"
    # Only proxies in the chain: the leftmost is where it came from.
    assert proxies.client("127.0.0.1", ["10.0.0.2, 10.0.0.3"]) == "10.0.0.2"
    assert proxies.client("127.0.0.1", []) == "127.0.0.1"

    with pytest.raises(ValueError, match=r"CHAINLOOM_TRUSTED_PROXIES: 'proxy\.internal'"):
        TrustedProxies.parse("10.0.0.1,proxy.internal")

    # One IPv6 subscriber holds a /64: its addresses share one counter.
    assert (
        rate_key("2001:db8:1:2:aaaa::1")
        == rate_key("2001:db8:1:2:bbbb::9")
        == ("2001:db8:1:2::/64")
    )
    assert rate_key("203.0.113.9") == "203.0.113.9"


@pytest.fixture(scope="module")
def chainloom_api(tmp_path_factory: pytest.TempPathFactory, temporal_address: str) -> Iterator[str]:
    """`chainloom api` as production runs it, default limits, no trusted proxies."""
    data = tmp_path_factory.mktemp("api")
    settings = Stack.settings_for(temporal_address, f"sqlite:///{data / 'api.db'}")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CHAINLOOM_")},
        **Stack.env_for(settings),
        "CHAINLOOM_LOGIN_RATE_LIMIT": "10/minute",
    }
    env.pop("CHAINLOOM_TRUSTED_PROXIES", None)
    env.pop("FORWARDED_ALLOW_IPS", None)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "api", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, 60, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def test_forwarded_for_from_loopback_does_not_rotate_the_failure_counter(
    chainloom_api: str,
) -> None:
    statuses = []
    with httpx.Client(base_url=chainloom_api, timeout=30) as c:
        for n in range(40):
            headers = {"X-API-Key": f"ck_guess_{n}", "X-Forwarded-For": f"198.51.{n}.7"}
            statuses.append(c.get("/taskchains", headers=headers).status_code)
        assert statuses[:10] == [401] * 10 and set(statuses[10:]) == {429}, statuses
        # Logins are counted per address the same way.
        logins = [
            c.post(
                "/login",
                json={"email": f"x{n}@example.com", "password": "wrong password"},
                headers={"X-Forwarded-For": f"203.0.{n}.1"},
            ).status_code
            for n in range(12)
        ]
        assert logins[:10] == [401] * 10 and logins[10:] == [429, 429], logins


def test_a_trusted_proxy_forwards_the_client_address(tmp_path: Path, temporal_address: str) -> None:
    settings = Stack.settings_for(
        temporal_address,
        f"sqlite:///{tmp_path / 'proxied.db'}",
        CHAINLOOM_LOGIN_RATE_LIMIT="10/minute",
        CHAINLOOM_TRUSTED_PROXIES="127.0.0.1,10.0.0.0/8",
    )
    server = ApiThread(settings).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            # 40 clients behind the proxy: each has its own counter.
            for n in range(40):
                headers = {"X-API-Key": f"ck_guess_{n}", "X-Forwarded-For": f"198.51.{n}.7"}
                assert_error(c.get("/taskchains", headers=headers), 401, "invalid_api_key")
            # One of them, whatever it puts left of what our proxies saw, is one address.
            statuses = [
                c.get(
                    "/taskchains",
                    headers={
                        "X-API-Key": "ck_guess",
                        "X-Forwarded-For": f"6.6.{n}.6, 203.0.113.5, 10.1.2.3",
                    },
                ).status_code
                for n in range(11)
            ]
            assert statuses == [401] * 10 + [429], statuses
            # The request log records the client, not the proxy.
            boot = {"X-API-Key": Stack.API_KEY, "X-Forwarded-For": "192.0.2.44"}
            chain = {"id": "via-proxy", "tasks": [{"id": "a", "handler": "noop"}]}
            assert c.post("/taskchains", json=chain, headers=boot).status_code == 201
            entries = c.get("/activity/requests", params={"method": "POST"}, headers=boot)
            made = [e for e in entries.json() if e["path"] == "/taskchains"]
            assert [e["client"] for e in made] == ["192.0.2.44"]
    finally:
        server.stop()


# --------------------------------------------------------------------------- body limit


def test_a_60_mb_body_is_refused_while_it_streams_in(chainloom_api: str) -> None:
    headers = {"X-API-Key": Stack.API_KEY, "Content-Type": "application/json"}
    with httpx.Client(base_url=chainloom_api, headers=headers, timeout=60) as c:

        def memory_mb() -> float:
            return float(c.get("/health").json()["memoryMB"])

        before = memory_mb()
        # Declared up front: refused before a byte is read.
        declared = {"Content-Length": str(60_000_000)}
        resp = c.post("/events", content=stream(60_000_000), headers=declared)
        body = assert_error(resp, 413, "body_too_large")
        assert str(LIMIT) in body["detail"]
        # Chunked (no length): counted as it arrives, refused once past the limit.
        resp = c.post("/events", content=stream(60_000_000))
        assert_error(resp, 413, "body_too_large")
        assert "x-request-id" in resp.headers
        grown = memory_mb() - before
        # At most the limit is ever held (and that only for the chunked one).
        assert grown < 30, f"the API grew by {grown:.1f} MB"

        # The limit is the limit: just over is refused, just under reaches the route.
        over = c.post("/events", content=stream(LIMIT + 1))
        assert_error(over, 413, "body_too_large")
        under = c.post("/events", content=stream(LIMIT - 1))
        assert under.status_code == 422, under.text  # not JSON: the route read it


def test_the_limit_is_a_setting_and_routes_can_have_their_own(
    tmp_path: Path, temporal_address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Stack.settings_for(
        temporal_address, f"sqlite:///{tmp_path / 'small.db'}", CHAINLOOM_MAX_BODY_BYTES=2000
    )
    server = ApiThread(settings).start()
    chain = {"id": "c-" + uuid.uuid4().hex[:8], "tasks": [{"id": "a", "handler": "noop"}]}
    chain["description"] = "d" * 3000
    try:
        with httpx.Client(
            base_url=server.url, headers={"X-API-Key": Stack.API_KEY}, timeout=30
        ) as c:
            assert_error(c.post("/taskchains", json=chain), 413, "body_too_large")
            monkeypatch.setitem(body_limit.ROUTE_LIMITS, "/taskchains", 10_000)
            assert c.post("/taskchains", json=chain).status_code == 201
            chain["description"] = "d" * 11_000
            assert_error(c.put(f"/taskchains/{chain['id']}", json=chain), 413, "body_too_large")
    finally:
        server.stop()


# --------------------------------------------------------------------------- run input


def _chain(**extra: Any) -> dict[str, Any]:
    return {"id": "big-" + uuid.uuid4().hex[:8], "tasks": [{"id": "n", "handler": "noop"}], **extra}


def test_run_inputs_over_the_cap_get_a_clear_413(stack: Stack) -> None:
    http = stack.http
    # The chain definition travels in the workflow's start payload: a huge one is refused
    # before anything is recorded (it answered 500 before, on Temporal's limits).
    chain = _chain(description="d" * 262_144)
    resp = http.post("/tasks", json={"chain": chain, "input": "small"})
    body = assert_error(resp, 413, "run_input_too_large", param="input")
    assert "CHAINLOOM_MAX_RUN_INPUT_BYTES" in body["detail"] and "262144" in body["detail"]
    assert http.get("/runs", params={"chainId": chain["id"]}).json() == []  # nothing recorded
    resp = http.post("/runs", json={"chain": _chain(description="d" * 262_144), "input": "x"})
    assert_error(resp, 413, "run_input_too_large")

    # A large input is kept out of history (docs/chains.md, "Long and large chains"), so a
    # 9 MB input under the body limit runs, and its output comes back whole.
    resp = http.post("/tasks", json={"chain": _chain(), "input": "y" * 9_000_000})
    assert resp.status_code == 200, resp.text[:300]
    assert resp.json()["output"] == "y" * 9_000_000


def test_a_cap_above_what_temporal_takes_still_answers_413(
    tmp_path: Path, temporal_address: str
) -> None:
    settings = Stack.settings_for(
        temporal_address,
        f"sqlite:///{tmp_path / 'cap.db'}",
        CHAINLOOM_MAX_RUN_INPUT_BYTES=8 * MiB,
    )
    server = ApiThread(settings).start()
    try:
        with httpx.Client(
            base_url=server.url, headers={"X-API-Key": Stack.API_KEY}, timeout=60
        ) as c:
            for size in (3 * MiB, 6 * MiB):  # over the blob limit; over the gRPC message
                # A large input would be kept out of history; a large chain cannot be.
                resp = c.post("/runs", json={"chain": _chain(description="z" * size)})
                body = assert_error(resp, 413, "run_input_too_large")
                assert "Temporal refused it" in body["detail"]
            assert c.get("/runs").json() == []
    finally:
        server.stop()


def test_a_refused_body_is_not_read_to_its_end(chainloom_api: str) -> None:
    """A body declared too large is answered before the client has sent it, and a chunked one
    once past the limit: the client is not made to push 200 MB first."""
    pulled = [0]

    def counted(total: int) -> Iterator[bytes]:
        for chunk in stream(total):
            pulled[0] += len(chunk)
            yield chunk

    total = 200_000_000
    headers = {"X-API-Key": Stack.API_KEY}
    with httpx.Client(base_url=chainloom_api, headers=headers, timeout=60) as c:
        declared = {"Content-Length": str(total)}
        assert_error(
            c.post("/events", content=counted(total), headers=declared), 413, "body_too_large"
        )
        sent_declared = pulled[0]
        pulled[0] = 0
        assert_error(c.post("/events", content=counted(total)), 413, "body_too_large")
    # What the client got out before the answer: socket buffers' worth, not the body.
    assert sent_declared < total / 4, sent_declared
    assert pulled[0] < total / 4, pulled[0]


# --------------------------------------------------------------------------- strict JSON


def test_nan_and_infinity_are_invalid_json_everywhere(stack: Stack) -> None:
    """Python's json takes NaN and Infinity; PostgreSQL's JSON does not: a 422, on both."""
    for path, body in (
        ("/events", '{"event_type": "nan.test", "data": {"v": NaN}}'),
        ("/events", '{"event_type": "inf.test", "data": {"v": -Infinity}}'),
        (
            "/tasks",
            '{"chain": {"id": "n", "tasks": [{"id": "a", "handler": "noop"}]}, '
            '"input": {"x": Infinity}}',
        ),
    ):
        resp = stack.http.post(path, content=body, headers={"Content-Type": "application/json"})
        assert_error(resp, 422, "validation_error")
    ok = stack.http.post("/events", json={"event_type": "nan.test", "data": {"v": 1.5}})
    assert ok.status_code == 201, ok.text


def test_every_route_parses_json_strictly() -> None:
    from fastapi.routing import APIRoute

    from api.main import create_app
    from api.strict_json import StrictJSONRoute

    app = create_app(Stack.settings_for("127.0.0.1:1", "sqlite://"))
    loose = [
        r.path for r in app.routes if isinstance(r, APIRoute) and not isinstance(r, StrictJSONRoute)
    ]
    assert loose == []
