"""Pure ASGI middleware (streams pass through untouched): per-request headers, timing and log.

Dependencies put headers in scope["chainloom.headers"] (rate limits, usage); they are added
to whatever response goes out, errors and 429s included. Authenticated requests are written
to the request log (core/metering/request_log.py) when their response starts: changes before it is
sent, so an answered change is always in the audit log.

It also settles who the client is (api/proxies.py) and caps the request body as it streams in
(api/body_limit.py), before any route runs.
"""

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

from api import body_limit, proxies
from api.errors import error_body
from core.config import Settings, get_settings
from core.metering import request_log

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger("chainloom.api")


async def _log_request(scope: Scope, status: int, run: dict[str, str]) -> None:
    app = scope.get("app")
    sink = getattr(getattr(app, "state", None), "request_log", None)
    if sink is None:
        return
    duration_ms = (time.perf_counter() - scope["chainloom.started"]) * 1000
    try:
        row = request_log.entry(
            scope, status, duration_ms, run.get("run_id"), run.get("detail", "")
        )
        if row is not None:
            await sink.record(row)
    except Exception:
        # Logging must never turn an answered request into a failure.
        log.exception("could not log request %s %s", scope.get("method"), scope.get("path"))


def _has_nul(scope: Scope) -> bool:
    """A NUL in the path or query: no id, name or filter of ours can hold one (PostgreSQL
    text cannot), so such a request is refused before any route sees it."""
    raw = bytes(scope.get("raw_path") or b"") + b"?" + bytes(scope.get("query_string") or b"")
    return b"%00" in raw or b"\x00" in raw or "\x00" in scope.get("path", "")


async def _refuse(
    send: Send, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> None:
    body = json.dumps(error_body(status, code, message)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestContext:
    def __init__(self, app: ASGIApp, settings: Settings | None = None) -> None:
        self.app = app
        settings = settings or get_settings()
        self.proxies = proxies.TrustedProxies.parse(settings.trusted_proxies)
        self.max_body = settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _has_nul(scope):
            await _refuse(send, 400, "invalid_request", "the URL contains a NUL character (%00)")
            return
        proxies.apply(scope, self.proxies)
        receive = body_limit.limited(scope, receive, self.max_body)
        request_id = uuid.uuid4().hex
        scope["chainloom.request_id"] = request_id
        scope["chainloom.started"] = time.perf_counter()
        scope.setdefault("chainloom.headers", {})
        run, token = request_log.open_run_holder()
        logged = False

        async def send_with_headers(message: Message) -> None:
            nonlocal logged
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                for name, value in scope["chainloom.headers"].items():
                    if name.lower().encode() not in present:
                        headers.append((name.lower().encode(), value.encode()))
                headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
                scope["chainloom.status"] = message["status"]
                if not logged:
                    logged = True
                    await _log_request(scope, message["status"], run)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except body_limit.BodyTooLarge as err:
            # Read outside a route's error handling (a streaming response reading on).
            if "chainloom.status" in scope:
                raise
            await _refuse(send_with_headers, 413, err.code, err.detail, err.headers)
        except Exception:
            if not logged:  # the server answers 500 outside this middleware
                logged = True
                await _log_request(scope, 500, run)
            raise
        finally:
            request_log.close_run_holder(token)
