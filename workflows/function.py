"""FunctionWorkflow: one run of a stored JS function, e.g. started by an event trigger.

The function itself runs in the `js_run` activity; this workflow gives the run a durable
identity (workflow id `fn-<function>-<uuid>`), a place in the Temporal UI, and retries for a
worker lost mid-call. A script error, a limit or an unknown function fails the run at once.
"""

import dataclasses
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from workflows.contracts import (
        FUNCTION_FAILED,
        FUNCTION_WORKFLOW,
        JS_RUN,
        PERMANENT_TOOL_ERROR,
        failure_message,
    )
    from workflows.types import FunctionRunInput, FunctionRunResult

# Above the default wall time of a call (CHAINLOOM_JS_WALL_TIMEOUT, 60 s), which the
# activity enforces itself; this only catches a worker that vanished mid-call.
RUN_TIMEOUT = timedelta(seconds=150)
# js_run beats while the script runs and while it waits on builtins, so a worker lost
# mid-call is noticed after this long (timeouts are not part of what a replay compares).
HEARTBEAT_TIMEOUT = timedelta(seconds=10)


@workflow.defn(name=FUNCTION_WORKFLOW)
class FunctionWorkflow:
    @workflow.run
    async def run(self, params: FunctionRunInput) -> FunctionRunResult:
        if not params.workflow_id:
            params = dataclasses.replace(params, workflow_id=workflow.info().workflow_id)
        try:
            return await workflow.execute_activity(
                JS_RUN,
                params,
                result_type=FunctionRunResult,
                start_to_close_timeout=RUN_TIMEOUT,
                heartbeat_timeout=HEARTBEAT_TIMEOUT,
                retry_policy=RetryPolicy(
                    initial_interval=timedelta(seconds=1),
                    maximum_interval=timedelta(seconds=30),
                    maximum_attempts=3,
                    non_retryable_error_types=[PERMANENT_TOOL_ERROR],
                ),
                summary=f"js {params.function}",
            )
        except ActivityError as err:
            # Fail the run with the function's own message (not "activity task failed").
            raise ApplicationError(
                failure_message(err), type=FUNCTION_FAILED, non_retryable=True
            ) from err
