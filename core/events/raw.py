"""Raw events: payloads received on /ingest, kept so they can be mapped and replayed."""

import asyncio
import json
from typing import Any

from pydantic import BaseModel
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from core.config import Settings
from core.db import Database
from core.events.dispatch import append_and_dispatch
from core.events.mappings import MAPPINGS, MappingConfig, apply_mapping, load_mapping
from core.events.outbox import TriggerDispatcher
from core.events.queries import required
from core.events.store import (
    _SECRET_HEADERS,
    MAX_NID,
    RAW_EVENT_SEQUENCE,
    EventError,
    _text_field,
    json_value,
    next_nid,
    parse_limit,
    parse_time,
    time_range,
)
from core.events.triggers import ClientSource
from core.models import RawEventRow, as_utc, new_id, rfc3339, utcnow

# --- raw events ------------------------------------------------------------------------------


class RawEvent(BaseModel):
    """seed 003 eventstore.RawEvent: a payload received on /ingest, as kept."""

    id: str
    nid: int
    path: str
    headers: dict[str, Any]
    payload: Any
    received_at: str


def raw_json(row: RawEventRow) -> dict[str, Any]:
    return RawEvent(
        id=row.id,
        nid=int(row.nid or 0),
        path=row.path,
        headers=row.headers or {},
        payload=row.payload,
        received_at=rfc3339(row.received_at),
    ).model_dump(mode="json")


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
    values = row.model_dump()
    try:
        with db.engine.begin() as conn:
            # Numbered per tenant, like events (core/events/store.next_nid).
            row.nid = values["nid"] = next_nid(conn, tenant_id, RAW_EVENT_SEQUENCE)
            conn.execute(insert(RawEventRow.__table__).values(**values))  # type: ignore[attr-defined]
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
        row = session.get(RawEventRow, (tenant_id, number))
    if (
        row is None
        or (lo is not None and as_utc(row.received_at) < lo)
        or (hi is not None and as_utc(row.received_at) > hi)
    ):
        raise EventError(404, "not_found", f"raw event {number} not found")
    return raw_json(row)


# --- ingest and replay -----------------------------------------------------------------------


async def ingest(
    db: Database,
    client: ClientSource | TriggerDispatcher,
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
    client: ClientSource | TriggerDispatcher,
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
    client: ClientSource | TriggerDispatcher,
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
