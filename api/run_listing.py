"""GET /runs: a tenant's chain runs, one Temporal visibility call per page.

Every chain workflow carries the search attributes TenantId, RunKind, ChainId and (from its
first approval task on) RunPhase, and its run id in the memo, so one ListWorkflowExecutions
call answers a page with each run's status; one database query adds the creation times.

Order: the order of Temporal's visibility store. On the SQL store of the dev server that is
unfinished runs first, newest started first, then finished runs, most recently finished first
(its page token is the keyset close time, start time, run id; an open run's close time sorts
as 9999-12-31), as tests/test_api_runs.py checks. A run that finishes between two pages moves
from the first group to the second and can be listed twice.

The cursor is Temporal's page token, signed with a key derived from the server secret and
bound to the filter it was issued for: a cursor that was not issued for this very query is a
400, never a call to Temporal (which retries a malformed token for about ten seconds).
"""

import asyncio
import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlmodel import col, select
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from api.deps import AppState
from api.errors import APIError
from api.run_models import RunStatus, RunSummary
from api.run_service import STATUS_NAMES
from core.config import Settings
from core.models import RunRow
from core.secrets import SecretBox
from workflows.contracts import CHAIN_ID, RUN_ID_MEMO, RUN_KIND, RUN_PHASE, TENANT_ID

# What a chain id can be (chains/spec.py); anything else names no run.
_CHAIN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_MAC_BYTES = 16
_PHASE = RUN_PHASE.name

_STATUS_CLAUSES: dict[str | None, str] = {
    # A run that continued as new lists once, as the execution that carries it on.
    None: "ExecutionStatus != 'ContinuedAsNew'",
    "completed": "ExecutionStatus = 'Completed'",
    "failed": "ExecutionStatus IN ('Failed', 'Terminated', 'TimedOut')",
    "cancelled": "ExecutionStatus = 'Canceled'",
    # RunPhase is unset until a run reaches its first approval task.
    "running": f"ExecutionStatus = 'Running' AND ({_PHASE} IS NULL OR {_PHASE} != 'waiting')",
    "waiting": f"ExecutionStatus = 'Running' AND {_PHASE} = 'waiting'",
}


def _literal(value: str) -> str:
    if not value or any(ch in value for ch in "'\"\\\x00"):
        raise ValueError(f"not a safe visibility literal: {value!r}")
    return f"'{value}'"


def visibility_query(tenant_id: str, chain_id: str | None, status: str | None) -> str:
    clauses = [
        f"{TENANT_ID.name} = {_literal(tenant_id)}",
        f"{RUN_KIND.name} = 'chain'",
    ]
    if chain_id:
        clauses.append(f"{CHAIN_ID.name} = {_literal(chain_id)}")
    clauses.append(_STATUS_CLAUSES[status])
    return " AND ".join(clauses)


_KEYS: dict[tuple[str, str], bytes] = {}


def _key(settings: Settings) -> bytes:
    # Every API process derives the same key from the shared secret (SecretBox).
    ident = (settings.secret_key, str(settings.data_dir))
    key = _KEYS.get(ident)
    if key is None:
        key = _KEYS[ident] = SecretBox.from_settings(settings).derive("runs-cursor")
    return key


def _mac(key: bytes, query: str, token: bytes) -> bytes:
    return hmac.new(key, query.encode() + b"\0" + token, hashlib.sha256).digest()[:_MAC_BYTES]


def encode_cursor(key: bytes, query: str, token: bytes) -> str:
    return base64.urlsafe_b64encode(_mac(key, query, token) + token).decode().rstrip("=")


def decode_cursor(key: bytes, query: str, cursor: str) -> bytes:
    def invalid(why: str) -> APIError:
        return APIError(400, "invalid_cursor", f"cursor {cursor[:80]!r} {why}", param="cursor")

    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    except (binascii.Error, ValueError) as err:
        raise invalid("is not a cursor this API issued") from err
    mac, token = raw[:_MAC_BYTES], raw[_MAC_BYTES:]
    if not token or not hmac.compare_digest(mac, _mac(key, query, token)):
        raise invalid(
            "was not issued for this listing (pass the X-Next-Cursor of a GET /runs with "
            "the same chainId and status)"
        )
    return token


def _status(execution: WorkflowExecution) -> RunStatus:
    status = STATUS_NAMES.get(execution.status or WorkflowExecutionStatus.RUNNING, "running")
    if status == "running" and execution.typed_search_attributes.get(RUN_PHASE) == "waiting":
        return "waiting"
    return status  # type: ignore[return-value]


async def list_page(
    state: AppState,
    client: Client,
    tenant_id: str,
    *,
    chain_id: str | None,
    status: str | None,
    size: int,
    cursor: str | None,
) -> tuple[list[RunSummary], str | None]:
    """One page of runs and the cursor of the next one (None after the last page)."""
    if chain_id is not None and not _CHAIN_ID.match(chain_id):
        return [], None
    query = visibility_query(tenant_id, chain_id, status)
    key = _key(state.settings)
    token = decode_cursor(key, query, cursor) if cursor else None
    listing = client.list_workflows(
        query, page_size=size, next_page_token=token, rpc_timeout=timedelta(seconds=10)
    )
    try:
        await listing.fetch_next_page()
    except RPCError as err:
        if err.status == RPCStatusCode.INVALID_ARGUMENT and token is not None:
            raise APIError(400, "invalid_cursor", err.message, param="cursor") from err
        raise APIError(503, "temporal_unavailable", f"cannot list runs: {err.message}") from err
    executions: Sequence[WorkflowExecution] = listing.current_page or []
    created = await asyncio.to_thread(_created_at, state, tenant_id, [e.id for e in executions])
    runs: list[RunSummary] = []
    for execution in executions:
        row = created.get(execution.id)
        if row is None:
            # Not in this database (another deployment sharing the namespace, or the row was
            # lost): GET /runs/{id} could not show it, so neither does the list.
            continue
        memo = await execution.memo()
        runs.append(
            RunSummary(
                id=str(memo.get(RUN_ID_MEMO) or row[0]),
                workflow_id=execution.id,
                chain_id=execution.typed_search_attributes.get(CHAIN_ID) or row[1],
                status=_status(execution),
                created_at=row[2],
            )
        )
    next_token = listing.next_page_token
    return runs, encode_cursor(key, query, next_token) if next_token else None


def _created_at(
    state: AppState, tenant_id: str, workflow_ids: list[str]
) -> dict[str, tuple[str, str, datetime]]:
    if not workflow_ids:
        return {}
    query = select(RunRow.workflow_id, RunRow.id, RunRow.chain_id, RunRow.created_at).where(
        RunRow.tenant_id == tenant_id, col(RunRow.workflow_id).in_(workflow_ids)
    )
    with state.db.session() as session:
        return {wf: (run_id, chain, at) for wf, run_id, chain, at in session.exec(query).all()}
