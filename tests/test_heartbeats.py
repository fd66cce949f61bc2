"""Activities a user waits on heartbeat while they wait, so a lost worker is noticed in seconds.

Unit tests run each activity in Temporal's ActivityEnvironment with a short heartbeat timeout
against a service that answers slowly, and count the beats. The end-to-end test runs a chain
on a real worker whose hook and JS heartbeat timeout (2 s) is far below the service's answer
time (4.5 s): without beats every attempt would time out.
"""

import dataclasses
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities.functions import FunctionActivities
from activities.hooks import HookActivities
from activities.llm import LLMActivities
from activities.sync import SyncActivities
from core.backends.providers import ProviderClients
from core.config import Settings
from core.db import Database
from core.models import BackendRow, FunctionRow
from core.sandbox.pool import JSRunner
from core.secrets import SecretBox
from tests.hook_service import ALLOWLIST, HookService
from tests.stack import Stack
from workflows.types import FunctionRunInput, ToolCallRequest

HEARTBEAT = timedelta(seconds=0.6)
BOX = SecretBox([Fernet.generate_key().decode()])


@pytest.fixture(scope="module")
def service() -> Iterator[HookService]:
    svc = HookService().start()
    yield svc
    svc.stop()


@pytest.fixture
def svc(service: HookService) -> HookService:
    service.reset()
    return service


@pytest.fixture(scope="module")
def unit_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    path: Path = tmp_path_factory.mktemp("heartbeats") / "hb.db"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    yield db
    db.dispose()


@pytest.fixture(scope="module")
async def js_runner() -> AsyncIterator[JSRunner]:
    runner = JSRunner(timeout=5.0, memory_mb=128)
    await runner.warm()
    yield runner
    await runner.close()


class Beats:
    """An ActivityEnvironment whose activity has a heartbeat timeout, counting the beats."""

    def __init__(self, client: Client | None = None) -> None:
        self.times: list[float] = []
        self.env = ActivityEnvironment(client)
        self.env.info = dataclasses.replace(self.env.info, heartbeat_timeout=HEARTBEAT)
        self.env.on_heartbeat = lambda *details: self.times.append(time.monotonic())

    def longest_silence(self, started: float, ended: float) -> float:
        marks = [started, *self.times, ended]
        return max(b - a for a, b in itertools.pairwise(marks))


def settings() -> Settings:
    return Settings(CHAINLOOM_OUTBOUND_ALLOWLIST=ALLOWLIST)


def webhook(svc: HookService) -> ToolCallRequest:
    return ToolCallRequest(
        "default", "wf", "t", "webhook", "", {"url": f"{svc.url}/slow/hook"}, "wf/t/1/1"
    )


async def test_a_hook_call_beats_while_the_service_answers(
    unit_db: Database, svc: HookService
) -> None:
    svc.slow_seconds = 2.0
    beats = Beats()
    started = time.monotonic()
    result = await beats.env.run(HookActivities(unit_db, BOX, settings()).call, webhook(svc))
    ended = time.monotonic()
    assert result.status == 200
    assert len(svc.calls("/slow/hook")) == 1
    # Never silent for as long as the heartbeat timeout (beats come every third of it).
    assert len(beats.times) >= 3
    assert beats.longest_silence(started, ended) < HEARTBEAT.total_seconds()


async def test_js_run_beats_while_the_script_runs_and_waits_on_builtins(
    unit_db: Database, svc: HookService, js_runner: JSRunner, temporal_address: str
) -> None:
    svc.slow_seconds = 1.5
    name = f"slow_{uuid.uuid4().hex[:8]}"
    script = f"""
    function main(input) {{
      const end = Date.now() + 1000;
      while (Date.now() < end) {{}}
      return httpFetch('{svc.url}/slow/js').status;
    }}
    """
    with unit_db.session() as session:
        session.add(FunctionRow(tenant_id="default", name=name, script=script))
        session.commit()
    hooks = HookActivities(unit_db, BOX, settings())
    llm = LLMActivities(unit_db, ProviderClients(), secrets=BOX)
    functions = FunctionActivities(unit_db, settings(), llm=llm, hooks=hooks, runner=js_runner)
    beats = Beats(await Client.connect(temporal_address))
    started = time.monotonic()
    result = await beats.env.run(functions.js_run, FunctionRunInput("default", name))
    ended = time.monotonic()
    assert result.result == 200
    assert len(beats.times) >= 5
    assert beats.longest_silence(started, ended) < HEARTBEAT.total_seconds()


async def test_sync_backends_beats_while_a_backend_answers(
    unit_db: Database, svc: HookService
) -> None:
    svc.slow_seconds = 1.5
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    with unit_db.session() as session:
        session.add(
            BackendRow(tenant_id=tenant, name="slow", base_url=f"{svc.url}/slow/v1", type="openai")
        )
        session.commit()
    sync = SyncActivities(
        unit_db,
        ProviderClients(timeout=10, allowlist="127.0.0.1"),
        task_queue="unused",
        down_seconds=30,
        secrets=BOX,
    )
    beats = Beats()
    started = time.monotonic()
    summary = await beats.env.run(sync.sync_backends)
    ended = time.monotonic()
    assert summary["healthy"] >= 1
    assert svc.calls("/slow/v1/models")
    assert len(beats.times) >= 3
    assert beats.longest_silence(started, ended) < HEARTBEAT.total_seconds()


# --------------------------------------------------------------------------- on a worker


@pytest.fixture(scope="module")
def beat_stack(temporal_address: str, sqlite_url: str) -> Iterator[Stack]:
    s = Stack(
        temporal_address,
        sqlite_url,
        CHAINLOOM_OUTBOUND_ALLOWLIST=ALLOWLIST,
        # Beats reach the server about once a second (the worker's throttle), so 2 s leaves
        # room for a slow machine; the service answers after 4.5 s.
        CHAINLOOM_TOOL_HEARTBEAT_TIMEOUT=2,
        CHAINLOOM_LLM_MAX_ATTEMPTS=2,
    )
    yield s
    s.close()


def run_chain(stack: Stack, tasks: list[dict[str, Any]]) -> dict[str, Any]:
    for task, after in itertools.pairwise(tasks):
        task["transition"] = {"branches": [{"operator": "default", "goto": after["id"]}]}
    chain = {"id": f"beats-{uuid.uuid4().hex[:8]}", "tasks": tasks}
    resp = stack.http.post("/tasks", json={"chain": chain, "input": "go"})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def test_slow_hooks_and_functions_outlive_a_short_heartbeat_timeout(
    beat_stack: Stack, svc: HookService
) -> None:
    """The hook and the JS function answer after 4.5 s, the heartbeat timeout is 2 s: each
    is called once and the run completes, because the activities beat while they wait."""
    svc.slow_seconds = 4.5
    name = f"slow_{uuid.uuid4().hex[:8]}"
    script = f"function main(input) {{ return httpFetch('{svc.url}/slow/js').status; }}"
    resp = beat_stack.http.post("/functions", json={"name": name, "script": script})
    assert resp.status_code == 201, resp.text
    body = run_chain(
        beat_stack,
        [
            {
                "id": "hook",
                "handler": "hook",
                "hook": {"name": "webhook", "args": {"url": f"{svc.url}/slow/hook"}},
            },
            {"id": "js", "handler": "js", "hook": {"name": name}},
        ],
    )
    assert body["output"] == 200
    assert len(svc.calls("/slow/hook")) == 1
    assert len(svc.calls("/slow/js")) == 1
