"""StateSyncWorkflow: one pass over every backend, started by a Temporal Schedule.

A Schedule (not a home-made loop) means one pass at a time across all workers (overlap is
skipped), visible and pausable in the Temporal UI.
"""

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy

SYNC_ACTIVITY = "sync_backends"


@workflow.defn(name="StateSyncWorkflow")
class StateSyncWorkflow:
    @workflow.run
    async def run(self) -> dict[str, Any]:
        result: dict[str, Any] = await workflow.execute_activity(
            SYNC_ACTIVITY,
            start_to_close_timeout=timedelta(minutes=5),
            retry_policy=RetryPolicy(maximum_attempts=2),
        )
        return result
