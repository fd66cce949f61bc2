"""Event triggers (seed 003 functionstore.EventTrigger): an appended event starts the function
of every trigger listening for its type, each as its own durable ``FunctionWorkflow``.

Dispatch only starts workflows (one quick RPC each, concurrently); the functions run on
workers. A function's ``sendEvent`` appends with depth + 1, so a chain of triggers that loops
back on itself is cut at ``CHAINLOOM_TRIGGER_MAX_DEPTH`` with a recorded error event.
"""

import asyncio
import logging
import uuid
from datetime import timedelta
from typing import Any

from sqlmodel import col, select
from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from core.config import Settings
from core.db import Database
from core.events.store import ClientSource, append_system_event, event_json
from core.models import EventRow, EventTriggerRow, rfc3339
from workflows.contracts import FUNCTION_WORKFLOW, search_attributes
from workflows.types import FunctionRunInput

log = logging.getLogger("chainloom.triggers")

DEPTH_EXCEEDED = "chainloom.trigger.depth_exceeded"
DISPATCH_FAILED = "chainloom.trigger.dispatch_failed"
# Events the dispatcher records about itself; they never fire triggers, so a trigger error
# can never feed another one.
SYSTEM_EVENT_TYPES = frozenset({DEPTH_EXCEEDED, DISPATCH_FAILED})
START_TIMEOUT = timedelta(seconds=10)
# Workflow ids derive from (event id, trigger): a dispatch repeated for the same event (a
# retried activity) finds the workflow already started instead of running the function twice.
_WORKFLOW_ID_NAMESPACE = uuid.UUID("7c0f5a3e-4a51-4c43-9a8e-2f0f6f1d9b11")


def trigger_json(row: EventTriggerRow) -> dict[str, Any]:
    return {
        "name": row.name,
        "description": row.description,
        "listenFor": {"type": row.listen_for_type},
        "type": row.type,
        "function": row.function_name,
        "createdAt": rfc3339(row.created_at),
        "updatedAt": rfc3339(row.updated_at),
    }


def triggers_for_type(db: Database, tenant_id: str, event_type: str) -> list[EventTriggerRow]:
    query = (
        select(EventTriggerRow)
        .where(
            EventTriggerRow.tenant_id == tenant_id, EventTriggerRow.listen_for_type == event_type
        )
        .order_by(col(EventTriggerRow.created_at))
    )
    with db.session() as session:
        return list(session.exec(query).all())


def trigger_workflow_id(function: str, event_id: str, trigger: str) -> str:
    return f"fn-{function}-{uuid.uuid5(_WORKFLOW_ID_NAMESPACE, f'{event_id}/{trigger}')}"


async def resolve_client(source: ClientSource) -> Client:
    if isinstance(source, Client):
        return source
    return await source()


async def dispatch_triggers(
    client: ClientSource,
    settings: Settings,
    db: Database,
    tenant_id: str,
    event: EventRow | dict[str, Any],
    depth: int,
) -> list[str]:
    """Start the function of every trigger on this event's type; the started workflow ids.

    Never raises: it runs after the append has been answered, so every failure is logged and
    recorded as an event (chainloom.trigger.depth_exceeded / .dispatch_failed) instead.
    """
    stored = event_json(event) if isinstance(event, EventRow) else event
    try:
        return await _dispatch(client, settings, db, tenant_id, stored, depth)
    except Exception:
        log.exception("dispatching triggers for event %s failed", stored.get("id"))
        return []


async def _dispatch(
    client: ClientSource,
    settings: Settings,
    db: Database,
    tenant_id: str,
    event: dict[str, Any],
    depth: int,
) -> list[str]:
    if event["event_type"] in SYSTEM_EVENT_TYPES:
        return []
    triggers = await asyncio.to_thread(triggers_for_type, db, tenant_id, event["event_type"])
    if not triggers:
        return []
    if depth >= settings.trigger_max_depth:
        for trigger in triggers:
            log.warning(
                "trigger %r not run for event %s: depth %d reached the limit %d",
                trigger.name,
                event["id"],
                depth,
                settings.trigger_max_depth,
            )
            await _record(
                db,
                tenant_id,
                DEPTH_EXCEEDED,
                trigger,
                event,
                depth,
                f"trigger chain depth {depth} reached CHAINLOOM_TRIGGER_MAX_DEPTH="
                f"{settings.trigger_max_depth}; function {trigger.function_name!r} was not "
                "started (does a function emit an event that triggers itself?)",
                max_depth=settings.trigger_max_depth,
            )
        return []
    try:
        temporal = await resolve_client(client)
    except Exception as err:
        for trigger in triggers:
            await _failed(db, tenant_id, trigger, event, depth, err)
        return []
    results = await asyncio.gather(
        *(_start(temporal, settings, tenant_id, trigger, event, depth) for trigger in triggers),
        return_exceptions=True,
    )
    started: list[str] = []
    for trigger, result in zip(triggers, results, strict=True):
        if isinstance(result, BaseException):
            await _failed(db, tenant_id, trigger, event, depth, result)
        elif result:
            started.append(result)
    return started


async def _start(
    client: Client,
    settings: Settings,
    tenant_id: str,
    trigger: EventTriggerRow,
    event: dict[str, Any],
    depth: int,
) -> str:
    workflow_id = trigger_workflow_id(trigger.function_name, event["id"], trigger.name)
    params = FunctionRunInput(
        tenant_id=tenant_id,
        function=trigger.function_name,
        input=event,
        depth=depth,
        trigger=trigger.name,
        workflow_id=workflow_id,
    )
    try:
        await client.start_workflow(
            FUNCTION_WORKFLOW,
            params,
            id=workflow_id,
            task_queue=settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=search_attributes(tenant_id, "function"),
            static_summary=(
                f"function {trigger.function_name} on {event['event_type']} "
                f"(trigger {trigger.name})"
            ),
            rpc_timeout=START_TIMEOUT,
        )
    except WorkflowAlreadyStartedError:
        log.info(
            "workflow %s already started; event %s dispatched before", workflow_id, event["id"]
        )
        return ""
    return workflow_id


async def _failed(
    db: Database,
    tenant_id: str,
    trigger: EventTriggerRow,
    event: dict[str, Any],
    depth: int,
    err: BaseException,
) -> None:
    log.error(
        "trigger %r could not start function %r for event %s: %s",
        trigger.name,
        trigger.function_name,
        event["id"],
        err,
    )
    # No outbox yet: the failure is recorded, not retried; POST /replay or a new append does.
    await _record(
        db,
        tenant_id,
        DISPATCH_FAILED,
        trigger,
        event,
        depth,
        f"could not start function {trigger.function_name!r}: {type(err).__name__}: {err}",
    )


async def _record(
    db: Database,
    tenant_id: str,
    event_type: str,
    trigger: EventTriggerRow,
    event: dict[str, Any],
    depth: int,
    error: str,
    **extra: Any,
) -> None:
    data = {
        "trigger": trigger.name,
        "function": trigger.function_name,
        "event_id": event["id"],
        "event_nid": event.get("nid"),
        "event_type": event["event_type"],
        "depth": depth,
        "error": error,
        **extra,
    }
    try:
        await asyncio.to_thread(append_system_event, db, tenant_id, event_type, data, depth)
    except Exception:
        log.exception("could not record %s for event %s", event_type, event["id"])
