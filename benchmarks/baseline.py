"""The yardstick: a minimal hand-written Temporal workflow making the same N model calls.

It does what a chain of N ``prompt_to_string`` tasks does on the wire (one openai chat
completion per step, each prompt built from the previous answer, same activity options) and
nothing else: no chain definition to validate, no templating, no routing, no per-step state.

This module is re-imported by the workflow sandbox for every run, like ``workflows/chain.py``,
so it imports nothing heavy: the activity lives in ``benchmarks.chain_overhead``.
"""

from dataclasses import dataclass
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

BASELINE_WORKFLOW = "BaselineChainWorkflow"
BASELINE_ACTIVITY = "baseline_chat"


@dataclass
class BaselineInput:
    model: str
    steps: int
    input: str = "go"
    # The same values as chainloom's RunOptions defaults.
    timeout: float = 300.0
    heartbeat_timeout: float = 20.0
    max_attempts: int = 5


@dataclass
class ChatCall:
    model: str
    messages: list[dict[str, str]]


@workflow.defn(name=BASELINE_WORKFLOW)
class BaselineWorkflow:
    @workflow.run
    async def run(self, params: BaselineInput) -> str:
        previous = params.input
        for step in range(1, params.steps + 1):
            call = ChatCall(
                model=params.model,
                messages=[{"role": "user", "content": f"step {step}: {previous}"}],
            )
            previous = await workflow.execute_activity(
                BASELINE_ACTIVITY,
                call,
                result_type=str,
                start_to_close_timeout=timedelta(seconds=params.timeout),
                heartbeat_timeout=timedelta(seconds=params.heartbeat_timeout),
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=1),
                    backoff_coefficient=2.0,
                    maximum_interval=timedelta(seconds=30),
                    maximum_attempts=params.max_attempts,
                ),
            )
        return previous
