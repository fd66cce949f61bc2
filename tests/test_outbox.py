"""The trigger outbox (core/events/outbox.py) with a real Temporal, a real worker and both
databases: a start that fails is retried until it starts and the function runs once; an entry
left by a process that died between its append and the start is started by a sweeper once its
lease ends; two sweepers in two processes never take the same entry."""

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlmodel import col, select, update
from temporalio.client import Client
from temporalio.service import RPCError

from core.db import Database
from core.events import store
from core.events.outbox import REPORT_AFTER, TriggerDispatcher
from core.events.triggers import DISPATCH_FAILED
from core.models import (
    EventTriggerRow,
    FunctionRow,
    TriggerOutboxRow,
    as_utc,
    rfc3339,
    utcnow,
)
from core.temporal import connect, ensure_search_attributes
from tests.stack import Stack
from tests.test_ops import wait_for
from tests.test_triggers import wait_for_event

REPO = Path(__file__).resolve().parent.parent


def uniq(prefix: str) -> str:
    return f"{prefix}.{uuid.uuid4().hex[:8]}"


def function_and_trigger(stack: Stack, marker: str) -> str:
    """A function that records `marker` each time it runs, and a trigger for it; the event
    type the trigger listens for."""
    name = f"fn_{uuid.uuid4().hex[:8]}"
    script = f'function main(event) {{ sendEvent("{marker}", {{of: event.id}}); return "ok"; }}'
    resp = stack.http.post("/functions", json={"name": name, "script": script})
    assert resp.status_code == 201, resp.text
    kind = uniq("paid")
    body = {"name": uniq("on-paid"), "listenFor": {"type": kind}, "function": name}
    resp = stack.http.post("/event-triggers", json=body)
    assert resp.status_code == 201, resp.text
    return kind


def runs(stack: Stack, marker: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = stack.http.get(
        "/events/type", params={"event_type": marker}
    ).json()
    return found


def owed(db: Database, tenant: str, nid: int) -> list[TriggerOutboxRow]:
    query = select(TriggerOutboxRow).where(
        TriggerOutboxRow.tenant_id == tenant, TriggerOutboxRow.event_nid == nid
    )
    with db.session() as session:
        return list(session.exec(query).all())


def expire_leases(db: Database) -> None:
    """What time does to a dead process's entries: their lease runs out."""
    with db.session() as session:
        session.execute(update(TriggerOutboxRow).values(due_at=utcnow() - timedelta(seconds=1)))
        session.commit()


def api_triggers(stack: Stack) -> TriggerDispatcher:
    """The API process's dispatcher (the stack runs the API in this process)."""
    dispatcher: TriggerDispatcher = stack.api.server.config.app.state.chainloom.triggers
    return dispatcher


def test_a_failed_start_is_retried_until_it_starts_and_runs_once(
    stack: Stack, db: Database
) -> None:
    marker, tenant = uniq("ran"), stack.settings.default_tenant
    kind = function_and_trigger(stack, marker)
    dispatcher = api_triggers(stack)
    working = dispatcher.client

    async def unreachable() -> Client:
        raise RuntimeError("cannot reach Temporal at nowhere:7233")

    dispatcher.client = unreachable
    try:
        resp = stack.http.post("/events", json={"event_type": kind})
        assert resp.status_code == 201, resp.text  # the append does not depend on Temporal
        event = resp.json()
        # the start right after the append failed, then the sweeper's retries (1 s, 2 s later)
        failure = wait_for_event(stack, DISPATCH_FAILED, event["id"], timeout=30)
        assert failure["data"]["attempts"] == REPORT_AFTER and failure["data"]["retrying"]
        assert "cannot reach Temporal" in failure["data"]["error"]
        [entry] = owed(db, tenant, event["nid"])
        assert entry.attempts >= REPORT_AFTER and "cannot reach Temporal" in entry.last_error
        assert runs(stack, marker) == []
    finally:
        dispatcher.client = working

    wait_for(lambda: len(runs(stack, marker)) > 0, 60, "the function ran once Temporal was back")
    wait_for(lambda: not owed(db, tenant, event["nid"]), 10, "the entry was removed")
    time.sleep(1.5)  # a second start would have run by now
    assert [e["data"] for e in runs(stack, marker)] == [{"of": event["id"]}]
    # reported once, however often it failed
    assert wait_for_event(stack, DISPATCH_FAILED, event["id"]) == failure


def test_an_entry_left_by_a_dead_process_is_started_by_a_sweeper(
    stack: Stack, db: Database
) -> None:
    marker, tenant = uniq("ran"), stack.settings.default_tenant
    kind = function_and_trigger(stack, marker)
    # As a process that died right after its commit leaves it: the event and the start it
    # owes are stored, and no dispatcher started anything. (A created_at from the client's
    # clock, nine minutes back, has no say in the lease.)
    written = rfc3339(utcnow() - timedelta(minutes=9))
    event, _ = store.append_event(db, tenant, {"event_type": kind, "created_at": written})
    [entry] = owed(db, tenant, event["nid"])
    assert entry.attempts == 0 and as_utc(entry.due_at) > utcnow()
    # Leased to the appending process: sweeps pass it by until the lease ends.
    time.sleep(2.5)
    assert [e.attempts for e in owed(db, tenant, event["nid"])] == [0]
    assert runs(stack, marker) == []

    expire_leases(db)
    wait_for(lambda: len(runs(stack, marker)) > 0, 60, "a sweeper started the function")
    wait_for(lambda: not owed(db, tenant, event["nid"]), 10, "the entry was removed")
    time.sleep(1.5)
    assert [e["data"] for e in runs(stack, marker)] == [{"of": event["id"]}]


async def test_concurrent_sweepers_in_two_processes_never_start_a_trigger_twice(
    fresh_database_url: str, temporal_address: str
) -> None:
    # A database of its own: the stack's API sweeps the shared one and would take entries too.
    settings = Stack.settings_for(temporal_address, fresh_database_url)
    tenant, kind = settings.default_tenant, uniq("paid")
    db = Database(fresh_database_url)
    with db.session() as session:
        session.add(FunctionRow(tenant_id=tenant, name="fn", script="function main(){}"))
        for name in ("first", "second"):
            session.add(
                EventTriggerRow(
                    tenant_id=tenant, name=name, listen_for_type=kind, function_name="fn"
                )
            )
        session.commit()
    events = [store.append_event(db, tenant, {"event_type": kind})[0] for _ in range(30)]
    expected = {(e["nid"], name) for e in events for name in ("first", "second")}
    expire_leases(db)
    client = await connect(settings)
    await ensure_search_attributes(client)

    env = {**os.environ, **Stack.env_for(settings)}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.outbox_sweeper",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    reports: list[list[dict[str, Any]]] = []
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"ready"
        for proc in procs:  # both start sweeping at once
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        await asyncio.gather(*(proc.stdin.drain() for proc in procs if proc.stdin))
        for proc in procs:
            assert proc.stdout is not None
            reports.append(json.loads(await asyncio.wait_for(proc.stdout.readline(), 120)))
    finally:
        for proc in procs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 30)
            if proc.returncode is None:
                proc.kill()

    try:
        taken = [{(r["nid"], r["trigger"]) for r in report} for report in reports]
        assert all(taken), "both sweepers should have taken part"
        assert not taken[0] & taken[1], "an entry was taken by both sweepers"
        assert taken[0] | taken[1] == expected
        assert sum(len(report) for report in reports) == len(expected)
        assert {r["status"] for report in reports for r in report} == {"started"}
        with db.session() as session:
            assert session.exec(select(col(TriggerOutboxRow.event_nid))).all() == []
    finally:
        # No worker polls this task queue; leave nothing running on the shared server.
        for report in reports:
            for r in report:
                with contextlib.suppress(RPCError):
                    await client.get_workflow_handle(r["id"]).terminate("test over")
        db.dispose()
