"""The steps of a chain that call tools: remote and local hooks, JS functions, and the tool
calls a model asked for. A mixin of ChainWorkflow (workflows/chain.py), kept apart so each file
stays readable; deterministic like the rest of the workflow, no I/O.
"""

import json
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from chains import engine
    from chains.engine import TaskFailure
    from chains.spec import ChainDefinition, TaskDefinition, parse_duration
    from workflows.contracts import (
        HOOK_CALL,
        HOOK_TOOLS,
        JS_RUN,
        PERMANENT_TOOL_ERROR,
        failure_message,
    )
    from workflows.types import (
        ChainRunInput,
        FunctionRunInput,
        FunctionRunResult,
        StoreAs,
        ToolCallRequest,
        ToolCallResult,
        ToolSpec,
        ToolsRequest,
    )

TOOL_TIMEOUT = 90.0
# Patch ids (docs/workflows.md): js.* tool calls used to go through hook_call; hook
# idempotency keys name the retry_on_failure attempt (a task run again sends a new key).
JS_TOOLS_DIRECT = "js-tools-direct"
HOOK_KEY_ATTEMPT = "hook-key-attempt"


class Outcome:
    __slots__ = ("meta", "output", "shown", "transition")

    def __init__(self, output: Any, transition: str, meta: dict[str, Any] | None = None) -> None:
        self.output = output
        self.transition = transition
        self.meta = meta or {}
        # What the state unit shows as transition when not the transition itself.
        self.shown: Any = None


class ToolSteps:
    """hook, js and execute_tool_calls tasks, and the tools offered to a model."""

    _params: ChainRunInput
    _chain: ChainDefinition
    _step: int
    # The retry_on_failure attempt of the task running (from 1).
    _task_attempt: int

    def _render(self, template: str, scope: dict[str, Any]) -> str:
        raise NotImplementedError

    def _output_template(self, task: TaskDefinition, output: Any, scope: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _slot(self) -> StoreAs | None:
        raise NotImplementedError

    async def _tools(self, task: TaskDefinition) -> list[ToolSpec]:
        cfg = task.execute_config
        if cfg is None or not cfg.hooks:
            return []
        try:
            return await workflow.execute_activity(
                HOOK_TOOLS,
                ToolsRequest(self._params.tenant_id, list(cfg.hooks), list(cfg.hide_tools)),
                result_type=list[ToolSpec],
                summary=f"{task.id}: tools of {', '.join(cfg.hooks)}",
                **self._tool_options(task),
            )
        except ActivityError as err:
            raise TaskFailure(failure_message(err)) from err

    def _tool_options(self, task: TaskDefinition) -> dict[str, Any]:
        opts = self._params.options
        timeout = parse_duration(task.timeout) or TOOL_TIMEOUT
        options: dict[str, Any] = {
            "start_to_close_timeout": timedelta(seconds=timeout),
            "retry_policy": RetryPolicy(
                initial_interval=timedelta(seconds=opts.retry_initial_interval),
                maximum_interval=timedelta(seconds=30),
                maximum_attempts=opts.llm_max_attempts,
                non_retryable_error_types=[PERMANENT_TOOL_ERROR],
            ),
        }
        if opts.tool_heartbeat_timeout > 0:
            # Hook and JS activities beat while they wait, so a lost worker is noticed in
            # seconds rather than at the start-to-close timeout.
            options["heartbeat_timeout"] = timedelta(seconds=opts.tool_heartbeat_timeout)
        return options

    def _key(self, task: TaskDefinition) -> str:
        """The idempotency key prefix of a hook call: stable across Temporal's retries of the
        call, new for each retry_on_failure attempt (the task is meant to run again)."""
        key = f"{workflow.info().workflow_id}/{task.id}/{self._step}"
        if workflow.patched(HOOK_KEY_ATTEMPT):
            key += f"/{self._task_attempt}"
        return key

    async def _call_tool(
        self,
        task: TaskDefinition,
        hook: str,
        tool: str,
        args: dict[str, Any],
        key: str,
        store: StoreAs | None = None,
    ) -> Any:
        if hook == "js" and workflow.patched(JS_TOOLS_DIRECT):
            # A JS function offered as a tool (js.<name>) runs in the JS activity itself.
            function = tool or str(args.get("function") or "")
            if not function:
                raise TaskFailure(
                    "the js hook needs a function name: tool_name, or a `function` argument"
                )
            result = await self._run_js(task, function, args, store)
            return result.result
        request = ToolCallRequest(
            tenant_id=self._params.tenant_id,
            workflow_id=workflow.info().workflow_id,
            task_id=task.id,
            hook=hook,
            tool=tool,
            args=args,
            idempotency_key=key,
            store=store,
        )
        try:
            result = await workflow.execute_activity(
                HOOK_CALL,
                request,
                result_type=ToolCallResult,
                summary=f"{task.id}: {hook}.{tool}" if tool else f"{task.id}: {hook}",
                **self._tool_options(task),
            )
        except ActivityError as err:
            raise TaskFailure(failure_message(err)) from err
        return result.output

    async def _hook(self, task: TaskDefinition, scope: dict[str, Any]) -> Outcome:
        if task.hook is None:
            raise TaskFailure("a hook task needs `hook.name`")
        args = {
            key: self._render(value, scope) if isinstance(value, str) else value
            for key, value in task.hook.args.items()
        }
        key = self._key(task)
        # A large result stays out of history unless output_template needs it here.
        store = None if task.output_template else self._slot()
        output = await self._call_tool(task, task.hook.name, task.hook.tool_name, args, key, store)
        output = self._output_template(task, output, scope)
        return Outcome(output, output if isinstance(output, str) else "ok")

    async def _run_js(
        self, task: TaskDefinition, function: str, value: Any, store: StoreAs | None = None
    ) -> FunctionRunResult:
        request = FunctionRunInput(
            tenant_id=self._params.tenant_id,
            function=function,
            input=value,
            workflow_id=workflow.info().workflow_id,
            store=store,
        )
        try:
            return await workflow.execute_activity(
                JS_RUN,
                request,
                result_type=FunctionRunResult,
                summary=f"{task.id}: js {function}",
                **self._tool_options(task),
            )
        except ActivityError as err:
            raise TaskFailure(failure_message(err)) from err

    async def _js(self, task: TaskDefinition, task_input: Any) -> Outcome:
        if task.hook is None:
            raise TaskFailure("a js task needs `hook.name`, the function to run")
        result = await self._run_js(task, task.hook.name, task_input, self._slot())
        output = result.result
        meta: dict[str, Any] = {"logs": result.logs} if result.logs else {}
        return Outcome(output, output if isinstance(output, str) else "ok", meta)

    def _offered_hooks(self) -> set[str]:
        return {
            hook
            for t in self._chain.tasks
            if t.execute_config is not None
            for hook in t.execute_config.hooks
        }

    async def _execute_tool_calls(self, task: TaskDefinition, task_input: Any) -> Outcome:
        if not engine.is_chat_history(task_input):
            raise TaskFailure("execute_tool_calls needs a chat history as input")
        history = engine.to_chat_history(task_input)
        messages = history["messages"]
        last = messages[-1] if messages else {}
        calls = last.get("tool_calls") or [] if last.get("role") == "assistant" else []
        offered = self._offered_hooks()
        for call in calls:
            function = call.get("function") or {}
            name = str(function.get("name") or "")
            hook, _, tool = name.partition(".")
            if hook not in offered:
                # A client's own tool (pass_clients_tools): left for the caller to run.
                continue
            args = function.get("arguments") or {}
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except ValueError as err:
                    raise TaskFailure(
                        f"tool call {name!r} has arguments that are not JSON"
                    ) from err
            key = f"{self._key(task)}/{call.get('id', name)}"
            output = await self._call_tool(task, hook, tool, dict(args), key)
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": call.get("id", ""),
                    "name": name,
                    "content": output if isinstance(output, str) else json.dumps(output),
                }
            )
        return Outcome(history, "executed")
