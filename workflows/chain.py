"""ChainWorkflow: interprets a task chain step by step.

Only model calls (and later hooks and JS) leave the workflow as activities; templating,
parsing, conditions and transitions run here, deterministically, so they cost no round trip
and replay for free.
"""

import json
from datetime import timedelta
from typing import Any, NoReturn

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from chains import engine, templating
    from chains.engine import TaskFailure
    from chains.spec import (
        LLM_PROMPT_HANDLERS,
        TERM_END,
        ChainDefinition,
        TaskDefinition,
        canonical_handler,
        parse_duration,
    )
    from workflows.contracts import (
        CHAIN_FAILED,
        CHAIN_WORKFLOW,
        HOOK_CALL,
        HOOK_TOOLS,
        JS_RUN,
        LLM_CHAT,
        LLM_EMBED,
        PERMANENT_LLM_ERROR,
        PERMANENT_TOOL_ERROR,
        PROGRESS_QUERY,
        failure_message,
    )
    from workflows.types import (
        ApprovalDecision,
        ChainRunInput,
        EmbedRequest,
        EmbedResult,
        FunctionRunInput,
        FunctionRunResult,
        LLMRequest,
        LLMResult,
        ModelChoice,
        ToolCallRequest,
        ToolCallResult,
        ToolSpec,
        ToolsRequest,
    )

TOOL_TIMEOUT = 90.0
# Patch ids (docs/workflows.md): js.* tool calls used to go through hook_call.
JS_TOOLS_DIRECT = "js-tools-direct"
# Hook idempotency keys name the retry_on_failure attempt: a task run again sends a new key.
HOOK_KEY_ATTEMPT = "hook-key-attempt"
TOOL_CALL = "tool-call"


class _Outcome:
    __slots__ = ("meta", "output", "transition")

    def __init__(self, output: Any, transition: str, meta: dict[str, Any] | None = None) -> None:
        self.output = output
        self.transition = transition
        self.meta = meta or {}


@workflow.defn(name=CHAIN_WORKFLOW)
class ChainWorkflow:
    def __init__(self) -> None:
        self._state: list[dict[str, Any]] = []
        self._status = "running"
        self._current = ""
        self._decisions: list[ApprovalDecision] = []
        self._output: Any = None
        self._step = 0
        self._attempt = 1

    @workflow.query(name=PROGRESS_QUERY)
    def progress(self) -> dict[str, Any]:
        return {
            "status": self._status,
            "currentTask": self._current,
            "state": self._state,
            "output": self._output,
        }

    @workflow.signal
    def approve(self, decision: ApprovalDecision) -> None:
        self._decisions.append(decision)

    @workflow.run
    async def run(self, params: ChainRunInput) -> dict[str, Any]:
        chain = ChainDefinition.model_validate(params.chain)
        self._params = params
        self._chain = chain
        variables: dict[str, Any] = {"input": params.input}
        previous: Any = params.input
        task: TaskDefinition | None = chain.tasks[0]
        steps = 0
        while task is not None:
            steps += 1
            if steps > chain.max_steps:
                self._fail(
                    f"chain {chain.id!r} passed max_steps={chain.max_steps} at task {task.id!r}; "
                    "raise max_steps or give the loop an exit"
                )
            self._current = task.id
            self._step = steps
            task_input = variables.get(task.input_var, None) if task.input_var else previous
            started = workflow.now()
            unit: dict[str, Any] = {
                "taskID": task.id,
                "taskHandler": task.handler,
                "inputVar": task.input_var or "previous_output",
                "input": engine.as_text(task_input),
                "inputType": engine.value_type(task_input),
                "startedAt": started.isoformat().replace("+00:00", "Z"),
            }
            scope = {**variables, "previous_output": previous}
            outcome: _Outcome | None = None
            error = ""
            attempts = task.retry_on_failure + 1
            for attempt in range(1, attempts + 1):
                unit["attempt"] = attempt
                self._attempt = attempt
                try:
                    result = await self._execute(task, task_input, scope)
                    self._finish(task, result, variables)
                    outcome = result
                    break
                except TaskFailure as err:
                    error = str(err)
            finished = workflow.now()
            unit["duration"] = int((finished - started).total_seconds() * 1e9)
            if outcome is None:
                unit.update(output="", outputType="string", transition="", error={"error": error})
                self._state.append(unit)
                if task.transition.on_failure:
                    variables["error"] = error
                    task = self._goto(task.transition.on_failure, task.id)
                    continue
                self._fail(f"task {task.id!r} ({task.handler}) failed: {error}")
            output = outcome.output
            unit.update(outcome.meta)
            unit.update(
                output=output,
                outputType=engine.value_type(output),
                transition=outcome.transition,
                error={"error": ""},
            )
            variables[task.id] = output
            previous = output
            self._state.append(unit)
            target = engine.next_task(task.transition, outcome.transition)
            if target is None:
                self._fail(
                    f"task {task.id!r}: no branch matches transition value "
                    f"{outcome.transition[:200]!r} and there is no default branch"
                )
            task = None if target == TERM_END else self._goto(str(target), task.id)
        self._status = "completed"
        self._current = ""
        self._output = previous
        return {
            "output": previous,
            "outputType": engine.value_type(previous),
            "state": self._state,
        }

    def _goto(self, target: str, source: str) -> TaskDefinition | None:
        if target in ("", TERM_END):
            return None
        found = self._chain.task(target)
        if found is None:
            self._fail(f"task {source!r} jumps to unknown task {target!r}")
        return found

    def _fail(self, message: str) -> NoReturn:
        self._status = "failed"
        raise ApplicationError(
            message, {"state": self._state}, type=CHAIN_FAILED, non_retryable=True
        )

    def _finish(self, task: TaskDefinition, outcome: _Outcome, variables: dict[str, Any]) -> None:
        """Compose and print; a failure here is the task's failure, like any other."""
        try:
            if task.compose and task.compose.with_var:
                outcome.output = engine.compose(
                    outcome.output, variables.get(task.compose.with_var), task.compose.strategy
                )
            if task.print:
                scope = {**variables, task.id: outcome.output, "previous_output": outcome.output}
                outcome.meta["print"] = templating.render(task.print, scope)
        except templating.TemplateError as err:
            raise TaskFailure(f"template error: {err}") from err

    async def _execute(
        self, task: TaskDefinition, task_input: Any, scope: dict[str, Any]
    ) -> _Outcome:
        handler = canonical_handler(task.handler)
        try:
            if handler in LLM_PROMPT_HANDLERS:
                return await self._prompt(task, handler, scope)
            if handler == "chat_completion":
                return await self._chat(task, task_input, scope)
            if handler == "text_to_embedding":
                return await self._embed(task, task_input, scope)
            if handler == "approval":
                return await self._approval(task)
            if handler == "hook":
                return await self._hook(task, scope)
            if handler == "js":
                return await self._js(task, task_input)
            if handler == "execute_tool_calls":
                return await self._execute_tool_calls(task, task_input)
            return self._deterministic(task, handler, task_input, scope)
        except templating.TemplateError as err:
            raise TaskFailure(f"template error: {err}") from err

    def _render(self, template: str, scope: dict[str, Any]) -> str:
        return templating.render(template, scope)

    def _output_template(self, task: TaskDefinition, output: Any, scope: dict[str, Any]) -> Any:
        if not task.output_template:
            return output
        data = {**scope, **output} if isinstance(output, dict) else {**scope, "output": output}
        return self._render(task.output_template, data)

    def _choice(self, task: TaskDefinition) -> ModelChoice:
        cfg = task.execute_config
        if cfg is None:
            return ModelChoice()
        return ModelChoice(
            model=cfg.model, models=cfg.models, provider=cfg.provider, providers=cfg.providers
        )

    def _activity_options(self, task: TaskDefinition) -> dict[str, Any]:
        opts = self._params.options
        timeout = parse_duration(task.timeout) or opts.llm_timeout
        return {
            "start_to_close_timeout": timedelta(seconds=timeout),
            "heartbeat_timeout": timedelta(seconds=opts.llm_heartbeat_timeout),
            "retry_policy": RetryPolicy(
                initial_interval=timedelta(seconds=opts.retry_initial_interval),
                backoff_coefficient=2.0,
                maximum_interval=timedelta(seconds=30),
                maximum_attempts=opts.llm_max_attempts,
                non_retryable_error_types=[PERMANENT_LLM_ERROR],
            ),
        }

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
            key += f"/{self._attempt}"
        return key

    async def _call_llm(
        self,
        task: TaskDefinition,
        messages: list[dict[str, Any]],
        tools: list[ToolSpec] | None = None,
    ) -> LLMResult:
        cfg = task.execute_config
        request = LLMRequest(
            tenant_id=self._params.tenant_id,
            workflow_id=workflow.info().workflow_id,
            task_id=task.id,
            choice=self._choice(task),
            messages=messages,
            temperature=cfg.temperature if cfg else None,
            token_limit=self._chain.token_limit,
            tools=tools or [],
        )
        try:
            return await workflow.execute_activity(
                LLM_CHAT,
                request,
                result_type=LLMResult,
                summary=f"{task.id}: {task.handler}",
                **self._activity_options(task),
            )
        except ActivityError as err:
            raise TaskFailure(failure_message(err)) from err

    async def _prompt(self, task: TaskDefinition, handler: str, scope: dict[str, Any]) -> _Outcome:
        prompt = self._render(task.prompt_template, scope)
        messages: list[dict[str, Any]] = []
        if task.system_instruction:
            system = self._render(task.system_instruction, scope)
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": prompt})
        result = await self._call_llm(task, messages)
        output = engine.interpret_answer(handler, result.content, task.valid_conditions)
        output = self._output_template(task, output, scope)
        meta = _llm_meta(result)
        if self._chain.debug:
            # What the model was asked, as rendered: the first thing to read when a chain
            # answers oddly.
            meta["debug"] = {"messages": messages, "answer": result.content}
        return _Outcome(output, engine.as_text(output), meta)

    async def _chat(self, task: TaskDefinition, task_input: Any, scope: dict[str, Any]) -> _Outcome:
        history = engine.to_chat_history(task_input)
        messages = history["messages"]
        if task.system_instruction and not any(m.get("role") == "system" for m in messages):
            system = self._render(task.system_instruction, scope)
            messages.insert(0, {"role": "system", "content": system})
        result = await self._call_llm(task, messages, await self._tools(task))
        reply: dict[str, Any] = {"role": "assistant", "content": result.content}
        if result.tool_calls:
            reply["tool_calls"] = result.tool_calls
        history["messages"] = [*messages, reply]
        history["model"] = result.model
        history["inputTokens"] = int(history.get("inputTokens") or 0) + result.input_tokens
        history["outputTokens"] = int(history.get("outputTokens") or 0) + result.output_tokens
        transition = TOOL_CALL if result.tool_calls else result.content
        return _Outcome(history, transition, _llm_meta(result))

    async def _call_tool(
        self, task: TaskDefinition, hook: str, tool: str, args: dict[str, Any], key: str
    ) -> Any:
        if hook == "js" and workflow.patched(JS_TOOLS_DIRECT):
            # A JS function offered as a tool (js.<name>) runs in the JS activity itself.
            function = tool or str(args.get("function") or "")
            if not function:
                raise TaskFailure(
                    "the js hook needs a function name: tool_name, or a `function` argument"
                )
            result = await self._run_js(task, function, args)
            return result.result
        request = ToolCallRequest(
            tenant_id=self._params.tenant_id,
            workflow_id=workflow.info().workflow_id,
            task_id=task.id,
            hook=hook,
            tool=tool,
            args=args,
            idempotency_key=key,
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

    async def _hook(self, task: TaskDefinition, scope: dict[str, Any]) -> _Outcome:
        if task.hook is None:
            raise TaskFailure("a hook task needs `hook.name`")
        args = {
            key: self._render(value, scope) if isinstance(value, str) else value
            for key, value in task.hook.args.items()
        }
        key = self._key(task)
        output = await self._call_tool(task, task.hook.name, task.hook.tool_name, args, key)
        output = self._output_template(task, output, scope)
        return _Outcome(output, output if isinstance(output, str) else "ok")

    async def _run_js(self, task: TaskDefinition, function: str, value: Any) -> FunctionRunResult:
        request = FunctionRunInput(
            tenant_id=self._params.tenant_id,
            function=function,
            input=value,
            workflow_id=workflow.info().workflow_id,
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

    async def _js(self, task: TaskDefinition, task_input: Any) -> _Outcome:
        if task.hook is None:
            raise TaskFailure("a js task needs `hook.name`, the function to run")
        result = await self._run_js(task, task.hook.name, task_input)
        output = result.result
        meta: dict[str, Any] = {"logs": result.logs} if result.logs else {}
        return _Outcome(output, output if isinstance(output, str) else "ok", meta)

    def _offered_hooks(self) -> set[str]:
        return {
            hook
            for t in self._chain.tasks
            if t.execute_config is not None
            for hook in t.execute_config.hooks
        }

    async def _execute_tool_calls(self, task: TaskDefinition, task_input: Any) -> _Outcome:
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
        return _Outcome(history, "executed")

    async def _embed(
        self, task: TaskDefinition, task_input: Any, scope: dict[str, Any]
    ) -> _Outcome:
        text = self._render(task.prompt_template, scope) if task.prompt_template else None
        request = EmbedRequest(
            tenant_id=self._params.tenant_id,
            workflow_id=workflow.info().workflow_id,
            task_id=task.id,
            choice=self._choice(task),
            text=text if text is not None else engine.as_text(task_input),
        )
        try:
            result = await workflow.execute_activity(
                LLM_EMBED,
                request,
                result_type=EmbedResult,
                summary=f"{task.id}: {task.handler}",
                **self._activity_options(task),
            )
        except ActivityError as err:
            raise TaskFailure(failure_message(err)) from err
        meta: dict[str, Any] = {"model": result.model, "backend": result.backend}
        if result.failed_over:
            meta["failedOver"] = result.failed_over
        return _Outcome(result.vector, "ok", meta)

    async def _approval(self, task: TaskDefinition) -> _Outcome:
        self._status = "waiting"
        timeout = parse_duration(task.timeout)
        try:
            await workflow.wait_condition(
                lambda: bool(self._decisions),
                timeout=timedelta(seconds=timeout) if timeout else None,
            )
            decision = self._decisions.pop(0)
            output: dict[str, Any] = {
                "approved": decision.approved,
                "comment": decision.comment,
                "payload": decision.payload,
                "by": decision.by,
            }
        except TimeoutError:
            output = {"approved": False, "comment": "", "payload": None, "reason": "timeout"}
        finally:
            self._status = "running"
        return _Outcome(output, "approved" if output["approved"] else "rejected")

    def _deterministic(
        self, task: TaskDefinition, handler: str, task_input: Any, scope: dict[str, Any]
    ) -> _Outcome:
        if handler == "noop":
            output = self._output_template(task, task_input, scope)
            return _Outcome(output, engine.as_text(output))
        if handler == "raise_error":
            message = self._render(task.prompt_template, scope) if task.prompt_template else ""
            raise TaskFailure(message or f"task {task.id!r} raised an error")
        if handler == "parse_command":
            parsed = engine.parse_command(engine.as_text(task_input))
            return _Outcome(self._output_template(task, parsed, scope), parsed["command"])
        if handler == "parse_key_value":
            pairs = engine.parse_key_value(engine.as_text(task_input))
            return _Outcome(self._output_template(task, pairs, scope), "ok")
        if handler == "convert_to_openai_chat_response":
            if not engine.is_chat_history(task_input):
                raise TaskFailure("convert_to_openai_chat_response needs a chat history as input")
            info = workflow.info()
            response = engine.openai_chat_response(
                task_input,
                f"chatcmpl-{info.run_id}-{task.id}",
                int(workflow.now().timestamp()),
            )
            return _Outcome(response, "ok")
        raise TaskFailure(
            f"handler {task.handler!r} is not available yet in this version of chainloom"
        )


def _llm_meta(result: LLMResult) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "model": result.model,
        "backend": result.backend,
        "inputTokens": result.input_tokens,
        "outputTokens": result.output_tokens,
    }
    if result.failed_over:
        meta["failedOver"] = result.failed_over
    return meta
