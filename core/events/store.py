"""The event store (seed 003 eventstore): validating and appending events.

Queries live in core/events/queries.py, raw events and /ingest in raw.py, mappings in
mappings.py, triggers in triggers.py; ``dispatch.append_and_dispatch`` is the one door through
which events that may fire triggers come in (POST /events, /ingest, /replay and the JS
``sendEvent`` builtin).
"""

import json
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select
from temporalio.client import Client

from core.db import Database
from core.models import EventRow, new_id, rfc3339, utcnow

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
