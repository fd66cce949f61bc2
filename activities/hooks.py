"""Hook activities: which tools a model is offered (`hook_tools`) and one tool call
(`hook_call`).

Everything secret is looked up here, by tenant and hook name, at call time: the workflow only
ever carries the hook name, the tool name and the model's arguments, so header values and
injected properties never enter Temporal history. Each call is its own activity carrying an
idempotency key that is stable across retries (sent as the Idempotency-Key header), so a call
retried after a crash is safe for a service that honours the header.

Failures: a 4xx answer (except 408 and 429), a refused address or bad arguments fail the
task at once (PermanentToolError); 408/429/5xx and network trouble are retried by Temporal.
"""

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, NoReturn

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.heartbeat import heartbeating
from activities.run_store import keep_result
from core import outbound
from core.config import Settings
from core.db import Database
from core.hooks.openapi import (
    Hidden,
    Operation,
    SchemaCache,
    SchemaError,
    base_url,
    build_call,
    operations,
)
from core.hooks.store import (
    ANY_OBJECT,
    LOCAL_TOOLS,
    MAX_RESPONSE_BYTES,
    RemoteHook,
    ToolArgumentError,
    function_tools,
    load_remote_hook,
)
from core.secrets import SecretBox, scrub
from workflows.contracts import HOOK_CALL, HOOK_TOOLS, PERMANENT_TOOL_ERROR, TOOL_UNAVAILABLE
from workflows.types import (
    FunctionRunInput,
    FunctionRunResult,
    ToolCallRequest,
    ToolCallResult,
    ToolSpec,
    ToolsRequest,
)

WEBHOOK_TIMEOUT = 30.0
# A Retry-After longer than this is not waited for: the normal backoff takes over.
MAX_RETRY_AFTER = 300


def permanent(message: str) -> NoReturn:
    raise ApplicationError(message, type=PERMANENT_TOOL_ERROR, non_retryable=True)


def hidden_tool(name: str, hide: set[str]) -> bool:
    """hide_tools entries may name a tool fully ("hook.tool"), by tool, or a whole hook."""
    hook, _, tool = name.partition(".")
    return bool({name, hook, tool} & hide) if tool else name in hide


class HookActivities:
    def __init__(
        self,
        db: Database,
        secrets: SecretBox,
        settings: Settings,
        cache: SchemaCache | None = None,
    ) -> None:
        self._db = db
        self._secrets = secrets
        self._allowlist = settings.outbound_allowlist
        self._cache = cache or SchemaCache(settings.hook_schema_ttl)
        # Set by worker.py to FunctionActivities.run (which itself calls hooks, hence no import).
        self.run_js: Callable[[FunctionRunInput], Awaitable[FunctionRunResult]] | None = None

    def activities(self) -> list[Any]:
        return [self.tools, self.call]

    # ------------------------------------------------------------------ tools

    @activity.defn(name=HOOK_TOOLS)
    async def tools(self, req: ToolsRequest) -> list[ToolSpec]:
        # Fetching a service's OpenAPI document may take a while: beat meanwhile.
        return await heartbeating(self._tools(req))

    async def _tools(self, req: ToolsRequest) -> list[ToolSpec]:
        hide = set(req.hide_tools)
        specs: list[ToolSpec] = []
        for name in dict.fromkeys(req.hooks):
            if name in hide:
                continue
            specs.extend(await self._tools_of(req.tenant_id, name))
        return [spec for spec in specs if not hidden_tool(spec.name, hide)]

    async def _tools_of(self, tenant_id: str, name: str) -> list[ToolSpec]:
        if name in LOCAL_TOOLS:
            description, parameters = LOCAL_TOOLS[name]
            return [ToolSpec(name, description, parameters)]
        if name == "js":
            functions = await asyncio.to_thread(function_tools, self._db, tenant_id)
            return [
                ToolSpec(f"js.{fn}", desc or f"Runs the JS function {fn}.", ANY_OBJECT)
                for fn, desc in functions
            ]
        hook = await self._hook(tenant_id, name)
        doc, _ = await self._document(hook)
        return [
            ToolSpec(f"{hook.name}.{op.name}", op.description, op.parameters)
            for op in operations(doc, Hidden.of(hook))
        ]

    # ------------------------------------------------------------------ calls

    @activity.defn(name=HOOK_CALL)
    async def call(self, req: ToolCallRequest) -> ToolCallResult:
        # A hook may take its time to answer; the beats say the worker is still waiting.
        result = await heartbeating(self._call(req))
        # A hook task's large answer goes to the run's records, its handle to history.
        result.output = await keep_result(
            self._db, req.tenant_id, req.workflow_id, req.store, result.output
        )
        return result

    async def _call(self, req: ToolCallRequest) -> ToolCallResult:
        if req.hook == "echo":
            return ToolCallResult(req.args)
        if req.hook == "print":
            return self._print(req)
        if req.hook == "webhook":
            return await self._webhook(req)
        if req.hook == "js":
            # Runs started before js.* calls went straight to js_run may still ask here.
            return await self._js(req)
        hook = await self._hook(req.tenant_id, req.hook)
        doc, fresh = await self._document(hook)
        op = self._operation(hook, doc, req.tool)
        if op is None and not fresh:
            # The service may have grown the operation since we cached its document.
            doc, fresh = await self._document(hook, refresh=True)
            op = self._operation(hook, doc, req.tool)
        if op is None:
            offered = ", ".join(o.name for o in operations(doc)) or "none"
            wanted = req.tool or "(no tool_name)"
            permanent(f"hook {hook.name!r} has no tool {wanted!r}; it offers: {offered}")
        try:
            prepared = build_call(
                hook, base_url(hook.endpoint_url, doc), op, req.args, req.idempotency_key
            )
        except ToolArgumentError as err:
            permanent(str(err))
        label = f"{hook.name}.{op.name}"
        resp = await self._send(
            label,
            prepared.method,
            prepared.url,
            headers=prepared.headers,
            json=prepared.json_body if prepared.has_body else None,
            params=prepared.params,
            seconds=hook.timeout,
            secrets=hook.secret_values(),
        )
        return ToolCallResult(_output(resp, hook.secret_values()), resp.status)

    def _operation(self, hook: RemoteHook, doc: dict[str, Any], tool: str) -> Operation | None:
        ops = operations(doc, Hidden.of(hook))
        if not tool:
            # A hook task may leave tool_name out when the service has a single operation.
            return ops[0] if len(ops) == 1 else None
        return next((op for op in ops if op.name == tool), None)

    def _print(self, req: ToolCallRequest) -> ToolCallResult:
        message = req.args.get("message")
        text = message if isinstance(message, str) else json.dumps(req.args, sort_keys=True)
        activity.logger.info("print hook (%s/%s): %s", req.workflow_id, req.task_id, text)
        return ToolCallResult(text)

    async def _webhook(self, req: ToolCallRequest) -> ToolCallResult:
        url = req.args.get("url")
        if not isinstance(url, str) or not url:
            permanent("the webhook hook needs a `url` argument (the http(s) URL to POST to)")
        if "payload" in req.args:
            payload = req.args["payload"]
        else:
            payload = {k: v for k, v in req.args.items() if k not in ("url", "headers")}
        extra = req.args.get("headers")
        headers = {str(k): str(v) for k, v in extra.items()} if isinstance(extra, dict) else {}
        headers["Idempotency-Key"] = req.idempotency_key
        resp = await self._send(
            "webhook", "POST", url, headers=headers, json=payload, seconds=WEBHOOK_TIMEOUT
        )
        return ToolCallResult(_output(resp, []), resp.status)

    async def _js(self, req: ToolCallRequest) -> ToolCallResult:
        function = req.tool or str(req.args.get("function") or "")
        if not function:
            permanent("the js hook needs a function name: tool_name, or a `function` argument")
        if self.run_js is None:
            permanent("JS functions are not set up in this worker")
        result = await self.run_js(
            FunctionRunInput(
                tenant_id=req.tenant_id,
                function=function,
                input=req.args,
                workflow_id=req.workflow_id,
            )
        )
        return ToolCallResult(result.result)

    # ------------------------------------------------------------------ helpers

    async def _hook(self, tenant_id: str, name: str) -> RemoteHook:
        try:
            hook = await asyncio.to_thread(
                load_remote_hook, self._db, self._secrets, tenant_id, name
            )
        except ValueError as err:  # headers encrypted with another CHAINLOOM_SECRET_KEY
            permanent(f"hook {name!r}: {err}")
        if hook is None:
            permanent(
                f"unknown hook {name!r}: register it with POST /hooks/remote "
                f"(local hooks: {', '.join(sorted([*LOCAL_TOOLS, 'js']))})"
            )
        return hook

    async def _document(
        self, hook: RemoteHook, *, refresh: bool = False
    ) -> tuple[dict[str, Any], bool]:
        try:
            return await self._cache.get(hook, self._allowlist, refresh=refresh)
        except SchemaError as err:
            message = scrub(err.message, hook.secret_values())
            if err.transient:
                raise ApplicationError(message, type=TOOL_UNAVAILABLE) from err
            permanent(message)

    async def _send(
        self,
        label: str,
        method: str,
        url: str,
        *,
        headers: dict[str, str],
        json: Any = None,
        params: list[tuple[str, str]] | None = None,
        seconds: float,
        secrets: list[str] | None = None,
    ) -> outbound.OutboundResponse:
        secrets = secrets or []
        try:
            resp = await outbound.fetch(
                method,
                url,
                headers=headers,
                json=json,
                params=params,
                timeout=seconds,
                max_bytes=MAX_RESPONSE_BYTES,
                allowlist=self._allowlist,
            )
        except outbound.OutboundRefused as err:
            # Policy, not luck: a retry would be refused the same way.
            permanent(scrub(f"{label}: {err}", secrets))
        except outbound.OutboundError as err:
            message = scrub(f"{label}: {err}", secrets)
            if err.transient:
                raise ApplicationError(message, type=TOOL_UNAVAILABLE) from err
            permanent(message)
        if resp.status < 400:
            return resp
        # Scrubbed before it is cut: a cut through an echoed secret would leave part of it.
        detail = scrub(resp.text, secrets)[:300].strip()
        message = f"{label}: {method} answered HTTP {resp.status}" + (
            f": {detail}" if detail else ""
        )
        if resp.status >= 500 or resp.status in (408, 429):
            raise ApplicationError(
                message,
                {"status": resp.status},
                type=TOOL_UNAVAILABLE,
                next_retry_delay=_retry_after(resp),
            )
        raise ApplicationError(
            message, {"status": resp.status}, type=PERMANENT_TOOL_ERROR, non_retryable=True
        )


def _retry_after(resp: outbound.OutboundResponse) -> timedelta | None:
    value = resp.headers.get("retry-after", "").strip()
    if value.isdigit() and 0 < int(value) <= MAX_RETRY_AFTER:
        return timedelta(seconds=int(value))
    return None


def _output(resp: outbound.OutboundResponse, secrets: list[str]) -> Any:
    """Parsed JSON when the service says JSON, else text; secrets a service echoes back are
    scrubbed, as the output goes into history and, for tools, to the model."""
    ctype = resp.headers.get("content-type", "")
    if "json" in ctype and resp.body.strip():
        try:
            return scrub(resp.json(), secrets)
        except ValueError:
            pass
    return scrub(resp.text, secrets)
