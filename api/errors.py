"""One error shape that both kinds of seed client read.

seed 003 / OpenAI read ``{"error": {"code", "message", "param", "type"}}``; seed 000 reads
``detail``, ``error_code`` and ``errors`` (one entry per invalid field).
"""

import json
import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("chainloom.api")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ErrorInfo(BaseModel):
    code: str
    message: str
    param: str | None = None
    type: str


class FieldError(BaseModel):
    field: str
    message: str
    code: str


class ErrorBody(BaseModel):
    """The body of every error response, as the OpenAPI document declares it."""

    error: ErrorInfo
    detail: str
    error_code: str
    errors: list[FieldError]


class APIError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.errors = errors or []
        self.extra = extra or {}
        self.headers = headers


def error_body(
    status: int,
    code: str,
    message: str,
    param: str | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "error": {
            "code": code,
            "message": message,
            "param": param,
            "type": _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error"),
        },
        "detail": message,
        "error_code": code,
        "errors": errors or [],
    }


def not_found(kind: str, ident: str) -> APIError:
    return APIError(404, "not_found", f"{kind} {ident!r} not found")


def _pointer(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return "/" + "/".join(parts) if parts else "/"


_SCHEMAS = "#/components/schemas/"


def _replace_refs(node: Any, old: str, new: str) -> None:
    if isinstance(node, dict):
        if node.get("$ref") == old:
            node["$ref"] = new
        for value in node.values():
            _replace_refs(value, old, new)
    elif isinstance(node, list):
        for value in node:
            _replace_refs(value, old, new)


def document_errors(doc: dict[str, Any]) -> dict[str, Any]:
    """Declare 422 bodies as the ErrorBody our handler sends, not FastAPI's default list shape.

    Clients and schemathesis validate 422 responses against the document; FastAPI's
    HTTPValidationError (`detail` as a list) would describe a body this API never sends.
    """
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    if "HTTPValidationError" not in schemas:
        return doc
    body = ErrorBody.model_json_schema(ref_template=_SCHEMAS + "{model}")
    schemas.update(body.pop("$defs", {}))
    schemas["ErrorBody"] = body
    _replace_refs(doc, _SCHEMAS + "HTTPValidationError", _SCHEMAS + "ErrorBody")
    del schemas["HTTPValidationError"]
    if '"' + _SCHEMAS + 'ValidationError"' not in json.dumps(doc):
        schemas.pop("ValidationError", None)
    return doc


def install(app: FastAPI) -> None:
    generate = app.openapi
    app.openapi = lambda: document_errors(generate())  # type: ignore[method-assign]

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        body = error_body(exc.status, exc.code, exc.message, exc.param, exc.errors)
        body.update(exc.extra)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "field": _pointer(err.get("loc", ())),
                "message": err.get("msg", "invalid"),
                "code": err.get("type", "invalid"),
            }
            for err in exc.errors()
        ]
        summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        first = errors[0]["field"] if errors else None
        body = error_body(422, "validation_error", f"invalid request: {summary}", first, errors)
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        try:
            phrase = HTTPStatus(exc.status_code).phrase
        except ValueError:
            phrase = "error"
        message = exc.detail if isinstance(exc.detail, str) else phrase
        code = getattr(exc, "code", None) or phrase.lower().replace(" ", "_")
        return JSONResponse(
            error_body(exc.status_code, code, message),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError) -> JSONResponse:
        # The database refused a value the request carried (PostgreSQL: a NUL in text, an
        # integer past its column): bad input, so a 422 naming the reason, never a 500.
        orig = exc.orig
        diag = getattr(orig, "diag", None)
        reason = getattr(diag, "message_primary", None) or str(orig).strip().split("\n")[0]
        log.warning(
            "database refused a value on %s %s: %s", request.method, request.url.path, reason
        )
        body = error_body(422, "invalid_value", f"the database refused a value: {reason}")
        return JSONResponse(body, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body(500, "internal_error", "internal server error; see the server log"),
            status_code=500,
        )
