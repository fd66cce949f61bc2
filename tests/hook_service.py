"""A small OpenAPI service for hook tests, served by uvicorn in a thread on 127.0.0.1.

Operations (operationId → tool name):
- get_weather: GET /weather/{city}?units=…, needs the secret header X-Service-Token (401
  otherwise). `units` is meant to be injected by the hook; the answer never echoes it, so a
  test can prove the injected value never reaches the model.
- create_ticket: POST /tickets with a JSON body (201).
- flaky: POST /flaky answers the statuses queued in `plan` first, then 200.

POST /webhook (not in the document) records webhook deliveries; /slow/... (not in the
document either, GET or POST) answers `{"object": "list", "data": []}` after `slow_seconds`,
for heartbeat tests (a webhook, an httpFetch, or a backend's /v1/models under /slow/v1).
Every request is recorded with its headers, query, body and arrival time.
"""

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import httpx
import uvicorn
from fastapi import FastAPI, Header, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field

from tests.stack import Stack

ALLOWLIST = "127.0.0.1"


class TicketIn(BaseModel):
    title: str = Field(..., description="One line saying what is wrong.")
    priority: str = Field("normal", description="low, normal or high.")
    reporter: str = Field("", description="Who reports it.")


class HookService:
    def __init__(self) -> None:
        self.token = "svc-token-" + uuid.uuid4().hex
        self.requests: list[dict[str, Any]] = []
        # Statuses /flaky answers before it succeeds, consumed one per call.
        self.plan: list[int] = []
        self.slow_seconds = 2.0
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = self._build()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.requests.clear()
        self.plan.clear()
        self.slow_seconds = 2.0

    def calls(self, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"] == path]

    def _build(self) -> FastAPI:
        app = FastAPI(title="weather and tickets", version="1.0")
        service = self

        @app.middleware("http")
        async def record(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
            raw = await request.body()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
            service.requests.append(
                {
                    "method": request.method,
                    "path": request.url.path,
                    "query": dict(request.query_params),
                    "headers": {k.lower(): v for k, v in request.headers.items()},
                    "body": body,
                    "at": time.time(),
                }
            )
            return await call_next(request)

        def check(token: str | None) -> None:
            if token != service.token:
                raise HTTPException(401, "bad or missing X-Service-Token")

        @app.get(
            "/weather/{city}",
            operation_id="get_weather",
            summary="Current weather in a city.",
        )
        def get_weather(
            city: str,
            units: Annotated[str, Query(description="metric or imperial")],
            x_service_token: Annotated[str | None, Header()] = None,
        ) -> dict[str, Any]:
            check(x_service_token)
            return {"city": city, "temperature": 21, "conditions": "sunny"}

        @app.post(
            "/tickets",
            operation_id="create_ticket",
            status_code=201,
            summary="Opens a support ticket.",
        )
        def create_ticket(
            ticket: TicketIn, x_service_token: Annotated[str | None, Header()] = None
        ) -> dict[str, Any]:
            check(x_service_token)
            return {"id": "T-1", "title": ticket.title, "priority": ticket.priority}

        @app.post("/flaky", operation_id="flaky", summary="Fails as planned, then works.")
        def flaky(x_service_token: Annotated[str | None, Header()] = None) -> Response:
            check(x_service_token)
            if service.plan:
                status = service.plan.pop(0)
                return Response(
                    json.dumps({"error": f"planned {status}"}),
                    status_code=status,
                    media_type="application/json",
                )
            return Response('{"ok": true}', media_type="application/json")

        @app.api_route("/slow/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
        async def slow(rest: str) -> dict[str, Any]:
            await asyncio.sleep(service.slow_seconds)
            return {"object": "list", "data": []}

        @app.post("/webhook", include_in_schema=False)
        async def webhook(request: Request) -> dict[str, Any]:
            return {"received": True, "bytes": len(await request.body())}

        return app

    def start(self) -> "HookService":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True, name="hook-svc"
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{self.url}/openapi.json", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("hook service did not start")
            time.sleep(0.02)
        self.requests.clear()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)


def allowlisted_stack(temporal_address: str, database_url: str) -> Stack:
    """A stack whose outbound policy lets 127.0.0.1 through: every test server lives there."""
    return Stack(
        temporal_address,
        database_url,
        CHAINLOOM_OUTBOUND_ALLOWLIST=ALLOWLIST,
        CHAINLOOM_LLM_MAX_ATTEMPTS=3,
    )


def clean(stack: Stack) -> Stack:
    """No hooks, backends, models or chains left from another test."""
    for path, key in (
        ("/hooks/remote", "id"),
        ("/backends", "id"),
        ("/models", "id"),
        ("/taskchains", "id"),
    ):
        for item in stack.http.get(path, params={"limit": 1000}).json():
            stack.http.delete(f"{path}/{item[key]}")
    return stack


def register(
    stack: Stack,
    service: HookService,
    name: str = "weather",
    *,
    units: str = "metric",
    extra: list[dict[str, Any]] | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    resp = stack.http.post(
        "/hooks/remote",
        json={
            "name": name,
            "endpointUrl": endpoint or service.url,
            "timeoutMs": 5000,
            "headers": {"X-Service-Token": service.token},
            "properties": [{"in": "query", "name": "units", "value": units}, *(extra or [])],
        },
    )
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def add_llm_backend(stack: Stack, openai_base: str) -> None:
    resp = stack.http.post(
        "/backends", json={"name": "scripted", "baseUrl": openai_base, "type": "openai"}
    )
    assert resp.status_code == 201, resp.text
