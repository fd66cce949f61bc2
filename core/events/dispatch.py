"""Appending an event and starting the triggers that listen for its type."""

import asyncio
from collections.abc import Coroutine
from typing import Any

from core.config import Settings
from core.db import Database
from core.events.outbox import TriggerDispatcher
from core.events.store import append
from core.events.triggers import ClientSource

# Dispatches running after their append returned; kept so they are not garbage collected.
_BACKGROUND: set[asyncio.Task[Any]] = set()


def _spawn(coro: Coroutine[Any, Any, Any]) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


async def wait_for_background_dispatches(grace: float = 10.0) -> None:
    """Let dispatches started with background=True finish (shutdown, tests, benchmarks).

    A start still running after `grace` is not lost: its outbox entry stays, and a sweeper
    (of any process) starts it once its lease ends."""
    pending = [task for task in _BACKGROUND if not task.done()]
    if pending:
        await asyncio.wait(pending, timeout=grace)


async def append_and_dispatch(
    db: Database,
    client: ClientSource | TriggerDispatcher,
    settings: Settings,
    tenant_id: str,
    event: dict[str, Any],
    depth: int = 0,
    *,
    background: bool = False,
    existing_ok: bool = False,
) -> dict[str, Any]:
    """Append an event, then start the functions of the triggers listening for its type.

    ``client`` is the process's TriggerDispatcher (the API's, whose client may be swapped), a
    Temporal client, or an async callable returning one (so an append works even while
    Temporal is down). ``depth`` is the number of trigger hops behind this event: 0 from
    outside, the running function's depth + 1 from ``sendEvent``. It is stored in
    metadata.chainloom_depth.

    The event and the starts it owes (the trigger outbox) are committed together; starting the
    workflows follows. With ``background=True`` (the API) the call returns right after the
    commit and the starts run in a task of this loop; without it (an activity) it returns once
    every start was tried. A start that fails, or that never happens because this process
    died, stays in the outbox and a sweeper retries it. ``existing_ok=True`` makes an append
    with a known event id return the stored event and start nothing, so a retried activity
    never fires a trigger twice (what its first attempt owed is in the outbox).
    """
    appended = await asyncio.to_thread(
        append,
        db,
        tenant_id,
        event,
        depth,
        existing_ok=existing_ok,
        max_depth=settings.trigger_max_depth,
    )
    if appended.owed:
        dispatcher = (
            client
            if isinstance(client, TriggerDispatcher)
            else TriggerDispatcher(db, client, settings)
        )
        starting = dispatcher.start_owed(appended.event, appended.owed)
        if background:
            _spawn(starting)
        else:
            await starting
    return appended.event
