"""Fixtures for the benchmarks: one local stack for the session, run on its own event loop."""

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest

from benchmarks.chain_overhead import BenchEnv, bench_env, machine

T = TypeVar("T")


class BenchThread:
    """Dev server, scripted LLM and both workers on an event loop of their own.

    Measurements are submitted to that loop, so the client and the workers share it exactly
    as in ``python -m benchmarks.chain_overhead``, whatever pytest-asyncio does.
    """

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._loop = asyncio.new_event_loop()
        self._env: BenchEnv | None = None
        self._stop: asyncio.Event | None = None
        self._ready: Future[None] = Future()
        self._thread = threading.Thread(target=self._main, name="bench", daemon=True)

    def start(self) -> "BenchThread":
        self._thread.start()
        self._ready.result(timeout=120)
        return self

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        try:
            async with bench_env(self._workdir) as env:
                self._env = env
                self._ready.set_result(None)
                await self._stop.wait()
        except BaseException as err:
            if not self._ready.done():
                self._ready.set_exception(err)
            raise

    def run(self, measure: Callable[[BenchEnv], Awaitable[T]], timeout: float = 280) -> T:
        assert self._env is not None
        env = self._env

        async def call() -> T:
            return await measure(env)

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout)

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)


class Report:
    """Tables printed at the end of the run; raw numbers kept in a JSON file under pytest's tmp."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tables: list[str] = []
        self.data: dict[str, Any] = {"machine": machine()}

    def add(self, key: str, table: str, data: dict[str, Any]) -> None:
        self.tables.append(table)
        self.data[key] = data
        self.path.write_text(json.dumps(self.data, indent=2))


REPORT = pytest.StashKey[Report]()


@pytest.fixture(scope="session")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BenchThread]:
    thread = BenchThread(tmp_path_factory.mktemp("bench")).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="session")
def report(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Report:
    path = tmp_path_factory.getbasetemp() / "chain_overhead.json"
    return request.config.stash.setdefault(REPORT, Report(path))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    found = config.stash.get(REPORT, None)
    if found is None or not found.tables:
        return
    terminalreporter.section("chainloom benchmarks")
    terminalreporter.write_line(f"machine: {found.data['machine']}")
    for table in found.tables:
        terminalreporter.write_line("")
        for line in table.splitlines():
            terminalreporter.write_line(line)
    terminalreporter.write_line("")
    terminalreporter.write_line(f"raw numbers: {found.path}")
