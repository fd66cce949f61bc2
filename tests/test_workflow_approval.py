"""ChainWorkflow approvals: the approve update and its validator, RunPhase, timeouts, and the
histories recorded when approvals were a signal (see tests/chain_harness.py for the set-up)."""

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from tests.chain_harness import (
    RUN_TIMEOUT,
    RUNNER,
    MockLLM,
    chain,
    goto,
    new_id,
    run_chain,
    run_input,
    running_worker,
    task,
    units,
    wait_for_status,
)
from workflows.chain import ChainWorkflow
from workflows.contracts import APPROVE_UPDATE, RUN_NOT_WAITING, RUN_PHASE
from workflows.types import ApprovalAccepted, ApprovalDecision, LLMRequest, LLMResult

HISTORIES = Path(__file__).parent / "histories"

APPROVAL_CHAIN = chain(
    task(
        "draft", "prompt_to_string", prompt_template="Draft {{ input }}", transition=goto("review")
    ),
    task(
        "review",
        "approval",
        timeout="1s",
        transition={
            "branches": [
                {"operator": "equals", "when": "approved", "goto": "publish"},
                {"operator": "equals", "when": "rejected", "goto": "revise"},
            ]
        },
    ),
    task("publish", "noop", input_var="draft", print="Published: {{ draft }}"),
    task("revise", "noop", output_template="revise: {{ review.reason }}"),
)


class GatedLLM(MockLLM):
    """Answers only once `release` is set, so a test can act while the run is on that task."""

    def __init__(self, rules: dict[str, Any]) -> None:
        super().__init__(rules)
        self.called = asyncio.Event()
        self.release = asyncio.Event()

    def activities(self) -> list[Callable[..., Any]]:
        chat, embed = super().activities()

        @activity.defn(name="llm_chat")
        async def llm_chat(request: LLMRequest) -> LLMResult:
            self.called.set()
            await self.release.wait()
            result: LLMResult = await chat(request)
            return result

        return [llm_chat, embed]


def _waiting_chain(timeout: str = "20s") -> dict[str, Any]:
    definition = {**APPROVAL_CHAIN, "tasks": [dict(t) for t in APPROVAL_CHAIN["tasks"]]}
    definition["tasks"][1]["timeout"] = timeout
    return definition


async def _phase(handle: WorkflowHandle[Any, Any]) -> str | None:
    desc = await handle.describe()
    return desc.typed_search_attributes.get(RUN_PHASE)


async def test_approval_update(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Draft": "Big news"})
    async with running_worker(env, llm) as queue:
        handle = await env.client.start_workflow(
            "ChainWorkflow",
            run_input(_waiting_chain(), "launch"),
            id=new_id(),
            task_queue=queue,
            execution_timeout=RUN_TIMEOUT,
        )
        progress = await wait_for_status(handle, "waiting")
        assert progress["currentTask"] == "review"
        assert [u["taskID"] for u in progress["state"]] == ["draft"]
        assert await _phase(handle) == "waiting"
        decision = ApprovalDecision(approved=True, comment="lgtm", payload={"n": 1}, by="alice")
        accepted = await handle.execute_update(
            APPROVE_UPDATE, decision, result_type=ApprovalAccepted
        )
        assert accepted == ApprovalAccepted(
            task_id="review", approved=True, comment="lgtm", payload={"n": 1}, by="alice"
        )
        result: dict[str, Any] = await handle.result()
        assert await _phase(handle) == "running"
        history = await handle.fetch_history()
    review = units(result)["review"]
    assert review["output"] == {
        "approved": True,
        "comment": "lgtm",
        "payload": {"n": 1},
        "by": "alice",
    }
    assert review["transition"] == "approved"
    assert units(result)["publish"]["print"] == "Published: Big news"
    assert result["output"] == "Big news"
    await Replayer(workflows=[ChainWorkflow], workflow_runner=RUNNER).replay_workflow(history)


async def test_early_approval_is_refused_and_never_kept(env: WorkflowEnvironment) -> None:
    llm = GatedLLM({"Draft": "Big news"})
    async with running_worker(env, llm) as queue:
        handle = await env.client.start_workflow(
            "ChainWorkflow",
            run_input(_waiting_chain(), "launch"),
            id=new_id(),
            task_queue=queue,
            execution_timeout=RUN_TIMEOUT,
        )
        await asyncio.wait_for(llm.called.wait(), 10)  # the run is on `draft`, its call held
        early = ApprovalDecision(approved=True, comment="too soon", by="eager")
        with pytest.raises(WorkflowUpdateFailedError) as refused:
            await handle.execute_update(APPROVE_UPDATE, early, result_type=ApprovalAccepted)
        cause = refused.value.cause
        assert isinstance(cause, ApplicationError) and cause.type == RUN_NOT_WAITING
        assert cause.details[0] == {"currentTask": "draft"}
        assert "on task 'draft'" in cause.message
        # The legacy signal no longer approves in advance either.
        await handle.signal("approve", early)
        assert await _phase(handle) is None  # no approval task reached yet
        llm.release.set()
        await wait_for_status(handle, "waiting")
        await asyncio.sleep(0.3)  # a decision kept from before would have moved it on by now
        assert (await handle.query("progress"))["status"] == "waiting"
        late = ApprovalDecision(approved=True, comment="now", by="patient")
        accepted = await handle.execute_update(APPROVE_UPDATE, late, result_type=ApprovalAccepted)
        assert (accepted.task_id, accepted.approved, accepted.by) == ("review", True, "patient")
        result: dict[str, Any] = await handle.result()
        # Too late: the run has finished, the update is refused by the server.
        with pytest.raises(RPCError):
            await handle.execute_update(APPROVE_UPDATE, late, result_type=ApprovalAccepted)
    review = units(result)["review"]
    assert review["output"]["comment"] == "now" and review["output"]["by"] == "patient"
    assert result["output"] == "Big news"


async def test_approval_timeout_rejects(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"Draft": "Big news"})
    result = await run_chain(env, APPROVAL_CHAIN, "launch", llm)
    review = units(result)["review"]
    assert review["output"] == {
        "approved": False,
        "comment": "",
        "payload": None,
        "reason": "timeout",
    }
    assert review["transition"] == "rejected"
    assert review["duration"] >= 1_000_000_000
    assert result["output"] == "revise: timeout"
