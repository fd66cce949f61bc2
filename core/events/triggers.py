"""Event triggers (seed 003 functionstore.EventTrigger): an appended event starts the function
of every trigger listening for its type, each as its own durable ``FunctionWorkflow``.

The append records the starts it owes in the trigger outbox, in its own transaction
(core/events/store.py); core/events/outbox.py starts them. This module holds what both share:
what one owed start is, its workflow id, the start itself and the events chainloom records
about triggers. A function's ``sendEvent`` appends with depth + 1, so a chain of triggers that
loops back on itself is cut at ``CHAINLOOM_TRIGGER_MAX_DEPTH`` with a recorded error event.
"""

import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from core.config import Settings
from core.models import EventTriggerRow, rfc3339
from workflows.contracts import FUNCTION_WORKFLOW, search_attributes
from workflows.types import FunctionRunInput

log = logging.getLogger("chainloom.triggers")

ClientSource = Client | Callable[[], Awaitable[Client]]

DEPTH_EXCEEDED = "chainloom.trigger.depth_exceeded"
DISPATCH_FAILED = "chainloom.trigger.dispatch_failed"
# Events the dispatcher records about itself; they never fire triggers, so a trigger error
# can never feed another one.
SYSTEM_EVENT_TYPES = frozenset({DEPTH_EXCEEDED, DISPATCH_FAILED})
START_TIMEOUT = timedelta(seconds=10)
# A start recorded in the outbox belongs to whoever is starting it for this long (the appending
# process, or the sweeper that claimed it); after that any sweeper may take it. Longer than a
# start may take, so a live process is not raced; short enough that the starts of a process
# that died are picked up within seconds.
START_LEASE = START_TIMEOUT + timedelta(seconds=5)
# Workflow ids derive from (tenant, event id, trigger): a start repeated for the same event (a
# retry, two sweepers, a retried activity) finds the workflow already started instead of
# running the function twice. The tenant is part of it because event ids are per tenant.
_WORKFLOW_ID_NAMESPACE = uuid.UUID("7c0f5a3e-4a51-4c43-9a8e-2f0f6f1d9b11")


@dataclass(frozen=True)
class OwedStart:
    """One trigger's function an event owes a start to (a row of the trigger outbox)."""

    tenant_id: str
    event_nid: int
    trigger: str
    function: str
    depth: int
    attempts: int = 0


class Listener(BaseModel):
    """seed 003 functionstore.Listener."""

    type: str = Field(..., min_length=1, max_length=200, description="The event type.")


class Trigger(BaseModel):
    """seed 003 functionstore.EventTrigger as stored and shown."""

    model_config = ConfigDict(populate_by_name=True)

    name: str
    description: str
    listen_for: Listener = Field(alias="listenFor")
    type: str
    function: str
    created_at: str = Field(alias="createdAt")
    updated_at: str = Field(alias="updatedAt")

    @classmethod
    def of(cls, row: EventTriggerRow) -> "Trigger":
        return cls(
            name=row.name,
            description=row.description,
            listen_for=Listener(type=row.listen_for_type),
            type=row.type,
            function=row.function_name,
            created_at=rfc3339(row.created_at),
            updated_at=rfc3339(row.updated_at),
        )


def trigger_json(row: EventTriggerRow) -> dict[str, Any]:
    return Trigger.of(row).model_dump(mode="json", by_alias=True)


def trigger_workflow_id(tenant_id: str, function: str, event_id: str, trigger: str) -> str:
    key = f"{tenant_id}/{event_id}/{trigger}"
    return f"fn-{function}-{uuid.uuid5(_WORKFLOW_ID_NAMESPACE, key)}"


async def resolve_client(source: ClientSource) -> Client:
    if isinstance(source, Client):
        return source
    return await source()


async def start_function(
    client: Client, settings: Settings, owed: OwedStart, event: dict[str, Any]
) -> str:
    """Start the trigger's FunctionWorkflow on the stored event; its id, "" when it had been
    started already (which counts as done)."""
    workflow_id = trigger_workflow_id(owed.tenant_id, owed.function, event["id"], owed.trigger)
    params = FunctionRunInput(
        tenant_id=owed.tenant_id,
        function=owed.function,
        input=event,
        depth=owed.depth,
        trigger=owed.trigger,
        workflow_id=workflow_id,
    )
    try:
        await client.start_workflow(
            FUNCTION_WORKFLOW,
            params,
            id=workflow_id,
            task_queue=settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=search_attributes(owed.tenant_id, "function"),
            static_summary=(
                f"function {owed.function} on {event['event_type']} (trigger {owed.trigger})"
            ),
            rpc_timeout=START_TIMEOUT,
        )
    except WorkflowAlreadyStartedError:
        log.info("workflow %s already started; event %s dispatched before", workflow_id, owed)
        return ""
    return workflow_id


def trigger_event(
    event_type: str,
    trigger: str,
    function: str,
    event: dict[str, Any],
    depth: int,
    error: str,
    **extra: Any,
) -> dict[str, Any]:
    """An event chainloom records about a trigger (depth exceeded, dispatch failed)."""
    return {
        "event_type": event_type,
        "event_source": "chainloom",
        "aggregate_type": "event_trigger",
        "aggregate_id": trigger,
        "data": {
            "trigger": trigger,
            "function": function,
            "event_id": event["id"],
            "event_nid": event.get("nid"),
            "event_type": event["event_type"],
            "depth": depth,
            "error": error,
            **extra,
        },
    }


def depth_exceeded_event(
    trigger: str, function: str, event: dict[str, Any], depth: int, max_depth: int
) -> dict[str, Any]:
    log.warning(
        "trigger %r not run for event %s: depth %d reached the limit %d",
        trigger,
        event["id"],
        depth,
        max_depth,
    )
    return trigger_event(
        DEPTH_EXCEEDED,
        trigger,
        function,
        event,
        depth,
        f"trigger chain depth {depth} reached CHAINLOOM_TRIGGER_MAX_DEPTH={max_depth}; "
        f"function {function!r} was not started (does a function emit an event that triggers "
        "itself?)",
        max_depth=max_depth,
    )
