"""The body of ChainWorkflow (workflows/chain.py): the step loop and every handler.

Only model calls (and later hooks and JS) leave the workflow as activities; templating,
parsing, conditions and transitions run here, deterministically, so they cost no round trip
and replay for free.
"""

import dataclasses
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
    from workflows import values
    from workflows.chain_store import RunStore
    from workflows.chain_tools import Outcome, ToolSteps
    from workflows.contracts import (
        CHAIN_FAILED,
        LLM_CHAT,
        LLM_EMBED,
        PERMANENT_LLM_ERROR,
        RUN_NOT_WAITING,
        RUN_PHASE,
        failure_message,
    )
    from workflows.types import (
        ApprovalDecision,
        ChainRunInput,
        EmbedRequest,
        EmbedResult,
        LLMRequest,
        LLMResult,
        ModelChoice,
        StoreAs,
        ToolSpec,
    )

# Patch ids (docs/workflows.md); js-tools-direct lives with the tool steps.
# Approvals arrive through the approve update (refused unless the run waits on an approval
# task) and the wait is marked in RunPhase; before, the approve signal was queued, early ones
# included.
APPROVAL_UPDATE = "approval-update"
# Templates, task outputs and the result are limited (RunOptions); runs recorded before
# replay unlimited.
CHAIN_LIMITS = "chain-limits"
# Long and large chains: continue-as-new, values and state units in the run's records.
BOUNDED_CHAINS = "bounded-chains"
TOOL_CALL = "tool-call"


class ChainRun(ToolSteps):
    """Everything ChainWorkflow does, in a module the sandbox shares between runs instead of
    compiling and executing it again for each one (docs/benchmarks.md measured 4 ms a run
    where bytecode cannot be cached). State lives on the instance, never in the module."""

    def __init__(self) -> None:
        self._state: list[dict[str, Any]] = []
        self._status = "running"
        self._current = ""
        self._decisions: list[ApprovalDecision] = []
        # The approval task the run waits on, and the decision the update gave it.
        self._awaiting: str | None = None
        self._answer: ApprovalDecision | None = None
        self._output: Any = None
        self._step = 0
        self._limited = False
        self._limits = templating.UNLIMITED
        self._allowance: templating.Allowance | None = None
        self._allowance_at = -1
        self._store: RunStore | None = None
        self._task_attempt = 1

    def _not_waiting(self) -> ApplicationError:
        where = f"it is on task {self._current!r}" if self._current else "it is on no task"
        return ApplicationError(
            f"the run is not waiting for an approval: {where}",
            {"currentTask": self._current or None},
            type=RUN_NOT_WAITING,
            non_retryable=True,
        )

    async def _run_chain(self, params: ChainRunInput) -> dict[str, Any]:
        """The whole run: ChainWorkflow.run is this, for the sandbox's sake (see its docstring)."""
        chain = ChainDefinition.model_validate(params.chain)
        self._params = params
        self._chain = chain
        if workflow.patched(CHAIN_LIMITS):
            self._limited = True
            opts = params.options
            self._limits = templating.Limits(
                opts.template_max_output_bytes, opts.template_max_operations
            )
        variables: dict[str, Any] = {"input": params.input}
        previous: Any = params.input
        task: TaskDefinition | None = chain.tasks[0]
        steps = 0
        # Runs started before bounded chains keep everything in the workflow, as they did.
        if workflow.patched(BOUNDED_CHAINS):
            self._store = RunStore(params)
            self._state = self._store.tail
            resume = params.resume
            if resume is not None:
                variables, previous, steps = dict(resume.variables), resume.previous, resume.steps
                if resume.previous_var:
                    previous = variables[resume.previous_var]
                self._decisions = [ApprovalDecision(**d) for d in resume.decisions]
                task = self._goto(resume.task, resume.task)
        run_steps = 0
        while task is not None:
            if self._store is not None and self._store.should_continue(run_steps):
                await self._continue_as_new(task, variables, previous, steps)
            run_steps += 1
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
                "input": values.text_of(task_input),
                "inputType": values.type_of(task_input),
                "startedAt": started.isoformat().replace("+00:00", "Z"),
            }
            outcome: Outcome | None = None
            error = ""
            attempts = task.retry_on_failure + 1
            for attempt in range(1, attempts + 1):
                unit["attempt"] = attempt
                self._task_attempt = attempt
                try:
                    outcome = await self._attempt(task, task_input, variables, previous)
                    break
                except TaskFailure as err:
                    error = str(err)
            finished = workflow.now()
            unit["duration"] = int((finished - started).total_seconds() * 1e9)
            if outcome is None:
                unit.update(output="", outputType="string", transition="", error={"error": error})
                await self._record(unit)
                if task.transition.on_failure:
                    variables["error"] = error
                    task = self._goto(task.transition.on_failure, task.id)
                    continue
                self._fail(f"task {task.id!r} ({task.handler}) failed: {error}")
            unit.update(outcome.meta)
            unit.update(
                output=outcome.output,
                outputType=values.type_of(outcome.output),
                transition=outcome.transition if outcome.shown is None else outcome.shown,
                error={"error": ""},
            )
            output = await self._record(unit)
            variables[task.id] = output
            previous = output
            target = engine.next_task(task.transition, outcome.transition)
            if target is None:
                self._fail(
                    f"task {task.id!r}: no branch matches transition value "
                    f"{outcome.transition[:200]!r} and there is no default branch"
                )
            task = None if target == TERM_END else self._goto(str(target), task.id)
        answer = {
            "output": previous,
            "outputType": values.type_of(previous),
            "state": self._state,
            **self._stored(),
        }
        if self._limited:
            # A result over Temporal's payload limit could never be recorded: the run would
            # retry its last workflow task forever.
            size, limit = engine.payload_size(answer), self._params.options.run_result_max_bytes
            if size > limit:
                self._fail(
                    f"the run's result is {size} bytes, over the {limit}-byte limit "
                    "(CHAINLOOM_RUN_RESULT_MAX_BYTES): its output and per-task state are too large"
                )
        self._status = "completed"
        self._current = ""
        self._output = previous
        return answer

    async def _attempt(
        self, task: TaskDefinition, task_input: Any, variables: dict[str, Any], previous: Any
    ) -> Outcome:
        scope = {**variables, "previous_output": previous}
        if self._store is not None:
            task_input, scope, variables = await self._store.prepare(
                task, task_input, variables, previous
            )
        result = await self._execute(task, task_input, scope)
        if self._store is not None:
            result.output, result.transition, result.shown = await self._store.settle(
                task, result.output, result.transition
            )
        self._finish(task, result, variables)
        return result

    async def _record(self, unit: dict[str, Any]) -> Any:
        if self._store is None:
            self._state.append(unit)
            return unit.get("output")
        return await self._store.record(unit)

    def _stored(self) -> dict[str, Any]:
        return self._store.extra() if self._store is not None else {}

    def _slot(self) -> StoreAs | None:
        return self._store.slot() if self._store is not None else None

    async def _continue_as_new(
        self, task: TaskDefinition, variables: dict[str, Any], previous: Any, steps: int
    ) -> NoReturn:
        assert self._store is not None
        await workflow.wait_condition(workflow.all_handlers_finished)
        resume = await self._store.carry(task.id, variables, previous, steps)
        # Signals that came while the records were written are carried too.
        await workflow.wait_condition(workflow.all_handlers_finished)
        resume.decisions = [dataclasses.asdict(d) for d in self._decisions]
        workflow.continue_as_new(dataclasses.replace(self._params, input=None, resume=resume))

    def _goto(self, target: str, source: str) -> TaskDefinition | None:
        if target in ("", TERM_END):
            return None
        found = self._chain.task(target)
        if found is None:
            self._fail(f"task {source!r} jumps to unknown task {target!r}")
        return found

    def _fail(self, message: str) -> NoReturn:
        self._status = "failed"
        state = self._state
        if self._limited:
            state = engine.trim_state(state, self._params.options.run_result_max_bytes // 2)
            message = message if len(message) <= 8000 else message[:8000] + "..."
        raise ApplicationError(
            message, {"state": state, **self._stored()}, type=CHAIN_FAILED, non_retryable=True
        )

    def _finish(self, task: TaskDefinition, outcome: Outcome, variables: dict[str, Any]) -> None:
        """Compose and print; a failure here is the task's failure, like any other."""
        try:
            if task.compose and task.compose.with_var:
                outcome.output = engine.compose(
                    outcome.output, variables.get(task.compose.with_var), task.compose.strategy
                )
            if task.print:
                scope = {**variables, task.id: outcome.output, "previous_output": outcome.output}
                outcome.meta["print"] = self._render(task.print, scope)
        except templating.TemplateError as err:
            raise TaskFailure(f"template error: {err}") from err
        if self._limited:
            limit = self._params.options.task_output_max_bytes
            size = engine.payload_size(outcome.output)
            if size > limit:
                raise TaskFailure(
                    f"output is {size} bytes, over the {limit}-byte limit for one task's output "
                    "(CHAINLOOM_TASK_OUTPUT_MAX_BYTES)"
                )

    async def _execute(
        self, task: TaskDefinition, task_input: Any, scope: dict[str, Any]
    ) -> Outcome:
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
        if not self._limited:
            return templating.render(template, scope, self._limits)
        # Everything rendered in one workflow task runs before the worker hears back, so it
        # shares one budget: the history length tells workflow tasks apart, deterministically.
        at = workflow.info().get_current_history_length()
        if at != self._allowance_at:
            total = self._limits.max_operations * templating.ALLOWANCE_FACTOR
            self._allowance, self._allowance_at = templating.Allowance(total), at
        return templating.render(template, scope, self._limits, self._allowance)

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

    async def _prompt(self, task: TaskDefinition, handler: str, scope: dict[str, Any]) -> Outcome:
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
        return Outcome(output, engine.as_text(output), meta)

    async def _chat(self, task: TaskDefinition, task_input: Any, scope: dict[str, Any]) -> Outcome:
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
        return Outcome(history, transition, _llm_meta(result))

    async def _embed(self, task: TaskDefinition, task_input: Any, scope: dict[str, Any]) -> Outcome:
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
        return Outcome(result.vector, "ok", meta)

    async def _approval(self, task: TaskDefinition) -> Outcome:
        # Histories from before the patch wait for the signal (and replay as they ran); an
        # update can still answer them once this code runs them.
        current = workflow.patched(APPROVAL_UPDATE)
        self._status = "waiting"
        self._awaiting = task.id
        self._answer = None
        if current:
            workflow.upsert_search_attributes([RUN_PHASE.value_set("waiting")])
        timeout = parse_duration(task.timeout)
        timed_out = False
        try:
            await workflow.wait_condition(
                lambda: self._answer is not None or (not current and bool(self._decisions)),
                timeout=timedelta(seconds=timeout) if timeout else None,
            )
        except TimeoutError:
            timed_out = True
        finally:
            self._status = "running"
            self._awaiting = None
            if current:
                workflow.upsert_search_attributes([RUN_PHASE.value_set("running")])
        # An accepted update was answered to its sender: it wins even over a timer that fired
        # in the same workflow task.
        decision = self._answer
        self._answer = None
        if decision is None and not timed_out and self._decisions:
            decision = self._decisions.pop(0)  # the legacy signal, before the patch
        if decision is None:
            output: dict[str, Any] = {
                "approved": False,
                "comment": "",
                "payload": None,
                "reason": "timeout",
            }
        else:
            output = {
                "approved": decision.approved,
                "comment": decision.comment,
                "payload": decision.payload,
                "by": decision.by,
            }
        return Outcome(output, "approved" if output["approved"] else "rejected")

    def _deterministic(
        self, task: TaskDefinition, handler: str, task_input: Any, scope: dict[str, Any]
    ) -> Outcome:
        if handler == "noop":
            output = self._output_template(task, task_input, scope)
            return Outcome(output, engine.as_text(output))
        if handler == "raise_error":
            message = self._render(task.prompt_template, scope) if task.prompt_template else ""
            raise TaskFailure(message or f"task {task.id!r} raised an error")
        if handler == "parse_command":
            parsed = engine.parse_command(engine.as_text(task_input))
            return Outcome(self._output_template(task, parsed, scope), parsed["command"])
        if handler == "parse_key_value":
            pairs = engine.parse_key_value(engine.as_text(task_input))
            return Outcome(self._output_template(task, pairs, scope), "ok")
        if handler == "convert_to_openai_chat_response":
            if not engine.is_chat_history(task_input):
                raise TaskFailure("convert_to_openai_chat_response needs a chat history as input")
            info = workflow.info()
            response = engine.openai_chat_response(
                task_input,
                f"chatcmpl-{info.run_id}-{task.id}",
                int(workflow.now().timestamp()),
            )
            return Outcome(response, "ok")
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
