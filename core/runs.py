"""Starting chain runs: the one door used by the API, the JS `executeTaskChain` builtin and
anything else that launches a chain.

The run row (run id -> workflow id, tenant, chain) is written before the workflow starts, so
a run that exists in Temporal always exists here too; its status is never copied back: it is
read from Temporal (visibility, queries, the result).
"""

import asyncio
import contextlib
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import select
from temporalio.client import Client, WorkflowHandle
from temporalio.exceptions import WorkflowAlreadyStartedError

from chains.spec import ChainDefinition
from core.config import Settings
from core.db import Database
from core.models import RunRow
from workflows.contracts import chain_workflow_id, start_chain_workflow
from workflows.types import ChainRunInput, RunOptions


def run_options(settings: Settings) -> RunOptions:
    """Timeouts and attempts fixed when a run starts, so workflow code never reads settings."""
    return RunOptions(
        llm_max_attempts=settings.llm_max_attempts,
        llm_timeout=settings.llm_timeout,
        llm_heartbeat_timeout=settings.llm_heartbeat_timeout,
        tool_heartbeat_timeout=settings.tool_heartbeat_timeout,
        retry_initial_interval=settings.retry_initial_interval,
    )


def _record(db: Database, row: RunRow, existing_ok: bool) -> RunRow:
    with db.session() as session:
        session.add(row)
        try:
            session.commit()
            session.refresh(row)
            return row
        except IntegrityError:
            session.rollback()
            if not existing_ok:
                raise
            found = session.exec(select(RunRow).where(RunRow.workflow_id == row.workflow_id)).one()
            return found


def _forget(db: Database, run_id: str) -> None:
    with db.session() as session:
        row = session.get(RunRow, run_id)
        if row is not None:
            session.delete(row)
            session.commit()


async def start_chain_run(
    db: Database,
    client: Client,
    settings: Settings,
    tenant_id: str,
    chain: ChainDefinition,
    input: Any = None,
    *,
    input_type: str = "string",
    workflow_id: str | None = None,
    summary: str = "",
    existing_ok: bool = False,
) -> tuple[RunRow, WorkflowHandle[Any, Any]]:
    """Record a run of `chain` and start its workflow.

    `workflow_id` lets a caller that may be retried (an activity) derive the id from its own
    identity; with `existing_ok` a second start with the same id finds the first run instead
    of failing, so a retry never starts a chain twice.
    """
    row = RunRow(
        tenant_id=tenant_id,
        workflow_id=workflow_id or chain_workflow_id(chain.id),
        chain_id=chain.id,
    )
    row = await asyncio.to_thread(_record, db, row, existing_ok)
    params = ChainRunInput(
        chain=chain.model_dump(mode="json"),
        input=input,
        input_type=input_type,
        tenant_id=tenant_id,
        options=run_options(settings),
    )
    try:
        handle = await start_chain_workflow(
            client,
            params,
            workflow_id=row.workflow_id,
            run_id=row.id,
            tenant_id=tenant_id,
            chain_id=chain.id,
            task_queue=settings.task_queue,
            summary=summary,
            task_timeout=settings.workflow_task_timeout,
        )
    except WorkflowAlreadyStartedError:
        if not existing_ok:
            raise
        handle = client.get_workflow_handle(row.workflow_id)
    except BaseException:
        # Nothing started: a row without a workflow would list a run that never existed.
        with contextlib.suppress(Exception):
            await asyncio.to_thread(_forget, db, row.id)
        raise
    return row, handle
