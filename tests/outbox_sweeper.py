"""A trigger-outbox sweeper in a process of its own, for tests/test_outbox.py.

Settings come from the environment (DATABASE_URL, TEMPORAL_ADDRESS, CHAINLOOM_TASK_QUEUE).
It connects, prints "ready", waits for a line on stdin (so two of them start together), sweeps
in claims of 5 until nothing is due, and prints what became of each entry it took as JSON.
"""

import asyncio
import json
import sys

from core.config import Settings
from core.db import Database
from core.events.outbox import TriggerDispatcher
from core.temporal import connect


async def main() -> None:
    settings = Settings()
    db = Database(settings.resolved_database_url())
    client = await connect(settings)
    dispatcher = TriggerDispatcher(db, client, settings)
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    outcomes = []
    while batch := await dispatcher.sweep(limit=5):
        outcomes += batch
    report = [
        {
            "nid": o.owed.event_nid,
            "trigger": o.owed.trigger,
            "status": o.status,
            "id": o.workflow_id,
        }
        for o in outcomes
    ]
    print(json.dumps(report), flush=True)
    db.dispose()


if __name__ == "__main__":
    asyncio.run(main())
