"""ChainWorkflow on a real Temporal dev server: template bombs, outputs and results over the
limits, and exceptions from the interpreter fail the task or the run with a readable error,
instead of a workflow task that fails and retries forever (see tests/chain_harness.py)."""

import time
from dataclasses import replace
from typing import Any

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from chains import engine
from tests.chain_harness import (
    OPTIONS,
    RUN_TIMEOUT,
    RUNNER,
    MockLLM,
    chain,
    fail_chain,
    goto,
    new_id,
    run_chain,
    running_worker,
    task,
    units,
)
from workflows.chain import ChainWorkflow
from workflows.types import ChainRunInput, RunOptions

# The three bombs of the outside probe (issue #16): without limits the first fails every
# workflow task on Temporal's payload limit, the second trips the SDK's deadlock detector,
# the third takes the worker to gigabytes.
BOMBS = {
    "output": "{{ 'a' * 5*10**7 }}",
    "loops": "{% for i in range(100000) %}{% for j in range(1000) %}{{ i }}{% endfor %}"
    "{% endfor %}",
    "memory": "{{ ('a' * 2*10**9)|length }}",
}
# A render that stays under one render's budget but not far under it (~90k operations).
HEAVY = "{% for i in range(90000) %}{% endfor %}ok"


async def _run(env: WorkflowEnvironment, definition: dict[str, Any], options: RunOptions) -> Any:
    async with running_worker(env, MockLLM()) as queue:
        return await env.client.execute_workflow(
            "ChainWorkflow",
            ChainRunInput(chain=definition, input="in", options=options),
            id=new_id(),
            task_queue=queue,
            execution_timeout=RUN_TIMEOUT,
            result_type=dict,
        )


@pytest.mark.parametrize("bomb", list(BOMBS))
async def test_template_bombs_fail_the_task_and_the_run(
    env: WorkflowEnvironment, bomb: str
) -> None:
    started = time.monotonic()
    message, state = await fail_chain(
        env, chain(task("bomb", "noop", output_template=BOMBS[bomb])), "x"
    )
    # Failed by the chain itself (a ChainFailed, checked by fail_chain), not by the harness's
    # 30 s execution timeout: the task failed at its first attempt.
    assert time.monotonic() - started < RUN_TIMEOUT.total_seconds()
    assert message.startswith("task 'bomb' (noop) failed: template error: template over a limit:")
    [unit] = state
    assert unit["attempt"] == 1
    assert unit["error"]["error"].startswith("template error: template over a limit")


async def test_loop_bomb_with_on_failure_jumps_to_the_failure_task(
    env: WorkflowEnvironment,
) -> None:
    definition = chain(
        task(
            "bomb",
            "noop",
            output_template=BOMBS["loops"],
            transition={"on_failure": "recover", **goto("end")},
        ),
        task("recover", "noop", output_template="recovered after: {{ error }}"),
    )
    result = await run_chain(env, definition, "x")
    assert result["output"].startswith(
        "recovered after: template error: template over a limit: template did more than "
        "100000 operations"
    )
    assert units(result)["bomb"]["error"]["error"].startswith("template error:")


async def test_task_output_over_the_limit_fails_the_task(env: WorkflowEnvironment) -> None:
    llm = MockLLM({"write": "z" * 600_000})
    definition = chain(
        task(
            "write",
            "prompt_to_string",
            prompt_template="write a lot",
            transition={"on_failure": "short", **goto("end")},
        ),
        task("short", "noop", output_template="{{ error }}"),
    )
    result = await run_chain(env, definition, "x", llm)
    assert result["output"] == (
        "output is 600002 bytes, over the 524288-byte limit for one task's output "
        "(CHAINLOOM_TASK_OUTPUT_MAX_BYTES)"
    )


async def test_outputs_that_would_overflow_the_result_stay_out_of_it(
    env: WorkflowEnvironment,
) -> None:
    """Three outputs just under a task's limit (each also the next task's input) would make a
    result over Temporal's 2 MB payload limit, so a run recorded before bounded chains failed
    it readably (CHAINLOOM_RUN_RESULT_MAX_BYTES); now they live in the run's records and the
    result holds handles: the run completes with a small result."""
    big = "{{ 'x' * 500000 }}"
    definition = chain(
        task("a", "noop", output_template=big, transition=goto("b")),
        task("b", "noop", output_template=big, transition=goto("c")),
        task("c", "noop", output_template=big),
    )
    result = await _run(env, definition, OPTIONS)
    assert [u["taskID"] for u in result["state"]] == ["a", "b", "c"]
    assert engine.payload_size(result) < 100_000
    assert "$stored" in result["output"]


def test_state_is_trimmed_to_fit_a_payload() -> None:
    big = [{"taskID": f"t{i}", "input": "i" * 10_000, "output": "o" * 10_000} for i in range(3)]
    trimmed = engine.trim_state(big, 25_000)
    assert engine.payload_size(trimmed) <= 25_000
    assert [u["taskID"] for u in trimmed] == ["t0", "t1", "t2"]
    many = [{"taskID": f"t{i}", "output": "ok"} for i in range(10_000)]
    trimmed = engine.trim_state(many, 10_000)
    assert engine.payload_size(trimmed) <= 10_000
    assert trimmed[-1]["taskID"] == "t9999" and len(trimmed) > 100
    assert engine.trim_state(big[:1], 25_000) == big[:1]


async def test_interpreter_exceptions_fail_the_run(env: WorkflowEnvironment) -> None:
    """A `gt` branch whose `when` is no number raises ValueError in workflow code; with
    worker.WORKFLOW_FAILURE_TYPES the run fails with it instead of retrying forever."""
    definition = chain(
        task(
            "check",
            "noop",
            transition={"branches": [{"operator": "gt", "when": "many", "goto": "end"}]},
        )
    )
    with pytest.raises(WorkflowFailureError) as info:
        await run_chain(env, definition, "7")
    cause = info.value.cause
    assert isinstance(cause, ApplicationError), cause
    assert cause.type == "ValueError"
    assert "could not convert string to float: 'many'" in cause.message


async def test_renders_in_one_workflow_task_share_a_budget(env: WorkflowEnvironment) -> None:
    """Deterministic tasks in a row run in one workflow task, before the worker reports back:
    their renders share four times one render's operations. A model call in between starts a
    new workflow task, and a new budget."""
    back_to_back = chain(
        *[
            task(f"t{i}", "noop", output_template=HEAVY, transition=goto(f"t{i + 1}"))
            for i in range(6)
        ],
        task("t6", "noop"),
    )
    message, state = await fail_chain(env, back_to_back, "x")
    assert "the templates rendered since the run last waited used up their 400000" in message
    assert [u["output"] for u in state[:-1]] == ["ok"] * (len(state) - 1)
    assert 3 <= len(state) <= 5

    tasks: list[dict[str, Any]] = []
    for i in range(6):
        tasks.append(task(f"t{i}", "noop", output_template=HEAVY, transition=goto(f"ask{i}")))
        tasks.append(
            task(
                f"ask{i}", "prompt_to_string", prompt_template="go on", transition=goto(f"t{i + 1}")
            )
        )
    tasks.append(task("t6", "noop", output_template=HEAVY))
    result = await run_chain(env, chain(*tasks), "x")
    assert result["output"] == "ok"


async def test_limit_failures_replay(env: WorkflowEnvironment) -> None:
    definition = chain(
        task("ok", "noop", output_template=HEAVY, transition=goto("bomb")),
        task(
            "bomb",
            "noop",
            output_template=BOMBS["loops"],
            transition={"on_failure": "done", **goto("end")},
        ),
        task("done", "noop", output_template="{{ error|length }}"),
    )
    workflow_id = new_id()
    async with running_worker(env, MockLLM()) as queue:
        handle = await env.client.start_workflow(
            "ChainWorkflow",
            ChainRunInput(chain=definition, input="x", options=replace(OPTIONS)),
            id=workflow_id,
            task_queue=queue,
            execution_timeout=RUN_TIMEOUT,
        )
        await handle.result()
        history = await handle.fetch_history()
    replayed = await Replayer(workflows=[ChainWorkflow], workflow_runner=RUNNER).replay_workflow(
        history
    )
    assert replayed.replay_failure is None
