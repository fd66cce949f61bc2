"""Fair turns at the JavaScript pool: per-tenant caps and round robin across tenants.

The pool (core/sandbox/pool.py) has at most `hosts` host processes. A call needs a *turn*
before it may take one. A turn gives the call a host for its whole life and a running slot
while it runs JavaScript; a call that waits on a builtin keeps its host (its isolate lives
there) but gives its running slot back, and takes one again when the builtin answers.

Per tenant:

- at most `running` calls run JavaScript at once (CHAINLOOM_JS_TENANT_CONCURRENCY): a tenant
  never gets more than that much CPU, however many calls it sends;
- at most `tenant_hosts` calls hold a host at once (running, or waiting on a builtin). The
  runner sets it to POOL_MAX - TENANT_CONCURRENCY, so whatever one tenant does, another finds
  TENANT_CONCURRENCY hosts it cannot take;
- at most `tenant_queue` calls wait for a turn (CHAINLOOM_JS_TENANT_QUEUE); one more is
  refused at once with `Busy`.

Across tenants, the calls that wait are served round robin: when a host frees up, the next
tenant in the rotation that is under its own caps gets it, then moves to the back. A tenant's
own calls keep their order, and a call back from a builtin goes before the tenant's new calls
(it already holds a host; finishing it frees one). So a tenant that floods the pool delays
another tenant by at most the time a turn takes to end: one JS time limit for a call that
only computes.

Everything here runs on the pool's event loop; nothing blocks, and no lock is needed.
"""

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("chainloom.js")

# How often a call waiting for its turn reports that it is alive (a Temporal heartbeat).
WAIT_BEAT = 1.0


class Busy(Exception):
    """The call was not run: its tenant's queue (or the pool's) is full, or its turn did not
    come before its deadline. Nothing ran, so trying again later is safe."""


@dataclass
class _Tenant:
    running: int = 0  # calls running JavaScript
    hosts: int = 0  # calls holding a host: running, or waiting on a builtin
    waiting: deque["asyncio.Future[None]"] = field(default_factory=deque)  # new calls
    resuming: deque["asyncio.Future[None]"] = field(default_factory=deque)  # back from a builtin

    @property
    def idle(self) -> bool:
        return not (self.running or self.hosts or self.waiting or self.resuming)


class Turn:
    """One call's place at the pool, from `FairQueue.enter` to `FairQueue.leave`."""

    __slots__ = ("left", "running", "tenant")

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.running = True
        self.left = False


class FairQueue:
    def __init__(
        self,
        *,
        hosts: int,
        running: int,
        tenant_hosts: int,
        tenant_queue: int,
        queue: int,
    ) -> None:
        self.hosts = max(1, hosts)
        self.running = max(1, running)
        self.tenant_hosts = max(1, min(tenant_hosts, self.hosts))
        self.tenant_queue = max(0, tenant_queue)
        self.queue = max(0, queue)
        self.held = 0  # turns holding a host, all tenants
        self.waiting = 0  # new calls waiting for a turn, all tenants
        self._tenants: dict[str, _Tenant] = {}
        # Tenants with new calls waiting, in serving order: the one served goes to the back.
        self._ring: deque[str] = deque()

    # ------------------------------------------------------------------ a call's life

    async def enter(
        self,
        tenant: str,
        deadline: float,
        beat: Callable[[], Any] | None = None,
    ) -> Turn:
        """A turn for a new call of `tenant`: at once when it fits, else after waiting in the
        tenant's queue until `deadline` (loop time), calling `beat` every second meanwhile."""
        state = self._tenants.setdefault(tenant, _Tenant())
        if not state.waiting and self._fits(state):
            self._grant(state)
            return Turn(tenant)
        if len(state.waiting) >= self.tenant_queue:
            self._forget(tenant)
            raise Busy(
                f"{len(state.waiting)} of this tenant's function calls already wait for the "
                f"JavaScript pool (CHAINLOOM_JS_TENANT_QUEUE is {self.tenant_queue}); try again "
                "once some have finished"
            )
        if self.waiting >= self.queue:
            self._forget(tenant)
            raise Busy(
                f"{self.waiting} function calls already wait for this process's JavaScript "
                "pool, the most it queues; try again shortly"
            )
        loop = asyncio.get_running_loop()
        ticket: asyncio.Future[None] = loop.create_future()
        state.waiting.append(ticket)
        self.waiting += 1
        if tenant not in self._ring:
            self._ring.append(tenant)
        try:
            await _wait(ticket, deadline, beat)
        except BaseException:
            if ticket.done() and not ticket.cancelled():
                # Granted just as the wait ended: give the turn back.
                self.leave(Turn(tenant))
            else:
                ticket.cancel()
                with contextlib.suppress(ValueError):
                    state.waiting.remove(ticket)
                    self.waiting -= 1
                self._forget(tenant)
                self._dispatch()
            raise
        return Turn(tenant)

    def pause(self, turn: Turn) -> None:
        """The call waits on a builtin: it keeps its host but not its running slot."""
        if turn.running and not turn.left:
            turn.running = False
            self._tenants[turn.tenant].running -= 1
            self._dispatch()

    async def resume(self, turn: Turn) -> None:
        """The builtin answered: wait for a running slot of the call's tenant again."""
        if turn.running or turn.left:
            return
        state = self._tenants[turn.tenant]
        if not state.resuming and state.running < self.running:
            state.running += 1
            turn.running = True
            return
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.resuming.append(ticket)
        try:
            await ticket
        except BaseException:
            if ticket.done() and not ticket.cancelled():
                turn.running = True  # granted; leave() gives it back
            else:
                ticket.cancel()
                with contextlib.suppress(ValueError):
                    state.resuming.remove(ticket)
            raise
        turn.running = True

    def leave(self, turn: Turn) -> None:
        """The call is over: its host (and running slot) go to the next in line."""
        if turn.left:
            return
        turn.left = True
        state = self._tenants[turn.tenant]
        if turn.running:
            state.running -= 1
        state.hosts -= 1
        self.held -= 1
        self._forget(turn.tenant)
        self._dispatch()

    # ------------------------------------------------------------------ figures

    def tenant_figures(self, tenant: str) -> tuple[int, int, int]:
        """(running, holding a host, waiting) for a tenant; for tests and logs."""
        state = self._tenants.get(tenant)
        if state is None:
            return (0, 0, 0)
        return (state.running, state.hosts, len(state.waiting))

    # ------------------------------------------------------------------ the rotation

    def _fits(self, state: _Tenant) -> bool:
        return (
            self.held < self.hosts
            and state.running < self.running
            and state.hosts < self.tenant_hosts
        )

    def _grant(self, state: _Tenant) -> None:
        state.running += 1
        state.hosts += 1
        self.held += 1

    def _forget(self, tenant: str) -> None:
        state = self._tenants.get(tenant)
        if state is not None and state.idle:
            del self._tenants[tenant]

    def _dispatch(self) -> None:
        # Calls back from a builtin first: they hold a host already and only need their own
        # tenant's running slot, so no other tenant waits for them.
        for state in self._tenants.values():
            while state.resuming and state.running < self.running:
                ticket = state.resuming.popleft()
                if not ticket.done():  # a cancelled one is removed by its waiter
                    state.running += 1
                    ticket.set_result(None)
        # New calls, round robin over the tenants that have some waiting.
        while self._ring and self.held < self.hosts:
            for _ in range(len(self._ring)):
                name = self._ring[0]
                queued = self._tenants.get(name)
                if queued is None or not queued.waiting:
                    self._ring.popleft()
                    continue
                self._ring.rotate(-1)
                if self._fits(queued):
                    ticket = queued.waiting.popleft()
                    self.waiting -= 1
                    self._grant(queued)
                    ticket.set_result(None)
                    if not queued.waiting:
                        self._ring.remove(name)
                    break
            else:
                return  # every waiting tenant is at its own caps


async def _wait(
    ticket: "asyncio.Future[None]", deadline: float, beat: Callable[[], Any] | None
) -> None:
    loop = asyncio.get_running_loop()
    while not ticket.done():
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError
        # asyncio.wait, not wait_for: the ticket must survive the timeout.
        await asyncio.wait({ticket}, timeout=min(left, WAIT_BEAT))
        if not ticket.done() and beat is not None:
            try:
                beat()
            except Exception as err:  # a heartbeat that fails must not lose the turn
                log.debug("heartbeat while waiting for the JS pool failed: %s", err)
