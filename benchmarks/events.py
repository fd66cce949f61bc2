"""Event store benchmark: queries over 1M events, append throughput, append -> trigger latency.

Everything happens in a scratch PostgreSQL database created for the run and dropped at the
end (nothing is written to the repository):

1. Load N events (default 1,000,000) with COPY: 50 event types with Zipf-like frequencies,
   20 sources, 100k aggregates over 10 aggregate types, created_at spread over 30 days,
   10% of the rows in a second tenant. Then VACUUM ANALYZE.
2. Time every query the API runs (the same ``core.events.store`` functions the routes call, so the
   figures include SQLAlchemy and JSON shaping): median and p90 of R rounds after 2 warm-up
   rounds, and ``EXPLAIN (ANALYZE, BUFFERS)`` of the exact SQL, to show which index serves it.
3. Append throughput into the 1M-row table: sequential, sequential into a type that has a
   trigger (each append also writes a trigger-outbox entry), 4 threads of one tenant (appends
   of a tenant take turns, see ``core.events.store.next_nid``) and 4 threads of 4 tenants.
   SQLite (a temporary file) for comparison. With ``--baseline REV`` the same appends are also
   measured with the code of git revision REV (exported to a temporary directory, run in a
   process of its own against a scratch database loaded the same way), alternating rounds of
   before and after, so both sides see the same machine at the same time.
4. Append -> trigger: an event whose type has a trigger, appended with
   ``append_and_dispatch``; time until the FunctionWorkflow start is acknowledged by Temporal
   (the dev server with raised poll rates), the API's return time (background dispatch), and a
   burst of concurrent appends. No worker runs the functions: this measures dispatch only.

Run it without pytest::

    python -m benchmarks.events [--events 1000000] [--rounds 20] [--json results.json]
                                [--baseline REV [--compare-rounds 5]] [--appends-only]

``make bench`` runs it as ``tests/test_events.py::test_event_store_benchmark``.
"""

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import Engine

from core.config import Settings
from core.db import Database
from core.devserver import free_port, start_dev_server, stop_process
from core.events.dispatch import append_and_dispatch, wait_for_background_dispatches
from core.events.queries import (
    EventQuery,
    delete_events_by_type,
    delete_statement,
    event_types,
    event_types_statement,
    events_after,
    events_after_statement,
    events_by_aggregate,
    events_by_source,
    events_by_type,
    latest_nid,
    latest_nid_statement,
)
from core.events.store import append_event
from core.events.triggers import trigger_workflow_id
from core.models import EventRow, EventTriggerRow, FunctionRow
from core.temporal import connect, ensure_search_attributes
from workflows.types import FunctionRunInput

PG_ADMIN = os.environ.get("CHAINLOOM_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
TENANT = "default"
TYPES = [f"type.{i:02d}" for i in range(50)]
SOURCES = [f"source.{i:02d}" for i in range(20)]
AGGREGATE_TYPES = [f"agg.{i}" for i in range(10)]
AGGREGATES = 100_000
SPAN = timedelta(days=30)
TRIGGER_TYPE = "bench.ping"


# --- set-up --------------------------------------------------------------------------------


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    """A PostgreSQL database of our own (SQLAlchemy URL), dropped at the end."""
    name = "chainloom_bench_" + uuid.uuid4().hex[:10]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    server = PG_ADMIN.split("://", 1)[1].rsplit("/", 1)[0]
    try:
        yield f"postgresql+psycopg://{server}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def load_events(url: str, count: int, seed: int = 7) -> dict[str, float]:
    """COPY `count` events in; nid order follows created_at as it does in real life, and each
    tenant's nids count on their own (core.events.store.next_nid), as appends number them."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(len(TYPES))]
    types = rng.choices(TYPES, weights, k=count)
    end = datetime.now(UTC) - timedelta(minutes=1)
    start, step = end - SPAN, SPAN / count
    began = time.perf_counter()
    columns = (
        "tenant_id, nid, id, event_type, event_source, aggregate_type, aggregate_id, version, "
        "data, metadata, created_at"
    )
    nids: dict[str, int] = {}
    with psycopg.connect(_dsn(url)) as conn:
        with conn.cursor() as cur, cur.copy(f"COPY event ({columns}) FROM STDIN") as copy:
            for i in range(count):
                aggregate = rng.randrange(AGGREGATES)
                tenant = "other" if i % 10 == 9 else TENANT
                nids[tenant] = nids.get(tenant, 0) + 1
                copy.write_row(
                    (
                        tenant,
                        nids[tenant],
                        str(uuid.UUID(int=rng.getrandbits(128), version=4)),
                        types[i],
                        SOURCES[rng.randrange(len(SOURCES))],
                        AGGREGATE_TYPES[aggregate % len(AGGREGATE_TYPES)],
                        f"a-{aggregate}",
                        1 + i % 5,
                        f'{{"i": {i}, "amount": {rng.randrange(10_000) / 100}}}',
                        '{"chainloom_depth": 0}',
                        start + step * i,
                    )
                )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO event_sequence (tenant_id, name, last_nid) VALUES (%s, 'event', %s)",
                list(nids.items()),
            )
        conn.commit()
    loaded = time.perf_counter() - began
    with psycopg.connect(_dsn(url), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE event")
        size = conn.execute("SELECT pg_total_relation_size('event')").fetchone()
    return {
        "events": count,
        "load_seconds": round(loaded, 1),
        "rows_per_second": round(count / loaded),
        "vacuum_analyze_seconds": round(time.perf_counter() - began - loaded, 1),
        "table_and_indexes_mb": round((size[0] if size else 0) / 2**20),
    }


# --- measuring -----------------------------------------------------------------------------


def _stats(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 2),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 2),
        "min_ms": round(ordered[0] * 1000, 2),
    }


def timed(call: Callable[[int], Any], rounds: int, warmup: int = 2) -> dict[str, Any]:
    for i in range(warmup):
        call(i)
    samples = []
    for i in range(rounds):
        began = time.perf_counter()
        result = call(warmup + i)
        samples.append(time.perf_counter() - began)
    out: dict[str, Any] = _stats(samples)
    out["rows"] = result if isinstance(result, int) else len(result)
    return out


def explain(engine: Engine, statement: Any, params: dict[str, Any] | None = None) -> str:
    """EXPLAIN ANALYZE of the SQL exactly as SQLAlchemy sends it, rolled back afterwards."""
    compiled = statement.compile(dialect=engine.dialect)
    values = {**compiled.params, **(params or {})}
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) " + str(compiled), values
        ).all()
        conn.rollback()  # EXPLAIN ANALYZE of a DELETE deletes
    return "\n".join(row[0] for row in rows)


def uses_index(plan: str) -> bool:
    return "Seq Scan" not in plan and "Index" in plan


def bench_queries(db: Database, rounds: int) -> dict[str, dict[str, Any]]:
    now = datetime.now(UTC)
    hour_ago_10d = now - timedelta(days=10)
    newest = latest_nid(db, TENANT)
    tail = newest - 2000
    cases: list[tuple[str, Callable[[int], Any], Any, dict[str, Any] | None]] = [
        (
            "type, newest 100 (most common type, ~22% of rows)",
            lambda _: events_by_type(db, TENANT, "type.00", limit=100),
            EventQuery(TENANT, event_type="type.00").statement(),
            None,
        ),
        (
            "type, newest 100 (rarest type, ~0.4%), last 7 days",
            lambda _: events_by_type(db, TENANT, "type.49", now - timedelta(days=7), limit=100),
            EventQuery(TENANT, event_type="type.49", start=now - timedelta(days=7)).statement(),
            None,
        ),
        (
            "type, 1-hour window 10 days ago",
            lambda _: events_by_type(
                db, TENANT, "type.03", hour_ago_10d - timedelta(hours=1), hour_ago_10d
            ),
            EventQuery(
                TENANT,
                event_type="type.03",
                start=hour_ago_10d - timedelta(hours=1),
                end=hour_ago_10d,
            ).statement(),
            None,
        ),
        (
            "source, newest 100",
            lambda _: events_by_source(db, TENANT, "source.03", limit=100),
            EventQuery(TENANT, event_source="source.03").statement(),
            None,
        ),
        (
            "source + type, newest 100",
            lambda _: events_by_source(db, TENANT, "source.03", "type.05", limit=100),
            EventQuery(TENANT, event_source="source.03", event_type="type.05").statement(),
            None,
        ),
        (
            "aggregate (type, id), all its events",
            lambda i: events_by_aggregate(db, TENANT, "agg.3", f"a-{1003 + 10 * i}"),
            EventQuery(TENANT, aggregate_type="agg.3", aggregate_id="a-1003").statement(),
            None,
        ),
        (
            "distinct types, all time",
            lambda _: event_types(db, TENANT, limit=1000),
            event_types_statement(None, None),
            {"tenant": TENANT, "limit": 1000},
        ),
        (
            "distinct types, last 24 h",
            lambda _: event_types(db, TENANT, now - timedelta(days=1), limit=1000),
            event_types_statement(now - timedelta(days=1), None),
            {"tenant": TENANT, "limit": 1000, "start": now - timedelta(days=1)},
        ),
        (
            "stream poll at the tail (nid > last seen)",
            lambda _: events_after(db, TENANT, "type.00", tail),
            events_after_statement(TENANT, "type.00", tail),
            None,
        ),
        (
            "stream poll, nothing new (the idle case)",
            lambda _: events_after(db, TENANT, "type.00", newest),
            events_after_statement(TENANT, "type.00", newest),
            None,
        ),
        (
            "stream start (max nid)",
            lambda _: [latest_nid(db, TENANT)],
            latest_nid_statement(TENANT),
            None,
        ),
        (
            "delete a type in a 1-hour window (each round its own hour)",
            lambda i: delete_events_by_type(
                db,
                TENANT,
                "type.10",
                now - timedelta(days=20, hours=i + 1),
                now - timedelta(days=20, hours=i),
            ),
            delete_statement(
                TENANT, "type.10", now - timedelta(days=25, hours=1), now - timedelta(days=25)
            ),
            None,
        ),
    ]
    results: dict[str, dict[str, Any]] = {}
    for name, call, statement, params in cases:
        row = timed(call, rounds)
        plan = explain(db.engine, statement, params)
        row["plan"] = plan
        row["uses_index"] = uses_index(plan)
        found = re.search(r"Execution Time: ([\d.]+) ms", plan)
        row["database_ms"] = float(found.group(1)) if found else None
        results[name] = row
        print(f"  {name}: {row['median_ms']} ms (p90 {row['p90_ms']}), {row['rows']} rows")
    return results


def bench_appends(
    db: Database, total: int, threads: int, tenants: int, event_type: str = "bench.append"
) -> dict[str, Any]:
    per = total // threads
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            for i in range(per):
                append_event(
                    db,
                    f"bench-{k % tenants}" if tenants > 1 else TENANT,
                    {
                        "event_type": event_type,
                        "event_source": "bench",
                        "aggregate_type": "bench",
                        "aggregate_id": f"{k}-{i}",
                        "data": {"i": i, "payload": "x" * 64},
                    },
                )
        except BaseException as err:  # surfaced below
            errors.append(err)

    began = time.perf_counter()
    if threads == 1:
        work(0)
    else:
        pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    done = per * threads
    return {
        "events": done,
        "threads": threads,
        "tenants": tenants,
        "seconds": round(elapsed, 2),
        "events_per_second": round(done / elapsed),
        "mean_ms": round(elapsed / per * 1000, 2),
    }


async def bench_triggers(url: str, temporal_address: str, rounds: int) -> dict[str, Any]:
    settings = Settings(
        DATABASE_URL=url,
        TEMPORAL_ADDRESS=temporal_address,
        CHAINLOOM_TASK_QUEUE="bench-events-" + uuid.uuid4().hex[:8],
    )
    db = Database(url)
    with db.session() as session:
        session.add(FunctionRow(tenant_id=TENANT, name="bench_fn", script="function main(){}"))
        session.add(
            EventTriggerRow(
                tenant_id=TENANT,
                name="bench_trigger",
                listen_for_type=TRIGGER_TYPE,
                function_name="bench_fn",
            )
        )
        session.commit()
    client = await connect(settings)
    await ensure_search_attributes(client)
    started: list[str] = []

    def event(i: int) -> dict[str, Any]:
        return {"event_type": TRIGGER_TYPE, "aggregate_id": str(i), "data": {"i": i}}

    # Temporal alone: a bare start of the same workflow, no database.
    bare: list[float] = []
    for _ in range(rounds + 3):
        workflow_id = f"fn-bench_fn-bare-{uuid.uuid4()}"
        began = time.perf_counter()
        await client.start_workflow(
            "FunctionWorkflow",
            FunctionRunInput(tenant_id=TENANT, function="bench_fn", workflow_id=workflow_id),
            id=workflow_id,
            task_queue=settings.task_queue,
        )
        bare.append(time.perf_counter() - began)
        started.append(workflow_id)

    # The activity path (sendEvent): append, then wait for the start to be acknowledged.
    awaited: list[float] = []
    for i in range(rounds + 3):
        began = time.perf_counter()
        await append_and_dispatch(db, client, settings, TENANT, event(i))
        awaited.append(time.perf_counter() - began)

    # The API path: the append answers after the commit; the start follows in the background.
    answered: list[float] = []
    for i in range(rounds + 3):
        began = time.perf_counter()
        await append_and_dispatch(db, client, settings, TENANT, event(i), background=True)
        answered.append(time.perf_counter() - began)
        await wait_for_background_dispatches()

    # A burst: many appends at once, each starting its trigger's workflow.
    burst = 200
    began = time.perf_counter()
    await asyncio.gather(
        *(append_and_dispatch(db, client, settings, TENANT, event(i)) for i in range(burst))
    )
    burst_seconds = time.perf_counter() - began

    # Leave nothing running on a shared server.
    with db.session() as session:
        from sqlmodel import col, select

        ids = session.exec(
            select(EventRow.id).where(col(EventRow.event_type) == TRIGGER_TYPE)
        ).all()
    started += [
        trigger_workflow_id(TENANT, "bench_fn", event_id, "bench_trigger") for event_id in ids
    ]
    for chunk in range(0, len(started), 50):
        await asyncio.gather(
            *(
                client.get_workflow_handle(wid).terminate("benchmark over")
                for wid in started[chunk : chunk + 50]
            ),
            return_exceptions=True,
        )
    db.dispose()
    return {
        "bare_start_workflow": _stats(bare[3:]),
        "append_and_start_awaited": _stats(awaited[3:]),
        "append_answered_background": _stats(answered[3:]),
        "burst": {
            "events": burst,
            "seconds": round(burst_seconds, 2),
            "triggered_starts_per_second": round(burst / burst_seconds),
        },
    }


# --- before and after ----------------------------------------------------------------------

# The appends compared with --baseline: name -> (events, threads, tenants).
APPEND_CASES = {
    "postgres, sequential": (2000, 1, 1),
    "postgres, 4 threads, one tenant": (4000, 4, 1),
    "postgres, 4 threads, 4 tenants": (4000, 4, 4),
}
OWED_TYPE = "bench.owed"

# Runs in the exported baseline revision: loads its own scratch database with its own loader,
# then measures bench_appends(*line) for each JSON line on stdin.
_BASELINE_CHILD = """
import json, sys
from benchmarks.events import bench_appends, load_events, scratch_database
from core.db import Database
with scratch_database() as url:
    db = Database(url)
    db.migrate()
    load_events(url, int(sys.argv[1]))
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(bench_appends(db, *json.loads(line))), flush=True)
    db.dispose()
"""


@contextlib.contextmanager
def baseline_process(rev: str, events: int) -> Iterator[subprocess.Popen[str]]:
    """The append benchmark of git revision `rev`, in a process of its own."""
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="chainloom-baseline-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", rev], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        proc = subprocess.Popen(
            [sys.executable, "-c", _BASELINE_CHILD, str(events)],
            cwd=tmp,
            env={**os.environ, "PYTHONPATH": tmp},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the benchmark of {rev} did not start")
            yield proc
        finally:
            proc.stdin.close()
            proc.wait(120)


def compare_appends(db: Database, rev: str, events: int, rounds: int) -> dict[str, Any]:
    """Appends with `rev`'s code and with this tree's, in alternating rounds."""
    samples: dict[str, dict[str, list[int]]] = {
        name: {"before": [], "after": []} for name in APPEND_CASES
    }
    print(f"appends, {rev} (before) against this tree (after), {rounds} alternating rounds:")
    with baseline_process(rev, events) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        for number in range(rounds):
            for name, case in APPEND_CASES.items():
                order = ["before", "after"] if number % 2 == 0 else ["after", "before"]
                for side in order:
                    if side == "before":
                        proc.stdin.write(json.dumps(case) + "\n")
                        proc.stdin.flush()
                        row = json.loads(proc.stdout.readline())
                    else:
                        row = bench_appends(db, *case)
                    samples[name][side].append(row["events_per_second"])
                print(f"  round {number + 1}, {name}: {samples[name]}")
    return {
        name: {
            "before_median": round(statistics.median(sides["before"])),
            "after_median": round(statistics.median(sides["after"])),
            # Each round's two sides ran back to back, so their ratio is steadier than either
            # figure on a shared machine.
            "ratio_median": round(
                statistics.median(
                    a / b for a, b in zip(sides["after"], sides["before"], strict=True)
                ),
                2,
            ),
            **sides,
        }
        for name, sides in samples.items()
    }


def _owing_trigger(db: Database) -> None:
    """A trigger on OWED_TYPE, so appends of that type each write an outbox entry."""
    with db.session() as session:
        session.add(FunctionRow(tenant_id=TENANT, name="owed_fn", script="function main(){}"))
        session.add(
            EventTriggerRow(
                tenant_id=TENANT,
                name="owed_trigger",
                listen_for_type=OWED_TYPE,
                function_name="owed_fn",
            )
        )
        session.commit()


# --- the run -------------------------------------------------------------------------------


def run(
    events: int = 1_000_000,
    rounds: int = 20,
    temporal_address: str | None = None,
    json_path: Path | None = None,
    triggers: bool = True,
    baseline: str | None = None,
    compare_rounds: int = 5,
    queries: bool = True,
) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"}
    with scratch_database() as url:
        db = Database(url)
        db.migrate()
        print(f"loading {events:,} events ...")
        results["load"] = load_events(url, events)
        print(f"  {results['load']}")
        if queries:
            print("queries:")
            results["queries"] = bench_queries(db, rounds)
        print("appends:")
        _owing_trigger(db)
        results["appends"] = {
            "postgres, sequential": bench_appends(db, 2000, 1, 1),
            "postgres, sequential, type with a trigger (+ outbox entry)": bench_appends(
                db, 2000, 1, 1, OWED_TYPE
            ),
            "postgres, 4 threads, one tenant": bench_appends(db, 4000, 4, 1),
            "postgres, 4 threads, 4 tenants": bench_appends(db, 4000, 4, 4),
        }
        with tempfile.TemporaryDirectory() as tmp:
            lite = Database(f"sqlite:///{tmp}/bench.db")
            lite.migrate()
            results["appends"]["sqlite, sequential"] = bench_appends(lite, 2000, 1, 1)
            results["appends"]["sqlite, 4 threads"] = bench_appends(lite, 4000, 4, 1)
            lite.dispose()
        for name, row in results["appends"].items():
            print(f"  {name}: {row['events_per_second']} events/s")
        if baseline:
            results["baseline"] = baseline
            results["appends_compared"] = compare_appends(db, baseline, events, compare_rounds)
        if triggers:
            print("append -> trigger:")
            proc = None
            if temporal_address is None:
                port = free_port()
                proc = start_dev_server(None, port)
                temporal_address = f"127.0.0.1:{port}"
            try:
                results["triggers"] = asyncio.run(bench_triggers(url, temporal_address, rounds))
            finally:
                if proc is not None:
                    stop_process(proc)
            print(f"  {json.dumps(results['triggers'])}")
        db.dispose()
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))
    print(report(results))
    return results


def report(results: dict[str, Any]) -> str:
    lines = [
        f"machine: {results['machine']}; load: {results['load']}",
        "",
        "| query | median ms | p90 ms | in the database ms | rows | index |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results.get("queries", {}).items():
        index = _index_names(row["plan"])
        lines.append(
            f"| {name} | {row['median_ms']} | {row['p90_ms']} | {row['database_ms']} "
            f"| {row['rows']} | {index} |"
        )
    lines += ["", "| appends | events/s | mean ms per append (per thread) |", "|---|---|---|"]
    for name, row in results["appends"].items():
        lines.append(f"| {name} | {row['events_per_second']} | {row['mean_ms']} |")
    if "appends_compared" in results:
        lines += [
            "",
            f"| appends, events/s (median of rounds) | before ({results['baseline']}) | after "
            "| after/before (median of rounds) | rounds before | rounds after |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in results["appends_compared"].items():
            lines.append(
                f"| {name} | {row['before_median']} | {row['after_median']} "
                f"| {row['ratio_median']} | {row['before']} | {row['after']} |"
            )
    if "triggers" in results:
        lines += ["", json.dumps(results["triggers"], indent=2)]
    return "\n".join(lines)


def _index_names(plan: str) -> str:
    names: list[str] = []
    for found in re.findall(
        r"(?:Index(?: Only)? Scan(?: Backward)?|Bitmap Index Scan) "
        r"(?:using|on) (\w+)",
        plan,
    ):
        if found not in names:
            names.append(found)
    return ", ".join(names) or "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--temporal", default=None, help="address of a running Temporal")
    parser.add_argument("--no-triggers", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="REV",
        help="also measure appends with the code of this git revision, alternating rounds",
    )
    parser.add_argument("--compare-rounds", type=int, default=5)
    parser.add_argument(
        "--appends-only", action="store_true", help="skip the queries and the trigger part"
    )
    args = parser.parse_args()
    run(
        args.events,
        args.rounds,
        args.temporal,
        args.json,
        not args.no_triggers and not args.appends_only,
        args.baseline,
        args.compare_rounds,
        not args.appends_only,
    )


if __name__ == "__main__":
    main()
