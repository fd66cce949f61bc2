"""The event store (seed 003 eventstore): append, queries, raw ingest with mappings, replay.

Every query filters on the tenant first and on one of the indexes declared on EventRow, so a
query over a million events reads a few index pages rather than the table. Triggers live in
core/triggers.py; ``append_and_dispatch`` is the one door through which events that may fire
triggers come in (POST /events, /ingest, /replay and the JS ``sendEvent`` builtin).
"""

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import DateTime, bindparam, delete, func, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from sqlmodel.sql.expression import SelectOfScalar
from temporalio.client import Client

from core.config import Settings
from core.db import Database
from core.models import EventMappingRow, EventRow, RawEventRow, as_utc, new_id, rfc3339, utcnow

log = logging.getLogger("chainloom.events")

# Seed 003: "Events must be within ±10 minutes of current server time."
MAX_CLOCK_SKEW = timedelta(minutes=10)
# Where an event records how many trigger hops led to it (see core/triggers.py).
DEPTH_KEY = "chainloom_depth"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# Column bounds on PostgreSQL: `version` is an integer, `nid` a bigint.
MAX_VERSION = 2**31 - 1
MAX_NID = 2**63 - 1
# Mappings change rarely and are read on every /ingest; other API processes see a change
# after this long, or at once after POST /sync.
MAPPING_CACHE_TTL = 30.0
# Headers that carry credentials are never stored with a raw event.
_SECRET_HEADERS = {"authorization", "proxy-authorization", "x-api-key", "cookie"}
# Go's zero time, which contenox clients send for "not set".
_ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)

ClientSource = Client | Callable[[], Awaitable[Client]]


class EventError(Exception):
    """A refused request, with the HTTP status and code the API answers with."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.extra = extra or {}


# --- parsing -------------------------------------------------------------------------------


def parse_time(value: Any, param: str) -> datetime | None:
    """An RFC 3339 timestamp (or datetime) as an aware UTC datetime; None when absent."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        raw = value.strip()
        # An unencoded "+00:00" in a query string arrives as " 00:00".
        raw = re.sub(r" (\d\d:?\d\d)$", r"+\1", raw)
        if raw[-1:] in ("Z", "z"):
            raw = raw[:-1] + "+00:00"
        # RFC3339Nano carries up to nine fraction digits; Python takes six.
        raw = re.sub(r"(\.\d{6})\d+", r"\1", raw)
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError as err:
            raise EventError(
                400,
                "invalid_time",
                f"{param} {value!r} is not an RFC 3339 timestamp (e.g. 2024-05-01T12:00:00Z)",
                param=param,
            ) from err
    else:
        raise EventError(
            400, "invalid_time", f"{param} must be an RFC 3339 timestamp string", param=param
        )
    # Stored times are UTC (SQLite compares them as text): bring every bound to UTC.
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def time_range(start: Any, end: Any) -> tuple[datetime | None, datetime | None]:
    lo, hi = parse_time(start, "from"), parse_time(end, "to")
    if lo is not None and hi is not None and lo > hi:
        raise EventError(
            400, "invalid_time_range", f"from ({rfc3339(lo)}) is after to ({rfc3339(hi)})"
        )
    return lo, hi


def parse_limit(value: Any, default: int = DEFAULT_LIMIT, maximum: int = MAX_LIMIT) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError) as err:
        raise EventError(
            400, "invalid_limit", f"limit {value!r} is not a number", param="limit"
        ) from err
    if number < 1:
        raise EventError(400, "invalid_limit", "limit must be at least 1", param="limit")
    return min(number, maximum)


def json_value(value: Any, name: str, *, object_only: bool = False) -> Any:
    """A JSON field given either as JSON or as a JSON-encoded string (seed 003 sends strings)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise EventError(
                422,
                "invalid_json",
                f"{name} must be a JSON value or a JSON-encoded string: {err}",
                param=name,
            ) from err
    if object_only and not isinstance(value, dict):
        raise EventError(422, "invalid_json", f"{name} must be a JSON object", param=name)
    return value


def _text_field(event: dict[str, Any], name: str, limit: int, required: bool = False) -> str:
    value = event.get(name)
    if value is None:
        value = ""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise EventError(422, "invalid_event", f"{name} must be a string", param=name)
    value = str(value)
    if required and not value.strip():
        raise EventError(422, "invalid_event", f"{name} is required", param=name)
    if len(value) > limit:
        raise EventError(
            422, "invalid_event", f"{name} is longer than {limit} characters", param=name
        )
    return value


def depth_of(event: dict[str, Any]) -> int:
    """The trigger depth an incoming event claims in metadata.chainloom_depth (0 if none)."""
    try:
        metadata = json_value(event.get("metadata"), "metadata")
    except EventError:
        return 0
    value = metadata.get(DEPTH_KEY) if isinstance(metadata, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 0


def new_event_row(
    tenant_id: str, event: dict[str, Any], depth: int = 0, now: datetime | None = None
) -> EventRow:
    """Validate an event as appended (seed 003 eventstore.Event) and build its row."""
    if not isinstance(event, dict):
        raise EventError(422, "invalid_event", "an event must be a JSON object")
    now = now or utcnow()
    event_type = _text_field(event, "event_type", 200, required=True)
    event_id = _text_field(event, "id", 64) or new_id()
    version = event.get("version")
    if version is None:
        version = 1
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= MAX_VERSION:
        raise EventError(
            422,
            "invalid_event",
            f"version must be an integer from 0 to {MAX_VERSION}",
            param="version",
        )
    created = parse_time(event.get("created_at"), "created_at")
    if created is None or created == _ZERO_TIME:
        created = now
    skew = created - now
    if abs(skew) > MAX_CLOCK_SKEW:
        minutes = abs(skew).total_seconds() / 60
        where = "ahead of" if skew > timedelta(0) else "behind"
        raise EventError(
            422,
            "created_at_out_of_range",
            f"created_at {rfc3339(created)} is {minutes:.1f} minutes {where} the server clock "
            f"({rfc3339(now)}); events must be within ±10 minutes of the current server time "
            "(omit created_at to use the server time)",
            param="created_at",
        )
    metadata = dict(json_value(event.get("metadata"), "metadata", object_only=True))
    metadata[DEPTH_KEY] = depth
    return EventRow(
        id=event_id,
        tenant_id=tenant_id,
        event_type=event_type,
        event_source=_text_field(event, "event_source", 200),
        aggregate_type=_text_field(event, "aggregate_type", 200),
        aggregate_id=_text_field(event, "aggregate_id", 200),
        version=version,
        data=json_value(event.get("data"), "data"),
        metadata_=metadata,
        created_at=created,
    )


def event_json(row: EventRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "nid": row.nid,
        "event_type": row.event_type,
        "event_source": row.event_source,
        "aggregate_type": row.aggregate_type,
        "aggregate_id": row.aggregate_id,
        "version": row.version,
        "data": row.data if row.data is not None else {},
        "metadata": row.metadata_ if row.metadata_ is not None else {},
        "created_at": rfc3339(row.created_at),
    }


# --- append ----------------------------------------------------------------------------------


def _serialise_appends(session: Session, tenant_id: str) -> None:
    """On PostgreSQL, appends of one tenant take turns (transaction-scoped advisory lock).

    The sequence hands out nids at insert time, so two concurrent transactions could commit
    nid 11 before nid 10; a stream that had sent 11 would then never send 10. Taking turns
    makes nid order commit order, which is what lets /events/stream resume by nid alone.
    SQLite has a single writer, so it needs nothing.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(724062, hashtext(:tenant))"), {"tenant": tenant_id}
        )


def insert_event(
    db: Database, row: EventRow, *, existing_ok: bool = False
) -> tuple[EventRow, bool]:
    """Store a validated event; (row, True) when new, (stored row, False) for a known id."""
    with db.session() as session:
        _serialise_appends(session, row.tenant_id)
        session.add(row)
        try:
            session.commit()
            return row, True
        except IntegrityError as err:
            session.rollback()
            existing = session.exec(select(EventRow).where(EventRow.id == row.id)).first()
            if existing_ok and existing is not None and existing.tenant_id == row.tenant_id:
                return existing, False
            raise EventError(
                409, "event_exists", f"an event with id {row.id!r} already exists", param="id"
            ) from err


def append_event(
    db: Database,
    tenant_id: str,
    event: dict[str, Any],
    depth: int = 0,
    *,
    existing_ok: bool = False,
) -> tuple[dict[str, Any], bool]:
    """Validate and store one event without dispatching triggers (blocking; see the async
    ``append_and_dispatch``). Returns the stored event and whether it is new."""
    row, created = insert_event(db, new_event_row(tenant_id, event, depth), existing_ok=existing_ok)
    return event_json(row), created


def append_system_event(
    db: Database, tenant_id: str, event_type: str, data: dict[str, Any], depth: int
) -> dict[str, Any]:
    """An event chainloom itself records (trigger errors); it never fires triggers."""
    event = {
        "event_type": event_type,
        "event_source": "chainloom",
        "aggregate_type": "event_trigger",
        "aggregate_id": str(data.get("trigger", "")),
        "data": data,
    }
    stored, _ = append_event(db, tenant_id, event, depth)
    return stored


# Dispatches running after their append returned; kept so they are not garbage collected.
_BACKGROUND: set[asyncio.Task[Any]] = set()


def _spawn(coro: Coroutine[Any, Any, Any]) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


async def wait_for_background_dispatches(grace: float = 10.0) -> None:
    """Let dispatches started with background=True finish (shutdown, tests, benchmarks)."""
    pending = [task for task in _BACKGROUND if not task.done()]
    if pending:
        await asyncio.wait(pending, timeout=grace)


async def append_and_dispatch(
    db: Database,
    client: ClientSource,
    settings: Settings,
    tenant_id: str,
    event: dict[str, Any],
    depth: int = 0,
    *,
    background: bool = False,
    existing_ok: bool = False,
) -> dict[str, Any]:
    """Append an event, then start the functions of the triggers listening for its type.

    ``client`` is a Temporal client or an async callable returning one (the API passes
    ``state.temporal.get`` so an append works even while Temporal is down). ``depth`` is the
    number of trigger hops behind this event: 0 from outside, the running function's depth + 1
    from ``sendEvent``. It is stored in metadata.chainloom_depth.

    The commit comes first; starting workflows follows it. With ``background=True`` (the API)
    the call returns right after the commit and the starts run in a task of this loop; without
    it (an activity) it returns once every workflow start was acknowledged. Starting is a
    quick RPC; the functions themselves run on workers. ``existing_ok=True`` makes an append
    with a known event id return the stored event and dispatch nothing, so a retried activity
    never fires a trigger twice.
    """
    from core.triggers import dispatch_triggers  # triggers record events through this module

    stored, created = await asyncio.to_thread(
        append_event, db, tenant_id, event, depth, existing_ok=existing_ok
    )
    if created:
        dispatch = dispatch_triggers(client, settings, db, tenant_id, stored, depth)
        if background:
            _spawn(dispatch)
        else:
            await dispatch
    return stored


# --- queries ---------------------------------------------------------------------------------


@dataclass
class EventQuery:
    """One read of the event store; ``statement()`` is what runs (and what the benchmark
    EXPLAINs). Each route pins the columns that lead one of EventRow's indexes."""

    tenant_id: str
    event_type: str | None = None
    event_source: str | None = None
    aggregate_type: str | None = None
    aggregate_id: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    limit: int = DEFAULT_LIMIT
    order: Literal["asc", "desc"] = "desc"

    def statement(self) -> SelectOfScalar[EventRow]:
        query = select(EventRow).where(EventRow.tenant_id == self.tenant_id)
        for column, value in (
            (EventRow.event_type, self.event_type),
            (EventRow.event_source, self.event_source),
            (EventRow.aggregate_type, self.aggregate_type),
            (EventRow.aggregate_id, self.aggregate_id),
        ):
            if value:
                query = query.where(column == value)
        if self.start is not None:
            query = query.where(col(EventRow.created_at) >= self.start)
        if self.end is not None:
            query = query.where(col(EventRow.created_at) <= self.end)
        # created_at alone (no nid tie-break): the indexes end in created_at, so the database
        # walks an index in order and stops after `limit` rows instead of sorting.
        order = col(EventRow.created_at)
        query = query.order_by(order.desc() if self.order == "desc" else order.asc())
        return query.limit(self.limit)


def find_events(db: Database, query: EventQuery) -> list[dict[str, Any]]:
    with db.session() as session:
        return [event_json(row) for row in session.exec(query.statement()).all()]


def required(value: str | None, name: str) -> str:
    if not value:
        raise EventError(
            400, "missing_parameter", f"query parameter {name} is required", param=name
        )
    return value


def _order(value: str | None) -> Literal["asc", "desc"]:
    if value in (None, "", "desc"):
        return "desc"
    if value == "asc":
        return "asc"
    raise EventError(400, "invalid_order", "order must be asc or desc", param="order")


def events_by_type(
    db: Database,
    tenant_id: str,
    event_type: str | None,
    start: Any = None,
    end: Any = None,
    limit: Any = None,
    order: str | None = None,
) -> list[dict[str, Any]]:
    lo, hi = time_range(start, end)
    query = EventQuery(
        tenant_id,
        event_type=required(event_type, "event_type"),
        start=lo,
        end=hi,
        limit=parse_limit(limit),
        order=_order(order),
    )
    return find_events(db, query)


def events_by_source(
    db: Database,
    tenant_id: str,
    event_source: str | None,
    event_type: str | None = None,
    start: Any = None,
    end: Any = None,
    limit: Any = None,
    order: str | None = None,
) -> list[dict[str, Any]]:
    lo, hi = time_range(start, end)
    query = EventQuery(
        tenant_id,
        event_source=required(event_source, "event_source"),
        event_type=event_type or None,
        start=lo,
        end=hi,
        limit=parse_limit(limit),
        order=_order(order),
    )
    return find_events(db, query)


def events_by_aggregate(
    db: Database,
    tenant_id: str,
    aggregate_type: str | None,
    aggregate_id: str | None,
    event_type: str | None = None,
    start: Any = None,
    end: Any = None,
    limit: Any = None,
    order: str | None = None,
) -> list[dict[str, Any]]:
    lo, hi = time_range(start, end)
    query = EventQuery(
        tenant_id,
        aggregate_type=required(aggregate_type, "aggregate_type"),
        aggregate_id=required(aggregate_id, "aggregate_id"),
        event_type=event_type or None,
        start=lo,
        end=hi,
        limit=parse_limit(limit),
        order=_order(order),
    )
    return find_events(db, query)


def event_types_statement(start: datetime | None, end: datetime | None) -> Any:
    """Distinct event types of a tenant with at least one event in [start, end].

    A skip scan: hop from one type to the next along (tenant, event_type, created_at), one
    index probe per distinct type, then one probe per type for the range. DISTINCT over the
    range would read every event in it: a million rows for a wide range.
    """
    within = ""
    if start is not None:
        within += " AND x.created_at >= :start"
    if end is not None:
        within += " AND x.created_at <= :end"
    sql = f"""
        WITH RECURSIVE types(event_type) AS (
            SELECT (SELECT e.event_type FROM event e WHERE e.tenant_id = :tenant
                    ORDER BY e.event_type LIMIT 1)
            UNION ALL
            SELECT (SELECT e.event_type FROM event e
                    WHERE e.tenant_id = :tenant AND e.event_type > types.event_type
                    ORDER BY e.event_type LIMIT 1)
            FROM types WHERE types.event_type IS NOT NULL
        )
        SELECT types.event_type FROM types
        WHERE types.event_type IS NOT NULL
          AND EXISTS (SELECT 1 FROM event x
                      WHERE x.tenant_id = :tenant AND x.event_type = types.event_type{within})
        ORDER BY types.event_type
        LIMIT :limit
    """
    statement = text(sql)
    # Bound as the column's own type, so SQLite gets the same text form it stored.
    params = [bindparam(name, type_=DateTime(timezone=True)) for name in ("start", "end")]
    return statement.bindparams(*[p for p in params if f":{p.key}" in sql])


def event_types(
    db: Database, tenant_id: str, start: Any = None, end: Any = None, limit: Any = None
) -> list[str]:
    lo, hi = time_range(start, end)
    params: dict[str, Any] = {"tenant": tenant_id, "limit": parse_limit(limit)}
    if lo is not None:
        params["start"] = lo
    if hi is not None:
        params["end"] = hi
    with db.session() as session:
        rows = session.execute(event_types_statement(lo, hi), params).all()
    return [row[0] for row in rows]


def delete_statement(
    tenant_id: str, event_type: str, start: datetime | None, end: datetime | None
) -> Any:
    statement = delete(EventRow).where(
        col(EventRow.tenant_id) == tenant_id, col(EventRow.event_type) == event_type
    )
    if start is not None:
        statement = statement.where(col(EventRow.created_at) >= start)
    if end is not None:
        statement = statement.where(col(EventRow.created_at) <= end)
    return statement


def delete_events_by_type(
    db: Database, tenant_id: str, event_type: str | None, start: Any = None, end: Any = None
) -> int:
    lo, hi = time_range(start, end)
    statement = delete_statement(tenant_id, required(event_type, "event_type"), lo, hi)
    with db.session() as session:
        result = session.execute(statement)
        session.commit()
    return int(getattr(result, "rowcount", 0) or 0)


# --- live tail -------------------------------------------------------------------------------


def latest_nid(db: Database) -> int:
    """Where a new stream starts: after every event stored so far (one primary-key probe)."""
    with db.session() as session:
        value = session.exec(select(func.max(EventRow.nid))).one()
    return int(value or 0)


def events_after(
    db: Database, tenant_id: str, event_type: str, after_nid: int, limit: int = 200
) -> list[dict[str, Any]]:
    """Events of a type with nid > after_nid, oldest first."""
    with db.session() as session:
        rows = session.exec(events_after_statement(tenant_id, event_type, after_nid, limit)).all()
    return [event_json(row) for row in rows]


def events_after_statement(
    tenant_id: str, event_type: str, after_nid: int, limit: int = 200
) -> SelectOfScalar[EventRow]:
    # Streams sit at the tail, so this walks the primary key from after_nid: it reads only
    # what was appended since the last poll, whatever the size of the table.
    return (
        select(EventRow)
        .where(
            EventRow.tenant_id == tenant_id,
            EventRow.event_type == event_type,
            col(EventRow.nid) > after_nid,
        )
        .order_by(col(EventRow.nid))
        .limit(limit)
    )


# --- raw events ------------------------------------------------------------------------------


def raw_json(row: RawEventRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "nid": row.nid,
        "path": row.path,
        "headers": row.headers or {},
        "payload": row.payload,
        "received_at": rfc3339(row.received_at),
    }


def clean_headers(headers: dict[str, Any]) -> dict[str, str]:
    return {
        str(name).lower(): str(value)
        for name, value in headers.items()
        if str(name).lower() not in _SECRET_HEADERS
    }


def store_raw_event(db: Database, tenant_id: str, raw: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise EventError(422, "invalid_raw_event", "a raw event must be a JSON object")
    path = raw.get("path") or ""
    if not isinstance(path, str) or len(path) > 400:
        raise EventError(
            422,
            "invalid_raw_event",
            "path must be a string of at most 400 characters",
            param="path",
        )
    headers = json_value(raw.get("headers"), "headers", object_only=True)
    payload = raw.get("payload")
    if isinstance(payload, str):
        # A JSON-encoded payload is stored decoded; anything else stays the string it is.
        try:
            payload = json.loads(payload)
        except ValueError:
            pass
    row = RawEventRow(
        id=_text_field(raw, "id", 64) or new_id(),
        tenant_id=tenant_id,
        path=path,
        headers=clean_headers(headers),
        payload=payload,
        received_at=parse_time(raw.get("received_at"), "received_at") or utcnow(),
    )
    with db.session() as session:
        session.add(row)
        try:
            session.commit()
        except IntegrityError as err:
            raise EventError(
                409, "raw_event_exists", f"a raw event with id {row.id!r} already exists"
            ) from err
    return raw_json(row)


def list_raw_events(
    db: Database, tenant_id: str, start: Any = None, end: Any = None, limit: Any = None
) -> list[dict[str, Any]]:
    lo, hi = time_range(start, end)
    query = select(RawEventRow).where(RawEventRow.tenant_id == tenant_id)
    if lo is not None:
        query = query.where(col(RawEventRow.received_at) >= lo)
    if hi is not None:
        query = query.where(col(RawEventRow.received_at) <= hi)
    query = query.order_by(col(RawEventRow.received_at).desc()).limit(parse_limit(limit))
    with db.session() as session:
        return [raw_json(row) for row in session.exec(query).all()]


def _parse_nid(nid: Any) -> int:
    try:
        value = int(nid)
    except (TypeError, ValueError) as err:
        raise EventError(400, "invalid_nid", f"nid {nid!r} is not a number", param="nid") from err
    if not 1 <= value <= MAX_NID:
        raise EventError(400, "invalid_nid", f"nid must be from 1 to {MAX_NID}", param="nid")
    return value


def get_raw_event(
    db: Database, tenant_id: str, nid: Any, start: Any = None, end: Any = None
) -> dict[str, Any]:
    number = _parse_nid(nid)
    lo, hi = time_range(start, end)
    with db.session() as session:
        row = session.get(RawEventRow, number)
    if (
        row is None
        or row.tenant_id != tenant_id
        or (lo is not None and as_utc(row.received_at) < lo)
        or (hi is not None and as_utc(row.received_at) > hi)
    ):
        raise EventError(404, "not_found", f"raw event {number} not found")
    return raw_json(row)


# --- mappings --------------------------------------------------------------------------------


class MappingConfig(BaseModel):
    """seed 003 eventstore.MappingConfig: how a raw payload on a path becomes an event.

    Each ``...Field`` is a JSON path into the payload ("order.id", "$.order.id",
    "items[0].sku"); when it is empty or finds nothing, the fixed value next to it is used.
    ``metadataMapping`` maps metadata keys to "header:<Name>" or a payload path.
    """

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    path: str = Field("", max_length=400)
    event_type: str = Field("", alias="eventType", max_length=200)
    event_type_field: str = Field("", alias="eventTypeField")
    event_source: str = Field("", alias="eventSource", max_length=200)
    event_source_field: str = Field("", alias="eventSourceField")
    aggregate_type: str = Field("", alias="aggregateType", max_length=200)
    aggregate_type_field: str = Field("", alias="aggregateTypeField")
    aggregate_id_field: str = Field("", alias="aggregateIDField")
    event_id_field: str = Field("", alias="eventIDField")
    version: int = Field(1, ge=0, le=MAX_VERSION)
    metadata_mapping: dict[str, str] = Field(default_factory=dict, alias="metadataMapping")

    @field_validator("metadata_mapping", mode="before")
    @classmethod
    def _decode(cls, value: Any) -> Any:
        # A ValueError, not EventError: pydantic turns only that into a 422 field error.
        try:
            return {} if value is None else json_value(value, "metadataMapping", object_only=True)
        except EventError as err:
            raise ValueError(err.message) from err

    def public(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


_PATH_TOKEN = re.compile(r"\[(\d+)\]|\[['\"]([^'\"]*)['\"]\]|\.?([^.\[\]]+)")


def extract(payload: Any, path: str) -> Any:
    """The value at a JSON path ("a.b", "$.a.b", "a[0].b", "a['x.y']"); None when missing."""
    path = path.strip()
    if path.startswith("$"):
        path = path[1:]
    value = payload
    for match in _PATH_TOKEN.finditer(path):
        index, quoted, name = match.groups()
        if index is not None:
            if not isinstance(value, list) or int(index) >= len(value):
                return None
            value = value[int(index)]
        else:
            key = quoted if quoted is not None else name
            if isinstance(value, dict):
                value = value.get(key)
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                return None
        if value is None:
            return None
    return value


def _header(headers: dict[str, Any], name: str) -> Any:
    wanted = name.strip().lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _pick(payload: Any, field: str, fixed: str) -> str:
    if field:
        value = extract(payload, field)
        if value is not None and not isinstance(value, dict | list):
            return str(value)
    return fixed


def apply_mapping(
    config: MappingConfig, payload: Any, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The event a mapping makes of a raw payload (not yet validated or stored)."""
    headers = headers or {}
    event_type = _pick(payload, config.event_type_field, config.event_type)
    if not event_type:
        raise EventError(
            422,
            "mapping_no_event_type",
            f"the mapping for path {config.path!r} gives no event_type for this payload "
            f"(eventTypeField {config.event_type_field!r} found nothing and eventType is empty)",
        )
    metadata: dict[str, Any] = {}
    for key, source in config.metadata_mapping.items():
        if source.lower().startswith("header:"):
            value = _header(headers, source.split(":", 1)[1])
        elif source.lower().startswith("headers."):
            value = _header(headers, source.split(".", 1)[1])
        else:
            value = extract(payload, source.removeprefix("payload:"))
        if value is not None:
            metadata[key] = value
    event: dict[str, Any] = {
        "event_type": event_type,
        "event_source": _pick(payload, config.event_source_field, config.event_source),
        "aggregate_type": _pick(payload, config.aggregate_type_field, config.aggregate_type),
        "aggregate_id": _pick(payload, config.aggregate_id_field, ""),
        "version": config.version,
        "data": payload if payload is not None else {},
        "metadata": metadata,
    }
    event_id = _pick(payload, config.event_id_field, "")
    if event_id:
        event["id"] = event_id
    return event


class _MappingCache:
    """Mappings by (database, tenant, path), refreshed after MAPPING_CACHE_TTL or on /sync."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str, str], tuple[float, MappingConfig | None]] = {}

    def get(self, db: Database, tenant_id: str, path: str) -> MappingConfig | None:
        key = (db.url, tenant_id, path)
        hit = self._entries.get(key)
        if hit is not None and time.monotonic() - hit[0] < MAPPING_CACHE_TTL:
            return hit[1]
        config = load_mapping(db, tenant_id, path)
        self._entries[key] = (time.monotonic(), config)
        return config

    def forget(self, db: Database, tenant_id: str, path: str | None = None) -> None:
        for key in list(self._entries):
            if key[0] == db.url and key[1] == tenant_id and (path is None or key[2] == path):
                self._entries.pop(key, None)

    def fill(self, db: Database, tenant_id: str, configs: list[MappingConfig]) -> None:
        self.forget(db, tenant_id)
        now = time.monotonic()
        for config in configs:
            self._entries[(db.url, tenant_id, config.path)] = (now, config)


MAPPINGS = _MappingCache()


def load_mapping(db: Database, tenant_id: str, path: str) -> MappingConfig | None:
    with db.session() as session:
        row = session.get(EventMappingRow, (tenant_id, path))
    return MappingConfig.model_validate({**row.config, "path": path}) if row else None


def list_mappings(db: Database, tenant_id: str) -> list[MappingConfig]:
    query = (
        select(EventMappingRow)
        .where(EventMappingRow.tenant_id == tenant_id)
        .order_by(col(EventMappingRow.path))
    )
    with db.session() as session:
        rows = session.exec(query).all()
    return [MappingConfig.model_validate({**row.config, "path": row.path}) for row in rows]


def get_mapping(db: Database, tenant_id: str, path: str | None) -> MappingConfig:
    config = load_mapping(db, tenant_id, required(path, "path"))
    if config is None:
        raise EventError(404, "not_found", f"mapping for path {path!r} not found")
    return config


def _check_mapping(config: MappingConfig) -> None:
    if not config.path:
        raise EventError(422, "invalid_mapping", "path is required", param="path")
    if not config.event_type and not config.event_type_field:
        raise EventError(
            422,
            "invalid_mapping",
            "a mapping needs eventType (a fixed type) or eventTypeField (a JSON path)",
            param="eventType",
        )


def create_mapping(db: Database, tenant_id: str, config: MappingConfig) -> MappingConfig:
    _check_mapping(config)
    row = EventMappingRow(tenant_id=tenant_id, path=config.path, config=config.public())
    with db.session() as session:
        session.add(row)
        try:
            session.commit()
        except IntegrityError as err:
            raise EventError(
                409, "already_exists", f"a mapping for path {config.path!r} exists", param="path"
            ) from err
    MAPPINGS.forget(db, tenant_id, config.path)
    return config


def update_mapping(
    db: Database, tenant_id: str, path: str | None, config: MappingConfig
) -> MappingConfig:
    # seed 003: the path from the query parameter overrides any path in the body.
    config = config.model_copy(update={"path": required(path, "path")})
    _check_mapping(config)
    with db.session() as session:
        row = session.get(EventMappingRow, (tenant_id, config.path))
        if row is None:
            raise EventError(404, "not_found", f"mapping for path {config.path!r} not found")
        row.config = config.public()
        row.updated_at = utcnow()
        session.add(row)
        session.commit()
    MAPPINGS.forget(db, tenant_id, config.path)
    return config


def delete_mapping(db: Database, tenant_id: str, path: str | None) -> None:
    wanted = required(path, "path")
    with db.session() as session:
        row = session.get(EventMappingRow, (tenant_id, wanted))
        if row is None:
            raise EventError(404, "not_found", f"mapping for path {wanted!r} not found")
        session.delete(row)
        session.commit()
    MAPPINGS.forget(db, tenant_id, wanted)


def sync_mappings(db: Database, tenant_id: str) -> int:
    """POST /sync: reload this process's mapping cache from the database."""
    configs = list_mappings(db, tenant_id)
    MAPPINGS.fill(db, tenant_id, configs)
    return len(configs)


# --- ingest and replay -----------------------------------------------------------------------


async def ingest(
    db: Database,
    client: ClientSource,
    settings: Settings,
    tenant_id: str,
    path: str | None,
    payload: Any,
    headers: dict[str, Any],
) -> dict[str, Any]:
    """Store a raw payload, then append the event its path's mapping makes of it.

    The raw event is kept even when no mapping exists yet, so it can be replayed later.
    """
    wanted = required(path, "path")
    raw = await asyncio.to_thread(
        store_raw_event, db, tenant_id, {"path": wanted, "headers": headers, "payload": payload}
    )
    config = await asyncio.to_thread(MAPPINGS.get, db, tenant_id, wanted)
    if config is None:
        raise EventError(
            404,
            "mapping_not_found",
            f"no mapping for path {wanted!r}; the payload was kept as raw event {raw['nid']}: "
            "create the mapping (POST /mappings), then POST /replay?nid=" + str(raw["nid"]),
            param="path",
            extra={"raw_event": raw},
        )
    return await _emit(db, client, settings, tenant_id, config, raw)


async def replay(
    db: Database,
    client: ClientSource,
    settings: Settings,
    tenant_id: str,
    nid: Any,
    start: Any = None,
    end: Any = None,
) -> dict[str, Any]:
    """Re-emit the event of a raw event through the mapping as it is now."""
    raw = await asyncio.to_thread(get_raw_event, db, tenant_id, nid, start, end)
    # The current mapping, not this process's cached copy: replay is how a fix is applied.
    config = await asyncio.to_thread(load_mapping, db, tenant_id, raw["path"])
    if config is None:
        raise EventError(
            404,
            "mapping_not_found",
            f"no mapping for path {raw['path']!r} (raw event {raw['nid']})",
            param="nid",
        )
    return await _emit(db, client, settings, tenant_id, config, raw, replay=True)


async def _emit(
    db: Database,
    client: ClientSource,
    settings: Settings,
    tenant_id: str,
    config: MappingConfig,
    raw: dict[str, Any],
    replay: bool = False,
) -> dict[str, Any]:
    event = apply_mapping(config, raw["payload"], raw["headers"])
    event["metadata"]["raw_event_nid"] = raw["nid"]
    if replay:
        event["metadata"]["replayed"] = True
        # A replay is a new event: the payload's own id is already taken by the first one.
        event.pop("id", None)
    return await append_and_dispatch(db, client, settings, tenant_id, event, 0, background=True)
