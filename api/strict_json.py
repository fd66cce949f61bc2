"""JSON request bodies as the JSON standard defines them: no NaN or Infinity.

Python's json module accepts `NaN`, `Infinity` and `-Infinity`; PostgreSQL's JSON columns and
most clients do not, so such a body would be stored differently on SQLite (as null) and fail
on PostgreSQL. Every route parses its body through this request class instead, and such a
body is a 422 like any other invalid JSON.
"""

import json
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute


def _refuse(constant: str) -> NoReturn:
    raise json.JSONDecodeError(f"{constant} is not valid JSON", constant, 0)


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_constant=_refuse)
        return self._json


class StrictJSONRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive, request._send))

        return strict


def json_router(**kwargs: Any) -> APIRouter:
    """An APIRouter whose routes parse JSON bodies strictly."""
    return APIRouter(route_class=StrictJSONRoute, **kwargs)
