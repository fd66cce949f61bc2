"""Heartbeats for activities a user waits on: model calls, hooks, JS functions, state sync.

A worker that dies mid-call stops beating; Temporal notices at the activity's heartbeat
timeout (seconds, set by the workflow) and hands the call to another worker, instead of
waiting for the start-to-close timeout (minutes). So an activity beats for as long as it
waits: on a model's answer, a hook's HTTP response, a script or the builtins it awaits.

On a graceful worker shutdown (SIGTERM) running activities keep beating while they finish;
one still running when the grace period ends is cancelled, and the SDK reports it as a
retryable `WorkerShutdown` failure, so another worker retries it at once.
"""

import asyncio
import contextlib
import contextvars
from collections.abc import Awaitable
from typing import TypeVar

from temporalio import activity

T = TypeVar("T")

# Set while an activity's beater runs, so nested calls (a JS builtin calling the LLM or hook
# activity code) do not start a second one.
_beating: contextvars.ContextVar[bool] = contextvars.ContextVar("beating", default=False)
# Beats go out every third of the heartbeat timeout (so two may be late), at most this often.
MIN_INTERVAL = 0.2


async def heartbeating(work: Awaitable[T]) -> T:
    """Await `work`, heartbeating every third of the activity's heartbeat timeout."""
    if not activity.in_activity() or _beating.get():
        return await work
    timeout = activity.info().heartbeat_timeout
    if not timeout:
        return await work
    interval = max(timeout.total_seconds() / 3, MIN_INTERVAL)

    async def beat() -> None:
        while True:
            await asyncio.sleep(interval)
            activity.heartbeat()

    token = _beating.set(True)
    beater = asyncio.create_task(beat())
    try:
        return await work
    finally:
        _beating.reset(token)
        beater.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beater
