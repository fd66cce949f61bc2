"""Appending an event and starting the triggers that listen for its type."""

import asyncio
from collections.abc import Coroutine
from typing import Any

from core.config import Settings
from core.db import Database
from core.events.store import (
    ClientSource,
    append_event,
)
from core.events.triggers import dispatch_triggers

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
