"""StateSyncWorkflow: one pass over every backend, started by a Temporal Schedule.

A Schedule (not a home-made loop) means one pass at a time across all workers (overlap is
skipped), visible and pausable in the Temporal UI.
"""

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from workflows.contracts import STATE_SYNC_WORKFLOW, SYNC_BACKENDS


HEARTBEAT_TIMEOUT = timedelta(seconds=10)


@workflow.defn(name=STATE_SYNC_WORKFLOW)
class StateSyncWorkflow:
    @workflow.run
    async def run(self) -> dict[str, Any]:
        result: dict[str, Any] = await workflow.execute_activity(
            SYNC_BACKENDS,
            start_to_close_timeout=timedelta(minutes=5),
            # The activity beats while it waits on backends: a lost worker's pass is retried
            # in seconds (timeouts are not part of what a replay compares).
            heartbeat_timeout=HEARTBEAT_TIMEOUT,
            retry_policy=RetryPolicy(maximum_attempts=2),
        )
        return result
