"""Reads of the event store.

Every query filters on the tenant first and on one of the indexes declared on EventRow, so a
query over a million events reads a few index pages rather than the table.
"""

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import DateTime, bindparam, delete, func, text
from sqlmodel import col, select
from sqlmodel.sql.expression import SelectOfScalar

from core.db import Database
from core.events.store import DEFAULT_LIMIT, EventError, event_json, parse_limit, time_range
from core.models import EventRow

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


def _find(
    db: Database, tenant_id: str, start: Any, end: Any, limit: Any, order: str | None, **match: Any
) -> list[dict[str, Any]]:
    lo, hi = time_range(start, end)
    query = EventQuery(
        tenant_id, start=lo, end=hi, limit=parse_limit(limit), order=_order(order), **match
    )
    return find_events(db, query)


def events_by_type(
    db: Database,
    tenant_id: str,
    event_type: str | None,
    start: Any = None,
    end: Any = None,
    limit: Any = None,
    order: str | None = None,
) -> list[dict[str, Any]]:
    return _find(
        db, tenant_id, start, end, limit, order, event_type=required(event_type, "event_type")
    )


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
    source = required(event_source, "event_source")
    return _find(
        db, tenant_id, start, end, limit, order, event_source=source, event_type=event_type or None
    )


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
    return _find(
        db,
        tenant_id,
        start,
        end,
        limit,
        order,
        aggregate_type=required(aggregate_type, "aggregate_type"),
        aggregate_id=required(aggregate_id, "aggregate_id"),
        event_type=event_type or None,
    )


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


def latest_nid_statement(tenant_id: str) -> SelectOfScalar[Any]:
    return select(func.max(EventRow.nid)).where(EventRow.tenant_id == tenant_id)


def latest_nid(db: Database, tenant_id: str) -> int:
    """Where a new stream starts: after every event of the tenant stored so far (one probe of
    the primary key, which leads with the tenant)."""
    with db.session() as session:
        value = session.exec(latest_nid_statement(tenant_id)).one()
    return int(value or 0)


def events_after(
    db: Database, tenant_id: str, event_type: str, after_nid: int, limit: int = 200
) -> list[dict[str, Any]]:
    """A tenant's events of a type with nid > after_nid, oldest first."""
    with db.session() as session:
        rows = session.exec(events_after_statement(tenant_id, event_type, after_nid, limit)).all()
    return [event_json(row) for row in rows]


def events_after_statement(
    tenant_id: str, event_type: str, after_nid: int, limit: int = 200
) -> SelectOfScalar[EventRow]:
    # Streams sit at the tail, so this walks the primary key (tenant_id, nid) from after_nid: it
    # reads only what the tenant appended since the last poll, whatever the size of the table.
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
