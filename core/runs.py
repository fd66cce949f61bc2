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
from temporalio.service import RPCError, RPCStatusCode

from chains.spec import ChainDefinition
from core.config import Settings
from core.db import Database
from core.models import RunRow
from core.runstate import records
from workflows.contracts import chain_workflow_id, start_chain_workflow
from workflows.types import ChainRunInput, RunOptions, StoreAs


class RunInputTooLarge(ValueError):
    """The chain and input of a run encode to more than CHAINLOOM_MAX_RUN_INPUT_BYTES (or more
    than Temporal accepts): refused before the workflow starts."""

    def __init__(self, size: int, limit: int, *, refused_by_temporal: bool = False) -> None:
        self.size = size
        self.limit = limit
        why = (
            f"Temporal refused it as too large (CHAINLOOM_MAX_RUN_INPUT_BYTES={limit} is set "
            "above what this Temporal server accepts)"
            if refused_by_temporal
            else f"over the limit of {limit} bytes (CHAINLOOM_MAX_RUN_INPUT_BYTES)"
        )
        super().__init__(
            f"the chain definition and input of this run encode to {size} bytes, {why}: pass "
            "large data by reference (a URL, an id) instead of inline"
        )


async def encoded_size(client: Client, params: Any) -> int:
    """The bytes `params` takes as a workflow argument, after the client's converter and codec:
    what Temporal measures against its payload limit (2 MiB per payload by default)."""
    payloads = await client.data_converter.encode([params])
    return sum(p.ByteSize() for p in payloads)


def _too_large_for_temporal(err: RPCError) -> bool:
    # Over the blob limit (INVALID_ARGUMENT), or over the 4 MB gRPC message (RESOURCE_EXHAUSTED).
    text = err.message.lower()
    return (err.status == RPCStatusCode.INVALID_ARGUMENT and "size exceeds" in text) or (
        err.status == RPCStatusCode.RESOURCE_EXHAUSTED and "larger than max" in text
    )


def run_options(settings: Settings) -> RunOptions:
    """Timeouts and attempts fixed when a run starts, so workflow code never reads settings."""
    return RunOptions(
        llm_max_attempts=settings.llm_max_attempts,
        llm_timeout=settings.llm_timeout,
        llm_heartbeat_timeout=settings.llm_heartbeat_timeout,
        template_max_output_bytes=settings.template_max_output_bytes,
        template_max_operations=settings.template_max_operations,
        task_output_max_bytes=settings.task_output_max_bytes,
        run_result_max_bytes=settings.run_result_max_bytes,
        steps_per_run=settings.chain_steps_per_run,
        value_limit=settings.chain_value_limit,
        output_max_bytes=settings.chain_output_max_bytes,
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
    options = run_options(settings)
    size = 0
    try:
        # A large input starts the run as a handle (value record 0), not as a payload in
        # history.
        input = await asyncio.to_thread(
            records.keep, db, tenant_id, row.workflow_id, StoreAs(0, options.value_limit), input
        )
        params = ChainRunInput(
            chain=chain.model_dump(mode="json"),
            input=input,
            input_type=input_type,
            tenant_id=tenant_id,
            options=options,
        )
        size = await encoded_size(client, params)
        if size > settings.max_run_input_bytes:
            raise RunInputTooLarge(size, settings.max_run_input_bytes)
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
    except BaseException as err:
        # Nothing started: a row without a workflow would list a run that never existed.
        with contextlib.suppress(Exception):
            await asyncio.to_thread(_forget, db, row.id)
        if isinstance(err, RPCError) and _too_large_for_temporal(err):
            # CHAINLOOM_MAX_RUN_INPUT_BYTES set above what this Temporal accepts.
            raise RunInputTooLarge(
                size, settings.max_run_input_bytes, refused_by_temporal=True
            ) from err
        raise
    return row, handle
