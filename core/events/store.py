"""The event store (seed 003 eventstore): validating and appending events.

Queries live in core/events/queries.py, raw events and /ingest in raw.py, mappings in
mappings.py, triggers in triggers.py; ``dispatch.append_and_dispatch`` is the one door through
which events that may fire triggers come in (POST /events, /ingest, /replay and the JS
``sendEvent`` builtin).
"""

import json
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel
from sqlalchemy import BigInteger, Connection, DateTime, insert, literal, select, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import col
from sqlmodel import select as select_rows

from core.config import Settings
from core.db import Database
from core.events.triggers import (
    START_LEASE,
    SYSTEM_EVENT_TYPES,
    OwedStart,
    depth_exceeded_event,
)
from core.models import EventRow, EventTriggerRow, TriggerOutboxRow, new_id, rfc3339, utcnow

log = logging.getLogger("chainloom.events")

# Seed 003: "Events must be within ±10 minutes of current server time."
MAX_CLOCK_SKEW = timedelta(minutes=10)
# Where an event records how many trigger hops led to it (see core/events/triggers.py).
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
# The trigger depth limit when the caller passes none (CHAINLOOM_TRIGGER_MAX_DEPTH's default).
DEFAULT_MAX_DEPTH: int = Settings.model_fields["trigger_max_depth"].default
# Go's zero time, which contenox clients send for "not set".
_ZERO_TIME = datetime(1, 1, 1, tzinfo=UTC)


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


def event_values(
    tenant_id: str, event: dict[str, Any], depth: int = 0, now: datetime | None = None
) -> dict[str, Any]:
    """Validate an event as appended (seed 003 eventstore.Event): its column values, no nid."""
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
    return {
        "tenant_id": tenant_id,
        "id": event_id,
        "event_type": event_type,
        "event_source": _text_field(event, "event_source", 200),
        "aggregate_type": _text_field(event, "aggregate_type", 200),
        "aggregate_id": _text_field(event, "aggregate_id", 200),
        "version": version,
        "data": json_value(event.get("data"), "data"),
        "metadata": metadata,
        "created_at": created,
    }


class Event(BaseModel):
    """seed 003 eventstore.Event as stored: the one description of an event, for API bodies,
    the stream's `data`, and what a trigger's function receives."""

    id: str
    nid: int
    event_type: str
    event_source: str
    aggregate_type: str
    aggregate_id: str
    version: int
    data: Any
    metadata: dict[str, Any]
    created_at: str

    @classmethod
    def of(cls, values: dict[str, Any], nid: int) -> "Event":
        """The event a row's column values make (`metadata` under its column name too)."""
        return cls(
            id=values["id"],
            nid=nid,
            event_type=values["event_type"],
            event_source=values["event_source"],
            aggregate_type=values["aggregate_type"],
            aggregate_id=values["aggregate_id"],
            version=values["version"],
            data=values["data"] if values["data"] is not None else {},
            metadata=values["metadata"] if values["metadata"] is not None else {},
            created_at=rfc3339(values["created_at"]),
        )


_COLUMNS = ("id", "event_type", "event_source", "aggregate_type", "aggregate_id", "version")


def event_json(row: EventRow) -> dict[str, Any]:
    values = {name: getattr(row, name) for name in _COLUMNS}
    values.update(data=row.data, metadata=row.metadata_, created_at=row.created_at)
    return Event.of(values, int(row.nid or 0)).model_dump(mode="json")


def _stored_json(values: dict[str, Any], nid: int) -> dict[str, Any]:
    """What event_json answers for the row these column values made."""
    return Event.of(values, nid).model_dump(mode="json")


# --- append ----------------------------------------------------------------------------------

EVENT_SEQUENCE = "event"
RAW_EVENT_SEQUENCE = "raw_event"
_EVENT = EventRow.__table__  # type: ignore[attr-defined]
_OUTBOX = TriggerOutboxRow.__table__  # type: ignore[attr-defined]
_TRIGGER = EventTriggerRow.__table__  # type: ignore[attr-defined]
_TIME = DateTime(timezone=True)

_NEXT_NID = text(
    "INSERT INTO event_sequence (tenant_id, name, last_nid) VALUES (:tenant, :name, 1) "
    "ON CONFLICT (tenant_id, name) DO UPDATE SET last_nid = event_sequence.last_nid + 1 "
    "RETURNING last_nid"
)


@dataclass
class Appended:
    """An append's outcome: the stored event, whether it is new, and the trigger starts it
    owes (recorded in the trigger outbox in the same transaction)."""

    event: dict[str, Any]
    created: bool
    owed: list[OwedStart] = field(default_factory=list)


def next_nid(conn: Connection, tenant_id: str, name: str) -> int:
    """The tenant's next nid for `name` (EVENT_SEQUENCE or RAW_EVENT_SEQUENCE).

    Each tenant counts on its own row, so the nids a tenant sees say nothing about anyone
    else's traffic. The row stays locked until the transaction ends: a tenant's appends take
    turns, and a nid is visible only once every smaller nid of the tenant is, which is what
    lets /events/stream resume by nid alone (two concurrent transactions could otherwise commit
    nid 11 before nid 10, and a stream that had sent 11 would never send 10). SQLite has a
    single writer anyway.
    """
    return int(conn.execute(_NEXT_NID, {"tenant": tenant_id, "name": name}).scalar_one())


# PostgreSQL: the whole append is one statement in autocommit, so one round trip: bump the
# tenant's counter (which also makes the tenant's appends take turns, see next_nid), insert
# the event, and record a start in the outbox for every trigger on its type. The triggers are
# read in the same statement, so a trigger committed before the append is never missed and no
# cache can go stale.
_APPEND_POSTGRESQL = text(
    """
WITH seq AS (
    INSERT INTO event_sequence (tenant_id, name, last_nid)
    VALUES (CAST(:tenant_id AS VARCHAR), 'event', 1)
    ON CONFLICT (tenant_id, name) DO UPDATE SET last_nid = event_sequence.last_nid + 1
    RETURNING last_nid
), ev AS (
    INSERT INTO event (tenant_id, nid, id, event_type, event_source, aggregate_type,
                       aggregate_id, version, data, metadata, created_at)
    SELECT CAST(:tenant_id AS VARCHAR), seq.last_nid, :id, :event_type, :event_source,
           :aggregate_type, :aggregate_id, :version, CAST(:data AS JSON),
           CAST(:metadata AS JSON), :created_at
    FROM seq
    RETURNING nid
), owed AS (
    INSERT INTO trigger_outbox (tenant_id, event_nid, trigger_name, function_name, depth,
                                attempts, due_at, last_error, created_at)
    SELECT t.tenant_id, ev.nid, t.name, t.function_name, :depth, 0, :due_at, '', :now
    FROM ev JOIN event_trigger t
      ON t.tenant_id = CAST(:tenant_id AS VARCHAR) AND t.listen_for_type = :event_type
    WHERE CAST(:fire AS BOOLEAN)
    RETURNING trigger_name, function_name
)
SELECT ev.nid, owed.trigger_name, owed.function_name FROM ev LEFT JOIN owed ON true
"""
)


def _append_postgresql(db: Database, values: dict[str, Any], fire: bool, depth: int) -> Appended:
    now = utcnow()
    params = {
        **values,
        "data": json.dumps(values["data"]),
        "metadata": json.dumps(values["metadata"]),
        "depth": depth,
        "fire": fire,
        # Server time: created_at may be the client's, up to ten minutes off.
        "now": now,
        "due_at": now + START_LEASE,
    }
    with db.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        rows = conn.execute(_APPEND_POSTGRESQL, params).all()
    nid = int(rows[0][0])
    owed = [
        OwedStart(values["tenant_id"], nid, trigger, function, depth)
        for _, trigger, function in rows
        if trigger is not None
    ]
    return Appended(_stored_json(values, nid), True, owed)


def _insert(conn: Connection, values: dict[str, Any]) -> int:
    nid = next_nid(conn, values["tenant_id"], EVENT_SEQUENCE)
    conn.execute(insert(_EVENT).values(nid=nid, **values))
    return nid


def _triggers_on(tenant_id: str, event_type: str) -> Any:
    return (
        select(_TRIGGER.c.name, _TRIGGER.c.function_name)
        .where(_TRIGGER.c.tenant_id == tenant_id, _TRIGGER.c.listen_for_type == event_type)
        .order_by(_TRIGGER.c.created_at)
    )


def _append_portable(db: Database, values: dict[str, Any], fire: bool, depth: int) -> Appended:
    """The same as _append_postgresql in a few statements (SQLite: no writes in a WITH)."""
    tenant_id, now = values["tenant_id"], utcnow()
    with db.engine.begin() as conn:
        nid = _insert(conn, values)
        rows: list[Any] = []
        if fire:
            triggers = _triggers_on(tenant_id, values["event_type"]).subquery()
            owe = (
                insert(_OUTBOX)
                .from_select(
                    [
                        "tenant_id",
                        "event_nid",
                        "trigger_name",
                        "function_name",
                        "depth",
                        "attempts",
                        "due_at",
                        "last_error",
                        "created_at",
                    ],
                    select(
                        literal(tenant_id),
                        literal(nid, BigInteger()),
                        triggers.c.name,
                        triggers.c.function_name,
                        literal(depth),
                        literal(0),
                        literal(now + START_LEASE, _TIME),
                        literal(""),
                        literal(now, _TIME),
                    ),
                )
                .returning(_OUTBOX.c.trigger_name, _OUTBOX.c.function_name)
            )
            rows = list(conn.execute(owe).all())
    owed = [OwedStart(tenant_id, nid, trigger, function, depth) for trigger, function in rows]
    return Appended(_stored_json(values, nid), True, owed)


def _append_cut(db: Database, values: dict[str, Any], depth: int, max_depth: int) -> Appended:
    """An event past the depth limit: stored with, in the same transaction, one
    chainloom.trigger.depth_exceeded event per trigger it would have started."""
    tenant_id = values["tenant_id"]
    with db.engine.begin() as conn:
        nid = _insert(conn, values)
        stored = _stored_json(values, nid)
        for trigger, function in conn.execute(_triggers_on(tenant_id, values["event_type"])):
            record = depth_exceeded_event(trigger, function, stored, depth, max_depth)
            _insert(conn, event_values(tenant_id, record, depth))
    return Appended(stored, True)


def find_event(db: Database, tenant_id: str, event_id: str) -> dict[str, Any] | None:
    query = select_rows(EventRow).where(
        col(EventRow.tenant_id) == tenant_id, col(EventRow.id) == event_id
    )
    with db.session() as session:
        row = session.exec(query).first()
    return event_json(row) if row is not None else None


def append(
    db: Database,
    tenant_id: str,
    event: dict[str, Any],
    depth: int = 0,
    *,
    existing_ok: bool = False,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> Appended:
    """Validate and store one event with the trigger starts it owes (blocking; the async
    ``dispatch.append_and_dispatch`` also starts them). An id the tenant used before is a
    409, or with ``existing_ok`` the stored event (created False, nothing owed)."""
    values = event_values(tenant_id, event, depth)
    fire = values["event_type"] not in SYSTEM_EVENT_TYPES
    try:
        if fire and depth >= max_depth:
            return _append_cut(db, values, depth, max_depth)
        if db.engine.dialect.name == "postgresql":
            return _append_postgresql(db, values, fire, depth)
        return _append_portable(db, values, fire, depth)
    except IntegrityError as err:
        existing = find_event(db, tenant_id, values["id"]) if existing_ok else None
        if existing is None:
            raise EventError(
                409, "event_exists", f"an event with id {values['id']!r} already exists", param="id"
            ) from err
        return Appended(existing, False)


def append_event(
    db: Database,
    tenant_id: str,
    event: dict[str, Any],
    depth: int = 0,
    *,
    existing_ok: bool = False,
) -> tuple[dict[str, Any], bool]:
    """``append`` answering (stored event, created); starts it owes stay in the outbox for
    a sweeper (core/events/outbox.py)."""
    appended = append(db, tenant_id, event, depth, existing_ok=existing_ok)
    return appended.event, appended.created


def append_system_event(
    db: Database, tenant_id: str, event: dict[str, Any], depth: int
) -> dict[str, Any]:
    """An event chainloom itself records (trigger errors); it never fires triggers."""
    return append(db, tenant_id, event, depth).event
