"""The Temporal Schedules chainloom needs, created or updated by every worker on start."""

import logging
from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from core.config import Settings
from workflows.contracts import RUN_KIND, STATE_SYNC_WORKFLOW

log = logging.getLogger(__name__)


def state_sync_id(settings: Settings) -> str:
    return f"chainloom-state-sync-{settings.task_queue}"


def _state_sync(settings: Settings) -> Schedule:
    return Schedule(
        action=ScheduleActionStartWorkflow(
            STATE_SYNC_WORKFLOW,
            id=f"state-sync-{settings.task_queue}",
            task_queue=settings.task_queue,
            execution_timeout=timedelta(minutes=10),
            typed_search_attributes=TypedSearchAttributes(
                [SearchAttributePair(RUN_KIND, "state-sync")]
            ),
        ),
        spec=ScheduleSpec(
            intervals=[ScheduleIntervalSpec(every=timedelta(seconds=settings.sync_interval))]
        ),
        # One pass at a time: a slow pass makes the next one wait, never run twice.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )


async def ensure_state_sync(client: Client, settings: Settings) -> None:
    schedule = _state_sync(settings)
    try:
        await client.create_schedule(state_sync_id(settings), schedule, trigger_immediately=True)
        log.info("created schedule %s", state_sync_id(settings))
    except ScheduleAlreadyRunningError:

        def update(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(state_sync_id(settings)).update(update)
