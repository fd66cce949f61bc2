"""The trigger outbox: starting the trigger workflows appended events owe, until each starts.

An append records the starts it owes in ``trigger_outbox`` in its own transaction
(core/events/store.py), leased to the appending process for ``START_LEASE``. Then:

- the fast path (``TriggerDispatcher.start_owed``): the appending process starts them at once
  and deletes each entry whose workflow Temporal has (a workflow already started counts);
- a failed start stays, due again after a backoff (1, 2, 4 ... s, at most ``RETRY_MAX``);
- the sweeper (``TriggerDispatcher.sweep``, every ``CHAINLOOM_TRIGGER_SWEEP_INTERVAL`` seconds
  in every API process and worker) claims due entries, those retries and those a dead process
  left behind, and starts them the same way.

A start is never run twice: the workflow id derives from (tenant, event id, trigger) and is
started with REJECT_DUPLICATE, and claims keep two sweepers off the same entry.
"""

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import bindparam, delete, select, tuple_, update

from core.background import Flusher
from core.config import Settings
from core.db import Database
from core.events.store import append_system_event, event_json
from core.events.triggers import (
    DISPATCH_FAILED,
    START_LEASE,
    ClientSource,
    OwedStart,
    resolve_client,
    start_function,
    trigger_event,
    trigger_workflow_id,
)
from core.models import EventRow, TriggerOutboxRow, utcnow

log = logging.getLogger("chainloom.triggers")

# A failed start is due again after 1, 2, 4 ... seconds, at most RETRY_MAX apart.
RETRY_BASE = 1.0
RETRY_MAX = 60.0
# The failure that records a chainloom.trigger.dispatch_failed event (once per entry): one
# lost packet is retried quietly, an outage shows after a few seconds. Retries go on.
REPORT_AFTER = 3
# Entries one claim takes; a sweep claims again while claims come back full, up to
# SWEEP_BATCHES times, so a backlog after an outage drains in a few sweeps.
SWEEP_BATCH = 100
SWEEP_BATCHES = 10

_OUTBOX = TriggerOutboxRow.__table__  # type: ignore[attr-defined]
_KEY = (_OUTBOX.c.tenant_id, _OUTBOX.c.event_nid, _OUTBOX.c.trigger_name)

Status = Literal["started", "already_started", "failed", "event_deleted"]


@dataclass
class Outcome:
    """What became of one owed start."""

    owed: OwedStart
    status: Status
    workflow_id: str = ""
    error: str = ""


def retry_delay(attempts: int) -> timedelta:
    """How long after its `attempts`-th failed start an entry is due again."""
    return timedelta(seconds=min(RETRY_BASE * 2 ** max(attempts - 1, 0), RETRY_MAX))


# --- the table -------------------------------------------------------------------------------


def any_due(db: Database, now: datetime) -> bool:
    """A read (one index probe) before any write: an idle sweep never takes SQLite's lock."""
    with db.engine.connect() as conn:
        query = select(_OUTBOX.c.event_nid).where(_OUTBOX.c.due_at <= now).limit(1)
        return conn.execute(query).first() is not None


def claim_due(db: Database, now: datetime, limit: int = SWEEP_BATCH) -> list[OwedStart]:
    """Take up to `limit` due entries for this process by moving their due_at a lease ahead.

    PostgreSQL: SKIP LOCKED gives concurrent sweepers different rows, and the repeated
    ``due_at <= now`` is checked again against a row another sweeper claimed meanwhile.
    SQLite runs one writer at a time, so the UPDATE is atomic there anyway.
    """
    due = (
        select(*_KEY)
        .where(_OUTBOX.c.due_at <= now)
        .order_by(_OUTBOX.c.due_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    claim = (
        update(_OUTBOX)
        .where(tuple_(*_KEY).in_(due), _OUTBOX.c.due_at <= now)
        .values(due_at=now + START_LEASE)
        .returning(*_KEY, _OUTBOX.c.function_name, _OUTBOX.c.depth, _OUTBOX.c.attempts)
    )
    with db.engine.begin() as conn:
        rows = conn.execute(claim).all()
    return [OwedStart(*row) for row in rows]


def _key(owed: OwedStart) -> tuple[str, int]:
    return owed.tenant_id, owed.event_nid


def load_events(db: Database, owed: list[OwedStart]) -> dict[tuple[str, int], dict[str, Any]]:
    with db.session() as session:
        rows = [session.get(EventRow, _key(entry)) for entry in owed]
    return {(row.tenant_id, int(row.nid or 0)): event_json(row) for row in rows if row}


def remove(db: Database, owed: list[OwedStart]) -> None:
    statement = delete(_OUTBOX).where(
        _OUTBOX.c.tenant_id == bindparam("t"),
        _OUTBOX.c.event_nid == bindparam("n"),
        _OUTBOX.c.trigger_name == bindparam("g"),
    )
    rows = [{"t": o.tenant_id, "n": o.event_nid, "g": o.trigger} for o in owed]
    with db.engine.begin() as conn:
        conn.execute(statement, rows)


def record_failures(db: Database, failures: list[tuple[OwedStart, int, datetime, str]]) -> None:
    """(entry, attempts so far, next due time, error) for each failed start, in one go."""
    statement = (
        update(_OUTBOX)
        .where(
            _OUTBOX.c.tenant_id == bindparam("t"),
            _OUTBOX.c.event_nid == bindparam("n"),
            _OUTBOX.c.trigger_name == bindparam("g"),
        )
        .values(attempts=bindparam("a"), due_at=bindparam("d"), last_error=bindparam("e"))
    )
    rows = [
        {"t": o.tenant_id, "n": o.event_nid, "g": o.trigger, "a": a, "d": due, "e": error[:2000]}
        for o, a, due, error in failures
    ]
    with db.engine.begin() as conn:
        conn.execute(statement, rows)


# --- the dispatcher --------------------------------------------------------------------------


class TriggerDispatcher(Flusher):
    """Starts what the outbox owes: ``start_owed`` right after an append, ``sweep`` for the
    rest. ``start()`` runs the sweep every CHAINLOOM_TRIGGER_SWEEP_INTERVAL seconds (0 turns the
    sweeper off); ``client`` is a Temporal client or an async callable returning one, and may
    be swapped at any time."""

    def __init__(self, db: Database, client: ClientSource, settings: Settings) -> None:
        self.db = db
        self.client = client
        self.settings = settings
        self.INTERVAL = settings.trigger_sweep_interval

    def start(self) -> None:
        if self.INTERVAL > 0:
            super().start()

    async def flush(self) -> None:
        """Nothing is held in memory: whatever is owed is in the outbox."""

    async def tick(self) -> None:
        try:
            await self.sweep()
        except Exception:
            log.exception("trigger outbox sweep failed; trying again in %s s", self.INTERVAL)

    async def start_owed(self, event: dict[str, Any], owed: list[OwedStart]) -> list[Outcome]:
        """The fast path: start the workflows an append just recorded. Never raises (the
        append was answered already); what fails stays in the outbox for the sweeper."""
        try:
            return await self._start(owed, {_key(entry): event for entry in owed})
        except Exception:
            log.exception("starting the triggers of event %s failed", event.get("id"))
            return []

    async def sweep(self, limit: int = SWEEP_BATCH) -> list[Outcome]:
        """Claim due entries and start them; what became of each."""
        outcomes: list[Outcome] = []
        if not await asyncio.to_thread(any_due, self.db, utcnow()):
            return outcomes
        for _ in range(SWEEP_BATCHES):
            claimed = await asyncio.to_thread(claim_due, self.db, utcnow(), limit)
            if not claimed:
                break
            events = await asyncio.to_thread(load_events, self.db, claimed)
            # DELETE /events/type took the event: there is nothing left to hand the function.
            gone = [entry for entry in claimed if _key(entry) not in events]
            if gone:
                log.warning("dropping %d owed trigger starts of deleted events", len(gone))
                await asyncio.to_thread(remove, self.db, gone)
                outcomes += [Outcome(entry, "event_deleted") for entry in gone]
            owed = [entry for entry in claimed if _key(entry) in events]
            batch = await self._start(owed, events)
            outcomes += batch
            if len(claimed) < limit or all(o.status == "failed" for o in batch):
                # Temporal is down: the rest waits for its backoff, not for this sweep.
                break
        return outcomes

    async def _start(
        self, owed: list[OwedStart], events: dict[tuple[str, int], dict[str, Any]]
    ) -> list[Outcome]:
        if not owed:
            return []
        results: list[str | BaseException]
        try:
            temporal = await resolve_client(self.client)
        except Exception as err:
            results = [err] * len(owed)
        else:
            results = await asyncio.gather(
                *(
                    start_function(temporal, self.settings, entry, events[_key(entry)])
                    for entry in owed
                ),
                return_exceptions=True,
            )
        outcomes: list[Outcome] = []
        for entry, result in zip(owed, results, strict=True):
            event = events[_key(entry)]
            workflow_id = trigger_workflow_id(
                entry.tenant_id, entry.function, event["id"], entry.trigger
            )
            if isinstance(result, BaseException):
                error = f"{type(result).__name__}: {result}"
                outcomes.append(Outcome(entry, "failed", workflow_id, error))
            else:
                status: Status = "started" if result else "already_started"
                outcomes.append(Outcome(entry, status, workflow_id))
        done = [o.owed for o in outcomes if o.status != "failed"]
        if done:
            await asyncio.to_thread(remove, self.db, done)
        failed = [o for o in outcomes if o.status == "failed"]
        if failed:
            await self._failed(failed, events)
        return outcomes

    async def _failed(
        self, failed: list[Outcome], events: dict[tuple[str, int], dict[str, Any]]
    ) -> None:
        now, updates = utcnow(), []
        for outcome in failed:
            owed, attempts = outcome.owed, outcome.owed.attempts + 1
            delay = retry_delay(attempts)
            log.warning(
                "trigger %r could not start function %r for event %s (attempt %d; next in "
                "%.0f s): %s",
                owed.trigger,
                owed.function,
                events[_key(owed)]["id"],
                attempts,
                delay.total_seconds(),
                outcome.error,
            )
            message = f"could not start function {owed.function!r}: {outcome.error}"
            updates.append((owed, attempts, now + delay, message))
        await asyncio.to_thread(record_failures, self.db, updates)
        for owed, attempts, _, message in updates:
            if attempts != REPORT_AFTER:
                continue
            event = events[_key(owed)]
            record = trigger_event(
                DISPATCH_FAILED,
                owed.trigger,
                owed.function,
                event,
                owed.depth,
                message,
                attempts=attempts,
                retrying=True,
                retry_max_seconds=RETRY_MAX,
            )
            try:
                await asyncio.to_thread(
                    append_system_event, self.db, owed.tenant_id, record, owed.depth
                )
            except Exception:
                log.exception("could not record %s for event %s", DISPATCH_FAILED, event["id"])
