"""Runs that cannot go on end, over real HTTP: template bombs fail promptly, the worker's
memory stays low, and a run whose workflow task keeps failing is ended by cancel (or by the
POST /tasks waiting on it) instead of staying `running` forever."""

import asyncio
import contextlib
import resource
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.worker import Worker

from core.db import Database
from core.models import RunRow
from tests.stack import Stack
from tests.test_api_resources import assert_error
from tests.test_api_runs import get_run, start, unique, wait_run

BOMBS = {
    "output": "{{ 'a' * 5*10**7 }}",
    "loops": "{% for i in range(100000) %}{% for j in range(1000) %}{{ i }}{% endfor %}"
    "{% endfor %}",
    "memory": "{{ ('a' * 2*10**9)|length }}",
}


def bomb_chain(template: str) -> dict[str, Any]:
    return {
        "id": unique("bomb"),
        "tasks": [{"id": "bomb", "handler": "noop", "output_template": template}],
    }


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_template_bombs_fail_promptly(stack: Stack, bomb: str) -> None:
    started = time.monotonic()
    resp = stack.http.post("/tasks", json={"chain": bomb_chain(BOMBS[bomb]), "input": "x"})
    body = assert_error(resp, 422, "chain_failed")
    assert time.monotonic() - started < 30
    assert body["error"]["message"].startswith(
        "task 'bomb' (noop) failed: template error: template over a limit:"
    )
    view = get_run(stack, body["id"])
    assert view["status"] == "failed"
    assert view["error"] == body["error"]["message"]
    assert view["state"][0]["error"]["error"].startswith("template error: template over a limit")


def test_templates_too_big_to_compile_are_refused_up_front(stack: Stack) -> None:
    chain = bomb_chain("{{ input }}" * 4000)
    body = assert_error(stack.http.post("/tasks", json={"chain": chain}), 422, "invalid_chain")
    assert "template over a limit: template has 12000 tokens" in body["error"]["message"]


def test_memory_bombs_keep_the_worker_small(stack: Stack) -> None:
    """Three concurrent renders of a 2 GB string (2.1 GB peak in the probe): refused before
    the string exists. The worker runs in this process, whose peak RSS must barely move."""
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    chain = bomb_chain(BOMBS["memory"])
    with ThreadPoolExecutor(3) as pool:
        answers = list(
            pool.map(
                lambda i: stack.http.post("/tasks", json={"chain": chain, "input": str(i)}),
                range(3),
            )
        )
    for resp in answers:
        assert_error(resp, 422, "chain_failed")
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown < 100 * 1024, f"peak RSS grew by {grown} KiB"


# --------------------------------------------------------------------------- stuck runs


@workflow.defn(name="AlwaysRaises", sandboxed=False)
class AlwaysRaises:
    """A workflow whose every workflow task fails: RuntimeError is no Temporal failure and not
    one of worker.WORKFLOW_FAILURE_TYPES, so the SDK retries the task forever."""

    @workflow.run
    async def run(self) -> None:
        raise RuntimeError("kaboom: this workflow cannot take a step")


@contextlib.asynccontextmanager
async def failing_run(
    stack: Stack, db: Database
) -> AsyncIterator[tuple[RunRow, WorkflowHandle[Any, Any]]]:
    """A run of AlwaysRaises, recorded like a chain run, with a worker of its own."""
    client = await Client.connect(
        stack.settings.temporal_address, namespace=stack.settings.temporal_namespace
    )
    queue = f"stuck-{uuid.uuid4().hex}"
    async with Worker(client, task_queue=queue, workflows=[AlwaysRaises]):
        handle = await client.start_workflow(
            "AlwaysRaises", id=f"chain-stuck-{uuid.uuid4().hex}", task_queue=queue
        )
        row = RunRow(
            tenant_id=stack.settings.default_tenant, workflow_id=handle.id, chain_id="stuck"
        )
        with db.session() as session:
            session.add(row)
            session.commit()
            session.refresh(row)
        try:
            yield row, handle
        finally:
            with contextlib.suppress(Exception):
                await handle.terminate(reason="test over")


async def failing_attempts(handle: WorkflowHandle[Any, Any], attempts: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        desc = await handle.describe()
        if desc.raw_description.pending_workflow_task.attempt >= attempts:
            return
        assert time.monotonic() < deadline, "the workflow task never failed"
        await asyncio.sleep(0.2)


async def test_cancel_ends_a_run_whose_workflow_task_fails(stack: Stack, db: Database) -> None:
    async with failing_run(stack, db) as (row, handle):
        await failing_attempts(handle, 2)
        view = await asyncio.to_thread(get_run, stack, row.id)
        assert view["status"] == "running"
        assert view["error"].startswith("the run is stuck: its workflow task keeps failing")
        assert "kaboom" in view["error"]

        started = time.monotonic()
        resp = await asyncio.to_thread(stack.http.post, f"/runs/{row.id}/cancel")
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"id": row.id, "status": "cancelled"}
        assert time.monotonic() - started < 30

        view = await asyncio.to_thread(get_run, stack, row.id)
        assert view["status"] == "cancelled"
        assert view["error"].startswith("cancelled: the run could not stop by itself: ")
        assert "kaboom" in view["error"]
        assert (await handle.describe()).status == WorkflowExecutionStatus.TERMINATED
        # Finished: a second cancel is refused like for any finished run.
        again = await asyncio.to_thread(stack.http.post, f"/runs/{row.id}/cancel")
        assert_error(again, 409, "run_not_running")


# A stack whose limits sit above what Temporal accepts: a prompt of 2.5 MB makes the workflow
# task that schedules the model call fail on the payload limit, every time (task outputs that
# large would be kept out of history, docs/chains.md "Long and large chains"; a prompt is sent).
@pytest.fixture(scope="module")
def loose_stack(temporal_address: str, database_url: str) -> Iterator[Stack]:
    big = str(8 * 1024 * 1024)
    s = Stack(
        temporal_address,
        database_url,
        CHAINLOOM_TEMPLATE_MAX_OUTPUT_BYTES=big,
        CHAINLOOM_TASK_OUTPUT_MAX_BYTES=big,
        CHAINLOOM_RUN_RESULT_MAX_BYTES=big,
    )
    yield s
    s.close()


OVERSIZED = {
    "id": "oversized",
    "tasks": [
        {
            "id": "big",
            "handler": "prompt_to_string",
            "prompt_template": "{{ 'a' * 2500000 }}",
            "execute_config": {"model": "gpt-4o-mini"},
        }
    ],
}


def test_tasks_does_not_wait_forever_on_a_stuck_run(loose_stack: Stack) -> None:
    started = time.monotonic()
    resp = loose_stack.http.post("/tasks", json={"chain": OVERSIZED, "input": "x"})
    body = assert_error(resp, 422, "chain_failed")
    # Two failed attempts (Temporal retries a failing workflow task about every 10 s), then
    # the wait ends: well before CHAINLOOM_TASKS_WAIT_TIMEOUT (600 s).
    assert time.monotonic() - started < 60
    message = body["error"]["message"]
    assert message.startswith("the run was terminated: its workflow task keeps failing")
    assert "payloads with size that exceeded the error limit" in message
    view = get_run(loose_stack, body["id"])
    assert view["status"] == "failed" and view["error"] == message


def test_cancel_ends_a_chain_run_stuck_on_the_payload_limit(loose_stack: Stack) -> None:
    created = start(loose_stack, {"chain": OVERSIZED, "input": "x"})
    view = wait_run(loose_stack, created["id"], lambda v: bool(v["error"]), timeout=30)
    assert view["status"] == "running" and "exceeded the error limit" in view["error"]
    resp = loose_stack.http.post(f"/runs/{created['id']}/cancel")
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "cancelled"
    view = get_run(loose_stack, created["id"])
    assert view["status"] == "cancelled"
    assert "exceeded the error limit" in view["error"]
