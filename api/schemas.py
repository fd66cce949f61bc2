"""What the API's response models share: camelCase keys, RFC 3339 times, rows as sources.

Each response shape is one pydantic model, declared by its route (return annotation or
`response_model`) and returned by it, so /openapi.json and the body sent cannot drift apart.
Field names are snake_case in Python and sent as seed 003 spells them (camelCase, or an
explicit alias where the seed differs, e.g. `memoryMB`).
"""

import copy
from datetime import datetime
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, TypeAdapter, WithJsonSchema
from pydantic.alias_generators import to_camel

from core.models import rfc3339

# Stored times are UTC (SQLite hands them back naive); the API writes them as RFC 3339 with a Z.
Timestamp = Annotated[
    datetime,
    PlainSerializer(rfc3339, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


def absent_when_none(description: str | None = None) -> Any:
    """A key sent only when it has a value: left out, never null (nor marked required)."""
    return Field(None, description=description, exclude_if=lambda value: value is None)


class Camel(BaseModel):
    """A response (or request) body with camelCase keys, readable from a row's attributes."""

    # Keys with a default are still always sent: the document marks them required.
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        from_attributes=True,
        json_schema_serialization_defaults_required=True,
    )

    @classmethod
    def from_row(cls, row: object, **extra: Any) -> Self:
        """The model read from `row`'s attributes, with `extra` (by field name) for the fields
        the row does not hold or holds differently (a masked secret, the caller's role)."""
        aliased = dict(extra)
        for name, value in extra.items():
            alias = cls.model_fields[name].alias
            if alias:
                aliased[alias] = value
        return cls.model_validate(_Overlay(row, aliased))


class _Overlay:
    """Attributes of `extra` first, then of `row`: what `from_row` validates from."""

    def __init__(self, row: object, extra: dict[str, Any]) -> None:
        self._row = row
        self._extra = extra

    def __getattr__(self, name: str) -> Any:
        if name in self._extra:
            return self._extra[name]
        return getattr(self._row, name)


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """`schema` with every `#/$defs/...` reference replaced by its definition (no cycles)."""
    if isinstance(schema, dict):
        ref = schema.get("$ref", "")
        if ref.startswith("#/$defs/"):
            return _inline(copy.deepcopy(defs[ref.rsplit("/", 1)[-1]]), defs)
        return {key: _inline(value, defs) for key, value in schema.items()}
    if isinstance(schema, list):
        return [_inline(item, defs) for item in schema]
    return schema


def event_stream(description: str, data: Any, event: str | None = None) -> dict[str, Any]:
    """The OpenAPI response of a Server-Sent Events route whose events carry JSON of type
    `data` in `data:`: the `itemSchema` form FastAPI's own SSE routes write (and OpenAPI 3.2
    adopts), so a client, and schemathesis, know each event's shape.

    The data schema is written inline: the document's components hold only what routes
    declare as bodies.
    """
    schema = TypeAdapter(data).json_schema(mode="serialization")
    defs = schema.pop("$defs", {})
    item: dict[str, Any] = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": _inline(schema, defs),
            },
            "event": {"type": "string", **({"const": event} if event else {})},
            "id": {"type": "string"},
            "retry": {"type": "integer", "minimum": 0},
        },
    }
    return {"description": description, "content": {"text/event-stream": {"itemSchema": item}}}
