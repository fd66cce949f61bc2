"""The request body limit: CHAINLOOM_MAX_BODY_BYTES for every route, unless ROUTE_LIMITS says
otherwise for a route.

Enforced on `receive`, as the body streams in: a Content-Length over the limit is refused
before a byte is read, and a chunked body once its bytes pass the limit, so no more than the
limit (plus one chunk) is ever held. The route is known by the time the body is first read
(routing happens before FastAPI reads it), which is what lets the limit depend on it.
"""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.exceptions import HTTPException

MiB = 1024 * 1024

# Route path template -> its own body limit in bytes, for routes that take more (or less)
# than CHAINLOOM_MAX_BODY_BYTES, such as file uploads. The one place limits differ per route.
ROUTE_LIMITS: dict[str, int] = {}


class BodyTooLarge(HTTPException):
    """A 413 with the usual error body (api/errors.py renders `code`).

    It closes the connection: kept alive, the server would read (and drop) the rest of the
    body first, and the client would go on sending all of it."""

    code = "body_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is larger than this route's limit of {limit} bytes "
            f"({limit / MiB:.1f} MiB)",
            headers={"Connection": "close"},
        )


def limit_for(scope: MutableMapping[str, Any], default: int) -> int:
    path = getattr(scope.get("route"), "path", None)
    return ROUTE_LIMITS.get(path, default) if path else default


def content_length(scope: MutableMapping[str, Any]) -> int | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server has already refused a malformed one
    return None


Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]


def limited(scope: MutableMapping[str, Any], receive: Receive, default: int) -> Receive:
    """`receive` that raises BodyTooLarge once the body is known to pass the limit."""
    seen = 0
    limit: int | None = None

    async def receive_limited() -> Message:
        nonlocal seen, limit
        if limit is None:
            limit = limit_for(scope, default)
            declared = content_length(scope)
            if declared is not None and declared > limit:
                seen = declared  # refused up front, and on any later call
        if seen > limit:
            raise BodyTooLarge(limit)
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
        return message

    return receive_limited
