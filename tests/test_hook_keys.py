"""Hook idempotency keys: the same for Temporal's retries of one call, new for each
retry_on_failure attempt of the task (the task is meant to run again), behind a patch so a
history recorded before it replays.

The hook and LLM activities are mocked by name on a WorkflowEnvironment worker; the first
call of each hook task fails for good (PermanentToolError), so retry_on_failure runs it again.
``tests/histories/chain_hook_keys.d6a8496.json`` was recorded by the code before the patch (keys
without the attempt) with this very chain: ``python -m tests.test_hook_keys --record FILE``
records a new one with the code checked out.
"""

import asyncio
import base64
import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.client import WorkflowHistory
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from tests.chain_harness import RUN_TIMEOUT, RUNNER, new_id, run_input
from workflows.chain import ChainWorkflow
from workflows.types import LLMRequest, LLMResult, ToolCallRequest, ToolSpec, ToolsRequest

HISTORY = Path(__file__).parent / "histories" / "chain_hook_keys.d6a8496.json"

CHAIN: dict[str, Any] = {
    "id": "hook-keys",
    "tasks": [
        {
            "id": "post",
            "handler": "hook",
            "hook": {"name": "svc", "tool_name": "send", "args": {"text": "{{ input }}"}},
            "retry_on_failure": 1,
            "transition": {"branches": [{"operator": "default", "goto": "chat"}]},
        },
        {
            "id": "chat",
            "handler": "chat_completion",
            "input_var": "input",
            "execute_config": {"model": "m", "hooks": ["svc"]},
            "transition": {"branches": [{"operator": "default", "goto": "tools"}]},
        },
        {"id": "tools", "handler": "execute_tool_calls", "retry_on_failure": 1},
    ],
}


class Mocks:
    """hook_tools, hook_call and llm_chat; each hook task's first call fails for good."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self._failed: set[str] = set()

    def activities(self) -> list[Callable[..., Any]]:
        @activity.defn(name="hook_call")
        async def hook_call(req: ToolCallRequest) -> dict[str, Any]:
            self.keys.append(req.idempotency_key)
            if req.task_id not in self._failed:
                self._failed.add(req.task_id)
                raise ApplicationError("no", type="PermanentToolError", non_retryable=True)
            return {"output": f"ok {req.task_id}", "status": 200}

        @activity.defn(name="hook_tools")
        async def hook_tools(req: ToolsRequest) -> list[ToolSpec]:
            return [ToolSpec("svc.send", "Sends.", {"type": "object", "properties": {}})]

        @activity.defn(name="llm_chat")
        async def llm_chat(req: LLMRequest) -> LLMResult:
            call = {"id": "call_1", "type": "function", "function": {"name": "svc.send"}}
            call["function"]["arguments"] = "{}"  # type: ignore[index]
            return LLMResult(content="", model="m", backend="b", tool_calls=[call])

        return [hook_call, hook_tools, llm_chat]


async def run(env: WorkflowEnvironment, workflow: type = ChainWorkflow) -> tuple[Any, Mocks]:
    mocks = Mocks()
    queue = f"hook-keys-{uuid.uuid4().hex}"
    async with Worker(
        env.client,
        task_queue=queue,
        workflows=[workflow],
        activities=mocks.activities(),
        workflow_runner=RUNNER,
    ):
        handle = await env.client.start_workflow(
            "ChainWorkflow",
            run_input(CHAIN, "hi"),
            id=new_id(),
            task_queue=queue,
            execution_timeout=RUN_TIMEOUT,
        )
        result = await handle.result()
        history = await handle.fetch_history()
    assert [u["attempt"] for u in result["state"]] == [2, 1, 2]
    return history, mocks


async def test_each_retry_on_failure_attempt_sends_a_new_key(env: WorkflowEnvironment) -> None:
    history, mocks = await run(env)
    wid = history.workflow_id
    assert mocks.keys == [
        f"{wid}/post/1/1",
        f"{wid}/post/1/2",
        f"{wid}/tools/3/1/call_1",
        f"{wid}/tools/3/2/call_1",
    ]
    replayed = await Replayer(workflows=[ChainWorkflow], workflow_runner=RUNNER).replay_workflow(
        history
    )
    assert replayed.replay_failure is None


async def test_a_history_from_before_the_patch_replays_with_its_old_keys() -> None:
    text = HISTORY.read_text()
    scheduled = [
        event["activityTaskScheduledEventAttributes"]
        for event in json.loads(text)["events"]
        if "activityTaskScheduledEventAttributes" in event
    ]
    keys = [
        json.loads(base64.b64decode(a["input"]["payloads"][0]["data"]))["idempotency_key"]
        for a in scheduled
        if a["activityType"]["name"] == "hook_call"
    ]
    wid = keys[0].split("/")[0]
    history = WorkflowHistory.from_json(wid, text)
    # Recorded before the patch: both attempts of a task sent the same key.
    assert keys == [f"{wid}/post/1"] * 2 + [f"{wid}/tools/3/call_1"] * 2
    replayed = await Replayer(workflows=[ChainWorkflow], workflow_runner=RUNNER).replay_workflow(
        history
    )
    assert replayed.replay_failure is None


async def _record(path: Path) -> None:
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=__import__("core.devserver").devserver.temporal_binary()
    )
    try:
        history, mocks = await run(env)
        print("keys:", mocks.keys)
        await asyncio.to_thread(path.write_text, history.to_json())
    finally:
        await env.shutdown()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--record":
        sys.exit("usage: python -m tests.test_hook_keys --record FILE")
    asyncio.run(_record(Path(sys.argv[2])))
