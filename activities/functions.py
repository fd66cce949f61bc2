"""The `js_run` activity: run a stored JS function, serving its builtins from the worker.

The JavaScript itself runs in a host process (core/sandbox/pool.py); this module loads the
function's script, answers the builtins the script calls (they need the database, the Temporal
client, routing and secrets, none of which reaches the host) and maps failures onto Temporal:
a script that does not parse, throws, runs out of time or memory, or names an unknown
function fails with PermanentToolError (a retry would fail the same way); a host that died for
another reason fails retryably.

Durability: the builtins run inside this one activity. Temporal retries the activity only
when a worker is lost or a host crashed; a retry runs the function again from the start.
`sendEvent` and `executeTaskChain` are deduplicated across such retries (the event id and
the chain's workflow id derive from the activity), `executeTask`, `executeHook` and
`httpFetch` are repeated (a hook call carries a stable Idempotency-Key).
"""

import asyncio
import http
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeating
from activities.hooks import HookActivities
from activities.llm import LLMActivities
from activities.run_store import keep_result, read_back
from core import outbound
from core.config import Settings
from core.db import Database
from core.events.dispatch import append_and_dispatch
from core.events.store import EventError
from core.models import FunctionRow, TaskChainRow
from core.runs import RunInputTooLarge, start_chain_run
from core.runstate import records
from core.sandbox.pool import JSError, JSRunner, runner_for
from workflows.contracts import (
    JS_BUSY,
    JS_HOST_CRASHED,
    JS_RUN,
    PERMANENT_TOOL_ERROR,
    chain_workflow_id,
    failure_message,
)
from workflows.types import (
    FunctionRunInput,
    FunctionRunResult,
    LLMRequest,
    ModelChoice,
    ToolCallRequest,
)

# httpFetch: a single exchange may take at most this long and return at most this much.
HTTP_TIMEOUT = 30.0
HTTP_MAX_BYTES = 5 * 1024 * 1024
# Event ids and chain workflow ids made by a function derive from this namespace and the
# activity, so a retried activity finds what its first attempt created.
_IDS = uuid.UUID("5f0e6c1e-2b8a-4b7e-9d43-7a1c0f3e8b21")


class FunctionActivities:
    """`js_run`, plus what its builtins need, injected by worker.py: routing for executeTask
    (the LLM activities) and tool calls for executeHook (the hook activities)."""

    def __init__(
        self,
        db: Database,
        settings: Settings,
        *,
        llm: LLMActivities,
        hooks: HookActivities,
        runner: JSRunner | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.llm = llm
        self.hooks = hooks
        self._runner = runner

    def activities(self) -> list[Callable[..., Any]]:
        return [self.js_run]

    @activity.defn(name=JS_RUN)
    async def js_run(self, req: FunctionRunInput) -> FunctionRunResult:
        # Beats while the script runs in its host and while it waits on builtins.
        return await heartbeating(self.run(req))

    def runner(self) -> JSRunner:
        if self._runner is not None:
            return self._runner
        return runner_for(self.settings)

    async def run(self, req: FunctionRunInput, client: Client | None = None) -> FunctionRunResult:
        script = await asyncio.to_thread(_load_script, self.db, req.tenant_id, req.function)
        if script is None:
            raise ApplicationError(
                f"unknown JS function {req.function!r}: create it with POST /functions",
                type=PERMANENT_TOOL_ERROR,
                non_retryable=True,
            )
        in_activity = activity.in_activity()
        if client is None and in_activity:
            client = activity.client()
        info = activity.info() if in_activity else None
        workflow_id = req.workflow_id or (info.workflow_id or "" if info else "")
        # Stable across retries of one activity, fresh for every other call.
        run_key = f"{info.workflow_id}/{info.activity_id}" if info else str(uuid.uuid4())
        builtins = Builtins(self, req, workflow_id, run_key, client)
        # A chain hands large values over as handles to its records; read them here.
        value = await read_back(self.db, req.tenant_id, req.input, PERMANENT_TOOL_ERROR)
        # A result the chain stores (req.store) never enters history, so it may be larger.
        max_result = req.store.max_bytes if req.store is not None else None
        try:
            result = await self.runner().run(
                script,
                value,
                builtins=builtins,
                tenant=req.tenant_id,
                # Waiting for a turn at the pool can take a while: stay visibly alive.
                beat=activity.heartbeat if in_activity else None,
                max_result=max_result,
            )
        except JSError as err:
            message = f"JS function {req.function!r}: {err.message}"
            details = {"kind": err.kind, "logs": err.logs}
            if err.permanent:
                raise ApplicationError(
                    message, details, type=PERMANENT_TOOL_ERROR, non_retryable=True
                ) from err
            kind = JS_BUSY if err.kind == "busy" else JS_HOST_CRASHED
            raise ApplicationError(message, details, type=kind) from err
        output = result.value
        output = await keep_result(self.db, req.tenant_id, workflow_id, req.store, output)
        return FunctionRunResult(output, result.logs, builtins.events)


def _load_script(db: Database, tenant_id: str, name: str) -> str | None:
    with db.session() as session:
        row = session.get(FunctionRow, (tenant_id, name))
        return row.script if row is not None else None


class BuiltinError(Exception):
    """Thrown into the script as an Error with this message."""


@dataclass
class _Counter:
    value: int = 0

    def next(self) -> int:
        self.value += 1
        return self.value


class Builtins:
    """Serves one call's builtins: `await builtins(name, args, seconds_left)`."""

    def __init__(
        self,
        functions: FunctionActivities,
        req: FunctionRunInput,
        workflow_id: str,
        run_key: str,
        client: Client | None,
    ) -> None:
        self.functions = functions
        self.req = req
        self.workflow_id = workflow_id
        self.run_key = run_key
        self.client = client
        self.events: list[dict[str, Any]] = []
        self._count = _Counter()
        self._table: dict[str, Callable[[list[Any], float], Awaitable[Any]]] = {
            "httpFetch": self.http_fetch,
            "sendEvent": self.send_event,
            "executeTask": self.execute_task,
            "executeTaskChain": self.execute_task_chain,
            "executeHook": self.execute_hook,
        }

    async def __call__(self, name: str, args: list[Any], left: float) -> Any:
        handler = self._table.get(name)
        if handler is None:
            raise BuiltinError(f"unknown builtin {name!r}")
        try:
            return await handler(args, left)
        except BuiltinError as err:
            raise BuiltinError(f"{name}: {err}") from err
        except ApplicationError as err:
            raise BuiltinError(f"{name}: {err.message}") from err

    def _stable_id(self, kind: str) -> str:
        return str(uuid.uuid5(_IDS, f"{self.run_key}/{kind}/{self._count.next()}"))

    async def _temporal(self) -> Client:
        if self.client is None:
            raise BuiltinError("no Temporal client here; it works when a worker runs the function")
        return self.client

    # ------------------------------------------------------------------ httpFetch

    async def http_fetch(self, args: list[Any], left: float) -> dict[str, Any]:
        first = args[0] if args else None
        if isinstance(first, dict):
            options = dict(first)
            url = options.get("url")
        else:
            url = first
            options = args[1] if len(args) > 1 and isinstance(args[1], dict) else {}
        if not isinstance(url, str) or not url:
            raise BuiltinError("needs a URL: httpFetch(url, {method, headers, body})")
        method = str(options.get("method") or "GET").upper()
        raw_headers = options.get("headers") or {}
        if not isinstance(raw_headers, dict):
            raise BuiltinError("headers must be an object of strings")
        headers = {str(k): str(v) for k, v in raw_headers.items()}
        body = options.get("body")
        content = body if isinstance(body, str) else None
        json_body = body if body is not None and content is None else None
        timeout = min(HTTP_TIMEOUT, left)
        wanted = options.get("timeoutMs")
        if isinstance(wanted, int | float) and not isinstance(wanted, bool) and wanted > 0:
            timeout = min(timeout, wanted / 1000)
        try:
            resp = await outbound.fetch(
                method,
                url,
                headers=headers,
                json=json_body,
                content=content,
                timeout=timeout,
                max_bytes=HTTP_MAX_BYTES,
                allowlist=self.functions.settings.outbound_allowlist,
            )
        except outbound.OutboundFailure as err:
            raise BuiltinError(str(err)) from err
        out: dict[str, Any] = {
            "ok": 200 <= resp.status < 300,
            "status": resp.status,
            "statusText": _reason(resp.status),
            "url": resp.url,
            "headers": resp.headers,
            "body": resp.text,
        }
        if "json" in resp.headers.get("content-type", "") and resp.body.strip():
            try:
                out["json"] = resp.json()
            except ValueError:
                pass
        return out

    # ------------------------------------------------------------------ sendEvent

    async def send_event(self, args: list[Any], left: float) -> dict[str, Any]:
        event_type = str(args[0]) if args else ""
        data = args[1] if len(args) > 1 else {}
        req = self.req
        metadata: dict[str, Any] = {"function": req.function}
        if self.workflow_id:
            metadata["workflow_id"] = self.workflow_id
        if req.trigger:
            metadata["trigger"] = req.trigger
        event = {
            "id": self._stable_id("event"),
            "event_type": event_type,
            "event_source": "function",
            "aggregate_type": "function",
            "aggregate_id": req.function,
            "data": data,
            "metadata": metadata,
        }
        source: Any = self.client if self.client is not None else self._temporal
        try:
            stored = await append_and_dispatch(
                self.functions.db,
                source,
                self.functions.settings,
                req.tenant_id,
                event,
                # One hop deeper than the event that started this function: a function whose
                # event triggers itself is stopped at CHAINLOOM_TRIGGER_MAX_DEPTH.
                req.depth + 1,
                existing_ok=True,
            )
        except EventError as err:
            raise BuiltinError(err.message) from err
        self.events.append(stored)
        return {"success": True, "event_id": stored["id"], "nid": stored.get("nid")}

    # ------------------------------------------------------------------ executeTask

    async def execute_task(self, args: list[Any], left: float) -> dict[str, Any]:
        prompt = str(args[0]) if args else ""
        model = str(args[1]) if len(args) > 1 and args[1] else ""
        provider = str(args[2]) if len(args) > 2 and args[2] else ""
        if not activity.in_activity():
            raise BuiltinError("works when a worker runs the function (it routes like a task)")
        request = LLMRequest(
            tenant_id=self.req.tenant_id,
            workflow_id=self.workflow_id,
            task_id=f"js:{self.req.function}",
            choice=ModelChoice(model=model, provider=provider),
            messages=[{"role": "user", "content": prompt}],
        )
        result = await self.functions.llm.chat(request)
        return {
            "success": True,
            "task_id": self._stable_id("task"),
            "response": result.content,
            "model": result.model,
            "backend": result.backend,
        }

    # ------------------------------------------------------------------ executeTaskChain

    async def execute_task_chain(self, args: list[Any], left: float) -> dict[str, Any]:
        from chains.loader import ChainError, load_chain

        chain_id = str(args[0]) if args else ""
        chain_input = args[1] if len(args) > 1 else None
        functions, req = self.functions, self.req
        data = await asyncio.to_thread(_load_chain, functions.db, req.tenant_id, chain_id)
        if data is None:
            raise BuiltinError(f"task chain {chain_id!r} not found")
        try:
            chain = load_chain(data)
        except ChainError as err:
            raise BuiltinError(f"task chain {chain_id!r} is not valid: {err}") from err
        client = await self._temporal()
        try:
            run, handle = await start_chain_run(
                functions.db,
                client,
                functions.settings,
                req.tenant_id,
                chain,
                chain_input,
                input_type="string" if isinstance(chain_input, str) else "json",
                # Derived from this activity: a retried attempt finds the run its first one
                # started.
                workflow_id=chain_workflow_id(chain.id, self._stable_id("chain")),
                summary=f"chain {chain.id} (from JS function {req.function})",
                existing_ok=True,
            )
        except RunInputTooLarge as err:
            raise BuiltinError(str(err)) from err
        workflow_id = run.workflow_id
        try:
            result = await asyncio.wait_for(handle.result(), max(left, 0.001))
        except TimeoutError as err:
            raise BuiltinError(
                f"chain {chain.id!r} did not finish within the call's time left; it goes on "
                f"as workflow {workflow_id}"
            ) from err
        except WorkflowFailureError as err:
            raise BuiltinError(f"chain {chain.id!r} failed: {failure_message(err)}") from err
        whole = await asyncio.to_thread(
            records.whole_result, functions.db, req.tenant_id, workflow_id, result
        )
        return {
            "success": True,
            "chain_id": chain.id,
            "workflow_id": workflow_id,
            "result": whole["output"],
            "outputType": result.get("outputType"),
            "history": whole["state"],
        }

    # ------------------------------------------------------------------ executeHook

    async def execute_hook(self, args: list[Any], left: float) -> dict[str, Any]:
        hook = str(args[0]) if args else ""
        tool = str(args[1]) if len(args) > 1 and args[1] else ""
        call_args = args[2] if len(args) > 2 and args[2] is not None else {}
        if not hook:
            raise BuiltinError("needs a hook name: executeHook(hookName, toolName, args)")
        if hook == "js":
            # A function calling functions through the pool it occupies can starve it.
            raise BuiltinError("cannot run JS functions; call the logic directly")
        if not isinstance(call_args, dict):
            raise BuiltinError("args must be an object")
        request = ToolCallRequest(
            tenant_id=self.req.tenant_id,
            workflow_id=self.workflow_id,
            task_id=f"js:{self.req.function}",
            hook=hook,
            tool=tool,
            args=call_args,
            idempotency_key=self._stable_id("hook"),
        )
        result = await self.functions.hooks.call(request)
        return {
            "success": True,
            "hook_name": hook,
            "tool_name": tool,
            "status": result.status,
            "result": result.output,
        }


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _load_chain(db: Database, tenant_id: str, chain_id: str) -> dict[str, Any] | None:
    with db.session() as session:
        row = session.get(TaskChainRow, (tenant_id, chain_id))
        return dict(row.definition) if row is not None else None
