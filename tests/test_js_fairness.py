"""Fair JS execution (issue #16, finding 2): one tenant's slow functions must not hold up
another's. Tenant B floods the pool with infinite loops; tenant A's trivial function still
answers at once, through the pool itself, through `FunctionActivities.run` (what the `js_run`
activity runs) and through the API and a real worker. Also: per-tenant caps, round robin, the
bounded queue, the pool's maximum number of processes (counted in /proc, not in the pool's
own books), and hosts above the minimum going away when idle.
"""

import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.exceptions import ApplicationError

from core.config import Settings
from core.db import Database
from core.models import FunctionRow
from core.sandbox.pool import _RUNNERS, HOST_SCRIPT, JSError, JSRunner
from tests.stack import Stack
from tests.test_ops import make_key
from workflows.contracts import JS_BUSY, PERMANENT_TOOL_ERROR
from workflows.types import FunctionRunInput

LOOP = "function main() { while (true) {} }"
TRIVIAL = "function main(x) { return {n: x + 1}; }"
FLOOD = 20
# The bar for tenant A while B floods: an answer within 1 s (it took 49.6 s).
WITHIN = 1.0


def uniq(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def host_pids() -> set[int]:
    """Host processes that are children of this process, whatever their state: read from
    /proc, so the pool's own counting is not what is checked."""
    me = os.getpid()
    marker = str(HOST_SCRIPT).encode()
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            if ppid != me:
                continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                if marker in f.read():
                    found.add(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


class Watch:
    """Samples the host processes (and a tenant's figures) every 20 ms in the background."""

    def __init__(self, runner: JSRunner | None = None, tenant: str = "") -> None:
        self.runner = runner
        self.tenant = tenant
        self.most_processes = 0
        self.most_running = 0
        self.pids: set[int] = set()
        self.others: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> "Watch":
        # Hosts of other runners alive in this process (module fixtures, a test stack's
        # worker) are not this runner's: the suite runs them side by side.
        self.others = await asyncio.to_thread(host_pids)
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def _sample(self) -> None:
        while True:
            pids = await asyncio.to_thread(host_pids) - self.others
            self.pids |= pids
            self.most_processes = max(self.most_processes, len(pids))
            if self.runner is not None:
                running = self.runner.fair.tenant_figures(self.tenant)[0]
                self.most_running = max(self.most_running, running)
            await asyncio.sleep(0.02)


async def until(check: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not {what} within {seconds} s")
        await asyncio.sleep(0.02)


async def timed(coro: Any) -> tuple[Any, float]:
    began = time.perf_counter()
    out = await coro
    return out, time.perf_counter() - began


Make = Callable[..., Awaitable[JSRunner]]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Warm runners, closed after the test whatever happened in it."""
    made: list[JSRunner] = []

    async def build(**options: Any) -> JSRunner:
        runner = JSRunner(**options)
        made.append(runner)
        await runner.warm()
        return runner

    yield build
    for runner in made:
        await runner.close()


@pytest.fixture
async def pool(make: Make) -> JSRunner:
    """Short time limit so a flood of 20 loops is over in ~10 s; cap 2, at most 6 hosts."""
    return await make(timeout=1.0, size=2, max_size=6, tenant_concurrency=2, shrink_after=0.5)


# --------------------------------------------------------------------------- the pool


async def test_a_tenant_answers_at_once_while_another_floods_the_pool(pool: JSRunner) -> None:
    async with Watch(pool, "b") as watch:
        flood = [asyncio.create_task(pool.run(LOOP, tenant="b")) for _ in range(FLOOD)]
        await until(lambda: pool.fair.tenant_figures("b")[0] == 2, 10, "B running")
        took = []
        for i in range(5):
            result, seconds = await timed(pool.run(TRIVIAL, i, tenant="a"))
            assert result.value == {"n": i + 1}
            took.append(seconds)
        # B is still at it: A did not wait for B's calls to drain.
        assert pool.fair.tenant_figures("b")[2] > 0
        assert max(took) < WITHIN, took
        outcomes = await asyncio.gather(*flood, return_exceptions=True)
    # Every one of B's calls still ends with the time limit, none with a queue error.
    for outcome in outcomes:
        assert isinstance(outcome, JSError), outcome
        assert outcome.kind == "timeout", outcome.message
        assert "time limit of 1 s (CHAINLOOM_JS_TIMEOUT)" in outcome.message
    assert watch.most_running == 2  # B's cap, never more
    assert 0 < watch.most_processes <= pool.max_size
    print(f"A while B floods: {[round(t * 1000, 1) for t in took]} ms")


async def test_tenants_that_wait_are_served_in_turn(make: Make) -> None:
    r = await make(size=1, max_size=1, tenant_concurrency=1, queue=10)
    order: list[str] = []

    async def one(tenant: str, i: int) -> None:
        await r.run(TRIVIAL, i, tenant=tenant)
        order.append(f"{tenant}{i}")

    await asyncio.gather(*(one("x", i) for i in range(3)), *(one("y", i) for i in range(3)))
    # x0 had the host; then the rotation, not the order of arrival (x0 x1 x2 y0 y1 y2).
    assert order == ["x0", "x1", "y0", "x2", "y1", "y2"]


async def test_a_full_tenant_queue_is_refused_at_once_and_others_still_run(
    make: Make,
) -> None:
    r = await make(timeout=1.0, size=1, max_size=4, tenant_concurrency=1, tenant_queue=2)
    held = [asyncio.create_task(r.run(LOOP, tenant="b")) for _ in range(3)]
    await until(lambda: r.fair.tenant_figures("b") == (1, 1, 2), 10, "B queued")
    began = time.monotonic()
    with pytest.raises(JSError) as info:
        await r.run(TRIVIAL, 1, tenant="b")
    assert time.monotonic() - began < 0.5  # refused, not queued
    assert info.value.kind == "busy" and not info.value.permanent
    assert "CHAINLOOM_JS_TENANT_QUEUE is 2" in info.value.message
    assert (await r.run(TRIVIAL, 1, tenant="a")).value == {"n": 2}
    # A queued call that is cancelled (its activity was) gives its place back.
    held[2].cancel()
    await until(lambda: r.fair.tenant_figures("b")[2] == 1, 5, "the place given back")
    held.append(asyncio.create_task(r.run(LOOP, tenant="b")))
    await until(lambda: r.fair.tenant_figures("b")[2] == 2, 5, "a new call queued")
    outcomes = await asyncio.gather(*held, return_exceptions=True)
    assert isinstance(outcomes[2], asyncio.CancelledError)
    assert [o.kind for o in outcomes if isinstance(o, JSError)] == ["timeout"] * 3
    assert r.fair.tenant_figures("b") == (0, 0, 0) and r.fair.waiting == 0 and r.fair.held == 0


async def test_a_call_whose_turn_does_not_come_within_its_wall_time_is_busy(
    make: Make,
) -> None:
    r = await make(timeout=1.0, wall_timeout=1.5, size=1, max_size=4, tenant_concurrency=1)
    beats: list[float] = []
    calls = [
        asyncio.create_task(r.run(LOOP, tenant="b", beat=lambda: beats.append(time.monotonic())))
        for _ in range(3)
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    kinds = [o.kind for o in outcomes if isinstance(o, JSError)]
    # The first runs into its time limit; the second gets its turn then and runs out of time
    # too (JS time or wall time); the third never gets one within its 1.5 s.
    assert kinds == ["timeout", "timeout", "busy"], outcomes
    busy = outcomes[2]
    assert isinstance(busy, JSError) and not busy.permanent
    assert "waited 1.5 s for a turn" in busy.message and "was not run" in busy.message
    assert beats, "a waiting call reports that it is alive"


async def test_hosts_above_the_minimum_go_when_idle(make: Make) -> None:
    r = await make(size=1, max_size=5, tenant_concurrency=1, shrink_after=0.3)

    async def slow(name: str, args: list[Any], left: float) -> Any:
        await asyncio.sleep(0.5)
        return 1

    script = "function main() { return executeTask('x'); }"
    async with Watch() as watch:
        # Four tenants, each with a call parked in a builtin: four hosts at once.
        await asyncio.gather(*(r.run(script, builtins=slow, tenant=f"t{i}") for i in range(4)))
        grown = r.processes
        assert grown >= 4
        await until(lambda: r.processes == r.size, 10, "back to the minimum")
        await until(lambda: len(host_pids() - watch.others) == r.size, 5, "the processes gone")
    assert watch.most_processes <= r.max_size
    assert (await r.run(TRIVIAL, 1)).value == {"n": 2}
    print(f"grew to {grown} hosts, shrank back to {r.size}")


async def test_the_pool_never_exceeds_its_maximum(make: Make) -> None:
    r = await make(timeout=1.0, size=1, max_size=3, tenant_concurrency=2, shrink_after=0.2)

    async def slow(name: str, args: list[Any], left: float) -> Any:
        await asyncio.sleep(0.3)
        return 1

    parked = "function main() { return executeTask('x'); }"
    async with Watch() as watch:
        # Four tenants, twelve calls (within the pool's queue of 4 per host): loops that
        # get their host killed and replaced, and calls parked in a builtin.
        calls = [
            r.run(LOOP if i % 3 == 0 else parked, builtins=slow, tenant=f"t{i % 4}")
            for i in range(12)
        ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        await asyncio.sleep(0.5)
    assert watch.most_processes <= 3, watch.most_processes
    assert len(watch.pids) > 3  # hosts were replaced (the loops) and still never more than 3
    kinds = {o.kind if isinstance(o, JSError) else "ok" for o in outcomes}
    assert kinds <= {"ok", "timeout"}, outcomes


# --------------------------------------------------------------------------- js_run


@pytest.fixture
def functions(tmp_path: Path) -> Iterator[Any]:
    from activities.functions import FunctionActivities
    from activities.hooks import HookActivities
    from activities.llm import LLMActivities
    from core.backends.providers import ProviderClients
    from core.secrets import SecretBox

    url = f"sqlite:///{tmp_path / 'fair.db'}"
    db = Database(url)
    db.migrate()
    with db.session() as session:
        session.add(FunctionRow(tenant_id="a", name="trivial", script=TRIVIAL))
        session.add(FunctionRow(tenant_id="b", name="loop", script=LOOP))
        session.commit()
    settings = Settings(
        DATABASE_URL=url, CHAINLOOM_DATA_DIR=str(tmp_path), CHAINLOOM_JS_TIMEOUT=1.0
    )
    box = SecretBox.from_settings(settings)
    yield FunctionActivities(
        db,
        settings,
        llm=LLMActivities(db, ProviderClients(), secrets=box),
        hooks=HookActivities(db, box, settings),
    )
    db.dispose()


async def test_js_run_answers_tenant_a_while_tenant_b_floods(functions: Any) -> None:
    runner = functions.runner()
    flood = [
        asyncio.create_task(functions.run(FunctionRunInput("b", "loop"))) for _ in range(FLOOD)
    ]
    await until(lambda: runner.fair.tenant_figures("b")[0] == 2, 10, "B running")
    took = []
    for i in range(5):
        out, seconds = await timed(functions.run(FunctionRunInput("a", "trivial", i)))
        assert out.result == {"n": i + 1}
        took.append(seconds)
    assert runner.fair.tenant_figures("b")[2] > 0
    assert max(took) < WITHIN, took
    for outcome in await asyncio.gather(*flood, return_exceptions=True):
        assert isinstance(outcome, ApplicationError), outcome
        assert outcome.type == PERMANENT_TOOL_ERROR and "time limit of 1 s" in outcome.message
    await runner.close()


async def test_js_run_fails_a_refused_call_retryably(functions: Any) -> None:
    runner = functions.runner()
    runner.fair.tenant_queue = 0  # B may run its cap, and queue nothing
    held = [asyncio.create_task(functions.run(FunctionRunInput("b", "loop"))) for _ in range(2)]
    await until(lambda: runner.fair.tenant_figures("b")[0] == 2, 10, "B running")
    with pytest.raises(ApplicationError) as info:
        await functions.run(FunctionRunInput("b", "loop"))
    assert info.value.type == JS_BUSY and not info.value.non_retryable
    assert "JS function 'loop': the call was not run" in info.value.message
    await asyncio.gather(*held, return_exceptions=True)
    await runner.close()


# --------------------------------------------------------------------------- through the API


@pytest.fixture(scope="module")
def fair_stack(temporal_address: str, sqlite_url: str) -> Iterator[Stack]:
    s = Stack(temporal_address, sqlite_url, CHAINLOOM_JS_TIMEOUT=2)
    yield s
    s.close()


def _chain(function: str) -> dict[str, Any]:
    return {
        "id": uniq("fair"),
        "tasks": [
            {
                "id": "run",
                "handler": "js",
                "hook": {"name": function},
                "transition": {"branches": [{"operator": "default", "goto": "end"}]},
            }
        ],
    }


async def test_through_the_api_a_tenant_answers_while_another_floods(fair_stack: Stack) -> None:
    tenant_b = uniq("tenant-b")
    key_b = make_key(fair_stack.settings.resolved_database_url(), tenant_b, ["admin"])
    headers_a = {"X-API-Key": Stack.API_KEY}
    headers_b = {"X-API-Key": key_b}
    loop_name, trivial_name = uniq("loop"), uniq("trivial")
    async with httpx.AsyncClient(base_url=fair_stack.api.url, timeout=120) as http:
        made = await http.post(
            "/functions", json={"name": loop_name, "script": LOOP}, headers=headers_b
        )
        assert made.status_code == 201, made.text
        made = await http.post(
            "/functions", json={"name": trivial_name, "script": TRIVIAL}, headers=headers_a
        )
        assert made.status_code == 201, made.text

        async def task(name: str, value: Any, headers: dict[str, str]) -> httpx.Response:
            body = {"chain": _chain(name), "input": value, "inputType": "json"}
            return await http.post("/tasks", json=body, headers=headers)

        # Warm the path (workflow sandbox, first activity) before timing anything.
        warm = await task(trivial_name, 0, headers_a)
        assert warm.status_code == 200, warm.text
        flood = [asyncio.create_task(task(loop_name, None, headers_b)) for _ in range(FLOOD)]

        def figures() -> tuple[int, int, int]:
            # The worker's runner, on the worker's own loop (the stack runs it in a thread).
            runners = list(_RUNNERS.get(fair_stack.worker._loop, {}).values())
            return runners[0].fair.tenant_figures(tenant_b) if runners else (0, 0, 0)

        # All of B's calls reached the pool (two run, the rest wait; at most one turn over):
        # from here on, what A waits for is the pool, not Temporal starting B's 20 runs.
        await until(
            lambda: figures()[0] == 2 and figures()[2] >= FLOOD - 4, 60, "B flooding the worker"
        )
        took = []
        for i in range(5):
            resp, seconds = await timed(task(trivial_name, i, headers_a))
            assert resp.status_code == 200, resp.text
            assert resp.json()["output"] == {"n": i + 1}
            took.append(seconds)
        assert figures()[2] > 0  # B still has calls waiting: A did not wait for them
        assert max(took) < WITHIN, took
        for resp in await asyncio.gather(*flood):
            assert resp.status_code == 422, resp.text
            message = resp.json()["error"]["message"]
            assert "time limit of 2 s (CHAINLOOM_JS_TIMEOUT)" in message, message
    print(f"A through /tasks while B floods: {[round(t * 1000) for t in took]} ms")


def test_settings_reach_the_runner() -> None:
    from core.sandbox.pool import runner_for

    settings = Settings(
        CHAINLOOM_DATA_DIR=tempfile.mkdtemp(),
        CHAINLOOM_JS_POOL_SIZE=3,
        CHAINLOOM_JS_POOL_MAX=10,
        CHAINLOOM_JS_TENANT_CONCURRENCY=4,
        CHAINLOOM_JS_TENANT_QUEUE=7,
        CHAINLOOM_JS_POOL_IDLE=12,
    )

    async def build() -> JSRunner:
        return runner_for(settings)

    r = asyncio.run(build())
    assert (r.size, r.max_size, r.tenant_concurrency, r.shrink_after) == (3, 10, 4, 12.0)
    assert (r.fair.tenant_queue, r.fair.tenant_hosts, r.fair.hosts) == (7, 6, 10)
