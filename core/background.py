"""A task that flushes in-memory state to the database every few seconds, and once more on stop.

The usage meter and the request log buffer writes this way so a request never waits on them.
"""

import abc
import asyncio
import contextlib


class Flusher(abc.ABC):
    INTERVAL = 1.0

    _task: asyncio.Task[None] | None = None

    @abc.abstractmethod
    async def flush(self) -> None:
        """Writes what is held in memory."""

    async def tick(self) -> None:
        """One period's work; by default a flush."""
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.INTERVAL)
            await self.tick()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()
