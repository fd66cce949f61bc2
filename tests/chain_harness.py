"""Helpers for ChainWorkflow tests on a real Temporal dev server, with the LLM activities
mocked by name.

Every test gets its own task queue and worker; the mocks answer from the last message of each
request and record every call, so tests can check both what the chain produced and what it
asked the model.
"""

import asyncio
import contextlib
import dataclasses
import functools
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.run_store import RunStoreActivities
from core.db import Database
from core.runstate import records
from worker import PASSTHROUGH, WORKFLOW_FAILURE_TYPES
from workflows.chain import ChainWorkflow
from workflows.types import (
    ChainRunInput,
    EmbedRequest,
    EmbedResult,
    LLMRequest,
    LLMResult,
    RunOptions,
)

RUNNER = SandboxedWorkflowRunner(
    restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSTHROUGH)
)
OPTIONS = RunOptions(llm_max_attempts=2, llm_heartbeat_timeout=5)
RUN_TIMEOUT = timedelta(seconds=30)

SENTIMENT = {"positive": True, "negative": False}

Reply = str | LLMResult | Exception | Callable[[LLMRequest], str]


@functools.cache
def records_db() -> Database:
    """The database the run-record activities of harness workers write to (SQLite)."""
    db = Database(f"sqlite:///{tempfile.mkdtemp(prefix='chain-harness-')}/records.db")
    db.migrate()
    return db


class MockLLM:
    """Answers `llm_chat` by the first rule whose needle is in the last message.

    A rule's reply is a string, a whole LLMResult, an exception to raise, a function of the
    request, or a list of those consumed one per call (the last one repeats).
    """

    def __init__(self, rules: dict[str, Reply | list[Reply]] | None = None, default: str = "ok"):
        self.rules = {
            needle: list(r) if isinstance(r, list) else [r] for needle, r in (rules or {}).items()
        }
        self.default = default
        self.requests: list[LLMRequest] = []
        self.embeds: list[EmbedRequest] = []

    def _reply(self, request: LLMRequest) -> str | LLMResult:
        last = str(request.messages[-1].get("content") or "") if request.messages else ""
        reply: Reply = self.default
        for needle, replies in self.rules.items():
            if needle in last:
                reply = replies.pop(0) if len(replies) > 1 else replies[0]
                break
        if isinstance(reply, Exception):
            raise reply
        return reply(request) if callable(reply) else reply

    def activities(self) -> list[Callable[..., Any]]:
        @activity.defn(name="llm_chat")
        async def llm_chat(request: LLMRequest) -> LLMResult:
            # As the real activity does: a compacted history is read back whole.
            messages = records.expand(records_db(), request.tenant_id, request.messages)
            request = dataclasses.replace(request, messages=messages)
            self.requests.append(request)
            content = self._reply(request)
            if isinstance(content, LLMResult):
                return content
            return LLMResult(
                content=content,
                model="mock-model",
                backend="mock-backend",
                input_tokens=10 * len(request.messages),
                output_tokens=len(content.split()),
            )

        @activity.defn(name="llm_embed")
        async def llm_embed(request: EmbedRequest) -> EmbedResult:
            self.embeds.append(request)
            return EmbedResult(
                vector=[float(len(request.text)), 0.5, -1.0],
                model="mock-embed",
                backend="mock-embed-backend",
            )

        return [llm_chat, llm_embed]

    def prompts(self) -> list[str]:
        return [str(r.messages[-1]["content"]) for r in self.requests]


def task(task_id: str, handler: str, **fields: Any) -> dict[str, Any]:
    return {"id": task_id, "handler": handler, **fields}


def goto(target: str, operator: str = "default", when: str = "") -> dict[str, Any]:
    return {"branches": [{"operator": operator, "when": when, "goto": target}]}


def chain(*tasks: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"id": "test-chain", "tasks": list(tasks), **fields}


def run_input(
    definition: dict[str, Any],
    value: Any,
    tenant_id: str = "default",
    options: RunOptions = OPTIONS,
) -> ChainRunInput:
    return ChainRunInput(chain=definition, input=value, tenant_id=tenant_id, options=options)


def new_id() -> str:
    return f"chain-test-{uuid.uuid4().hex}"


@contextlib.asynccontextmanager
async def running_worker(env: WorkflowEnvironment, llm: MockLLM) -> AsyncIterator[str]:
    queue = f"chain-tests-{uuid.uuid4().hex}"
    async with Worker(
        env.client,
        task_queue=queue,
        workflows=[ChainWorkflow],
        activities=[*llm.activities(), *RunStoreActivities(records_db()).activities()],
        workflow_runner=RUNNER,
        workflow_failure_exception_types=WORKFLOW_FAILURE_TYPES,
    ):
        yield queue


async def run_chain(
    env: WorkflowEnvironment,
    definition: dict[str, Any],
    value: Any = None,
    llm: MockLLM | None = None,
    tenant_id: str = "default",
    workflow_id: str | None = None,
    options: RunOptions = OPTIONS,
) -> dict[str, Any]:
    async with running_worker(env, llm or MockLLM()) as queue:
        result: dict[str, Any] = await env.client.execute_workflow(
            "ChainWorkflow",
            run_input(definition, value, tenant_id, options),
            id=workflow_id or new_id(),
            task_queue=queue,
            execution_timeout=RUN_TIMEOUT,
            result_type=dict,
        )
    return result


async def fail_chain(
    env: WorkflowEnvironment,
    definition: dict[str, Any],
    value: Any = None,
    llm: MockLLM | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """Run a chain that must fail; return the ChainFailed message and the state so far."""
    with pytest.raises(WorkflowFailureError) as info:
        await run_chain(env, definition, value, llm)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError), cause
    assert cause.type == "ChainFailed"
    assert cause.non_retryable
    return cause.message, cause.details[0]["state"]


def units(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {unit["taskID"]: unit for unit in result["state"]}


async def wait_for_status(handle: WorkflowHandle[Any, Any], status: str) -> dict[str, Any]:
    for _ in range(200):
        progress: dict[str, Any] = await handle.query("progress", result_type=dict)
        if progress["status"] == status:
            return progress
        await asyncio.sleep(0.05)
    raise AssertionError(f"workflow never reached status {status!r}")
