"""/events, /raw-events, /ingest, /mapping(s), /replay, /sync: the event store (seed 003).

The logic lives in core/events/store.py (shared with the JS ``sendEvent`` builtin on workers); the
routes translate HTTP to it. Appends answer right after the commit: trigger functions are
started in the background (core/events/outbox.py).
"""

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import Body, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import PrincipalDep, StateDep
from api.errors import APIError
from api.schemas import event_stream
from api.strict_json import json_router
from core.events import dispatch, mappings, queries, raw, store
from core.events.mappings import MappingConfig
from core.events.raw import RawEvent
from core.events.store import Event, EventError

router = json_router(tags=["events"])

_FROM = Query(None, alias="from", description="Start time in RFC3339 format (inclusive).")
_TO = Query(None, alias="to", description="End time in RFC3339 format (inclusive).")
_LIMIT = Query(None, description="Maximum number of items to return (default 100, max 1000).")
_ORDER = Query(None, description="desc (newest first, the default) or asc.")


@contextmanager
def event_errors() -> Iterator[None]:
    """core.events.store refuses with EventError; the API answers with the shared error shape."""
    try:
        yield
    except EventError as err:
        raise APIError(err.status, err.code, err.message, param=err.param, extra=err.extra) from err


class EventIn(BaseModel):
    """seed 003 eventstore.Event as sent; `data` and `metadata` may be JSON or JSON strings."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(None, description="Generated when absent.")
    nid: int | None = Field(None, description="Ignored: assigned by the store.")
    event_type: str | None = Field(None, examples=["github.pull_request"])
    event_source: str | None = None
    aggregate_type: str | None = None
    aggregate_id: str | None = None
    version: int | None = None
    data: Any = None
    metadata: Any = None
    created_at: str | None = Field(
        None, description="RFC 3339; defaults to now; refused outside ±10 minutes of now."
    )


class RawEventIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    nid: int | None = None
    path: str = ""
    headers: Any = None
    payload: Any = None
    received_at: str | None = None


@router.post(
    "/events",
    status_code=201,
    response_model=Event,
    summary="Appends a new event to the event store.",
    description="The event ID and created_at are generated when not provided. Events must be "
    "within ±10 minutes of current server time. The answer comes right after the event is "
    "stored; functions of triggers on its type are started in the background.",
)
async def append_event(body: EventIn, state: StateDep, principal: PrincipalDep) -> dict[str, Any]:
    event = body.model_dump(exclude={"nid"})
    with event_errors():
        return await dispatch.append_and_dispatch(
            state.db,
            state.triggers,
            state.settings,
            principal.tenant_id,
            event,
            store.depth_of(event),
            background=True,
        )


@router.get(
    "/events/type",
    response_model=list[Event],
    summary="Retrieves events of a specific type within a time range.",
)
async def events_by_type(
    state: StateDep,
    principal: PrincipalDep,
    event_type: str | None = Query(None, description="The type of event (required)."),
    start: str | None = _FROM,
    end: str | None = _TO,
    limit: str | None = _LIMIT,
    order: str | None = _ORDER,
) -> list[dict[str, Any]]:
    with event_errors():
        return await asyncio.to_thread(
            queries.events_by_type,
            state.db,
            principal.tenant_id,
            event_type,
            start,
            end,
            limit,
            order,
        )


@router.get(
    "/events/source",
    response_model=list[Event],
    summary="Retrieves events from a specific source within a time range.",
)
async def events_by_source(
    state: StateDep,
    principal: PrincipalDep,
    event_source: str | None = Query(None, description="The source system (required)."),
    event_type: str | None = Query(None, description="Only events of this type."),
    start: str | None = _FROM,
    end: str | None = _TO,
    limit: str | None = _LIMIT,
    order: str | None = _ORDER,
) -> list[dict[str, Any]]:
    with event_errors():
        return await asyncio.to_thread(
            queries.events_by_source,
            state.db,
            principal.tenant_id,
            event_source,
            event_type,
            start,
            end,
            limit,
            order,
        )


@router.get(
    "/events/aggregate",
    response_model=list[Event],
    summary="Retrieves events for a specific aggregate within a time range.",
)
async def events_by_aggregate(
    state: StateDep,
    principal: PrincipalDep,
    aggregate_type: str | None = Query(None, description="The aggregate type (required)."),
    aggregate_id: str | None = Query(None, description="The aggregate id (required)."),
    event_type: str | None = Query(None, description="Only events of this type."),
    start: str | None = _FROM,
    end: str | None = _TO,
    limit: str | None = _LIMIT,
    order: str | None = _ORDER,
) -> list[dict[str, Any]]:
    with event_errors():
        return await asyncio.to_thread(
            queries.events_by_aggregate,
            state.db,
            principal.tenant_id,
            aggregate_type,
            aggregate_id,
            event_type,
            start,
            end,
            limit,
            order,
        )


@router.get(
    "/events/types",
    response_model=list[str],
    summary="Lists distinct event types that occurred within a time range.",
)
async def event_types(
    state: StateDep,
    principal: PrincipalDep,
    start: str | None = _FROM,
    end: str | None = _TO,
    limit: str | None = _LIMIT,
) -> list[str]:
    with event_errors():
        return await asyncio.to_thread(
            queries.event_types, state.db, principal.tenant_id, start, end, limit
        )


@router.delete(
    "/events/type",
    response_model=str,
    summary="Deletes all events of a specific type within a time range.",
    description="USE WITH CAUTION: destructive. Without from/to, every event of the type goes.",
)
async def delete_events_by_type(
    state: StateDep,
    principal: PrincipalDep,
    event_type: str | None = Query(None, description="The type of event to delete (required)."),
    start: str | None = _FROM,
    end: str | None = _TO,
) -> str:
    with event_errors():
        count = await asyncio.to_thread(
            queries.delete_events_by_type, state.db, principal.tenant_id, event_type, start, end
        )
    return f"deleted {count} events of type {event_type}"


def _resume_point(header: str | None, query: str | None) -> int | None:
    value = header or query
    if value is None or value.strip() == "":
        return None
    try:
        nid: int | None = int(value)
    except ValueError:
        nid = None
    if nid is None or nid > store.MAX_NID:
        raise APIError(
            400,
            "invalid_last_event_id",
            f"Last-Event-ID {value!r} is not an event nid",
            param="Last-Event-ID",
        )
    return max(nid, 0)


@router.get(
    "/events/stream/{eventType:path}",
    summary="Streams events of a specific type in real-time using Server-Sent Events (SSE).",
    description="Each event is one SSE message: `id:` is the event's nid and `data:` the event "
    "as JSON. A client reconnecting with `Last-Event-ID` (or `?lastEventId=`) receives every "
    "event of the type appended after that nid, so nothing is lost across reconnects.",
    response_class=EventSourceResponse,
    responses={
        200: event_stream(
            "One message per event of the type, `id:` its nid and `data:` the Event as JSON; a "
            "comment line every 15 s keeps the connection open.",
            Event,
        )
    },
)
async def stream_events(
    eventType: str,
    state: StateDep,
    principal: PrincipalDep,
    last_event_id: str | None = Header(None, alias="Last-Event-ID"),
    last_event_id_query: str | None = Query(None, alias="lastEventId"),
) -> EventSourceResponse:
    after = _resume_point(last_event_id, last_event_id_query)
    if after is None:
        # Fixed before the answer starts, so whatever is appended once the client sees the
        # response headers is on the stream.
        after = await asyncio.to_thread(queries.latest_nid, state.db, principal.tenant_id)
    db, tenant, interval = state.db, principal.tenant_id, state.settings.event_poll_interval

    async def messages() -> AsyncIterator[ServerSentEvent]:
        cursor = after
        # The type stays out of the comment: a path segment may decode to a line break.
        yield ServerSentEvent(comment=f"stream open after nid {cursor}")
        while True:
            # API and workers are separate processes: the database is the only place that
            # sees every append, so the stream polls it (an indexed tail read, see core).
            batch = await asyncio.to_thread(queries.events_after, db, tenant, eventType, cursor)
            for event in batch:
                cursor = event["nid"]
                yield ServerSentEvent(data=json.dumps(event), id=str(cursor))
            if len(batch) < 200:
                await asyncio.sleep(interval)

    return EventSourceResponse(messages(), ping=15, headers={"X-Accel-Buffering": "no"})


# --- raw events, ingest, mappings ---------------------------------------------------------------


@router.get(
    "/raw-events",
    response_model=list[RawEvent],
    summary="Lists raw events within a time range, newest first.",
)
async def list_raw_events(
    state: StateDep,
    principal: PrincipalDep,
    start: str | None = _FROM,
    end: str | None = _TO,
    limit: str | None = _LIMIT,
) -> list[dict[str, Any]]:
    with event_errors():
        return await asyncio.to_thread(
            raw.list_raw_events, state.db, principal.tenant_id, start, end, limit
        )


@router.post(
    "/raw-events",
    status_code=201,
    response_model=RawEvent,
    summary="Stores a raw event (no mapping is applied; use /ingest for that).",
)
async def create_raw_event(
    body: RawEventIn, state: StateDep, principal: PrincipalDep
) -> dict[str, Any]:
    with event_errors():
        return await asyncio.to_thread(
            raw.store_raw_event, state.db, principal.tenant_id, body.model_dump(exclude={"nid"})
        )


@router.get(
    "/raw-events/{nid}",
    response_model=RawEvent,
    summary="Retrieves a raw event by numeric ID (NID) within a time range.",
)
async def get_raw_event(
    nid: str,
    state: StateDep,
    principal: PrincipalDep,
    start: str | None = _FROM,
    end: str | None = _TO,
) -> dict[str, Any]:
    with event_errors():
        return await asyncio.to_thread(
            raw.get_raw_event, state.db, principal.tenant_id, nid, start, end
        )


@router.post(
    "/ingest",
    status_code=201,
    response_model=Event,
    summary="Stores a raw payload and appends the event its path's mapping makes of it.",
    description="The body is any JSON payload; request headers (credentials removed) are kept "
    "with it for metadataMapping. Without a mapping for the path the payload is still stored "
    "(404 names its nid, to POST /replay once the mapping exists).",
)
async def ingest(
    request: Request,
    state: StateDep,
    principal: PrincipalDep,
    path: str | None = Query(None, description="The mapping configuration path to apply."),
    payload: Any = Body(None),
) -> dict[str, Any]:
    with event_errors():
        return await raw.ingest(
            state.db,
            state.triggers,
            state.settings,
            principal.tenant_id,
            path,
            payload,
            dict(request.headers),
        )


@router.get(
    "/mappings",
    response_model=list[MappingConfig],
    response_model_by_alias=True,
    summary="Lists all configured event mappings, sorted by path.",
)
async def list_mappings(state: StateDep, principal: PrincipalDep) -> list[MappingConfig]:
    return await asyncio.to_thread(mappings.list_mappings, state.db, principal.tenant_id)


@router.post(
    "/mappings",
    status_code=201,
    response_model=MappingConfig,
    response_model_by_alias=True,
    summary="Creates a new event mapping configuration.",
)
async def create_mapping(
    body: MappingConfig, state: StateDep, principal: PrincipalDep
) -> MappingConfig:
    with event_errors():
        return await asyncio.to_thread(mappings.create_mapping, state.db, principal.tenant_id, body)


@router.get(
    "/mapping",
    response_model=MappingConfig,
    response_model_by_alias=True,
    summary="Retrieves details for a specific event mapping by path.",
)
async def get_mapping(
    state: StateDep, principal: PrincipalDep, path: str | None = Query(None)
) -> MappingConfig:
    with event_errors():
        return await asyncio.to_thread(mappings.get_mapping, state.db, principal.tenant_id, path)


@router.put(
    "/mapping",
    response_model=MappingConfig,
    response_model_by_alias=True,
    summary="Updates an existing event mapping configuration.",
    description="The path from the query parameter overrides any path in the request body.",
)
async def update_mapping(
    body: MappingConfig, state: StateDep, principal: PrincipalDep, path: str | None = Query(None)
) -> MappingConfig:
    with event_errors():
        return await asyncio.to_thread(
            mappings.update_mapping, state.db, principal.tenant_id, path, body
        )


@router.delete(
    "/mapping", response_model=str, summary="Deletes an event mapping configuration by path."
)
async def delete_mapping(
    state: StateDep, principal: PrincipalDep, path: str | None = Query(None)
) -> str:
    with event_errors():
        await asyncio.to_thread(mappings.delete_mapping, state.db, principal.tenant_id, path)
    return "mapping removed"


@router.post(
    "/replay",
    status_code=201,
    response_model=Event,
    summary="Replays a raw event by NID to re-emit its domain event.",
    description="Applies the current mapping of the raw event's path and appends the result "
    "as a new event (metadata.replayed = true), which fires triggers like any other.",
)
async def replay(
    state: StateDep,
    principal: PrincipalDep,
    nid: str | None = Query(None, description="Numeric ID of the raw event."),
    start: str | None = _FROM,
    end: str | None = _TO,
) -> dict[str, Any]:
    with event_errors():
        return await raw.replay(
            state.db,
            state.triggers,
            state.settings,
            principal.tenant_id,
            queries.required(nid, "nid"),
            start,
            end,
        )


@router.post(
    "/sync",
    response_model=str,
    summary="Refreshes the mapping cache from the underlying storage.",
)
async def sync_mappings(state: StateDep, principal: PrincipalDep) -> str:
    count = await asyncio.to_thread(mappings.sync_mappings, state.db, principal.tenant_id)
    return f"mappings synced: {count}"
