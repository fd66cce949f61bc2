"""What a chain run keeps in its workflow and history, and what goes to the run's records
(docs/chains.md, "Long and large chains").

- A task output, or any field of a state unit, over the run's value_limit is written to the
  run's records and kept as a handle. A chat history is compacted instead: its middle becomes
  a record behind a placeholder message; its leading system messages and its last message
  stay, so chat, tool-call, transition and as_text code reads it unchanged.
- Finished state units are written once the ones held pass FLUSH_BYTES, and all of them
  before the run continues as new. The progress query, the result and failure details carry
  the units not written yet plus how many were (`stateStored`).
- Templates, compose, branches and the handlers that need a stored value's content read it
  back through `run_load` (at most values.READ_LIMIT), and a bounded cache keeps what was
  read or stored. Activities that take handles (js, chat) get them as they are.
- The run continues as new past its steps_per_run, when Temporal suggests it, or before its
  history reaches the 10k events / 10 MB warning marks.
"""

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from chains import engine, templating
    from chains.engine import TaskFailure
    from chains.spec import LLM_PROMPT_HANDLERS, TaskDefinition, canonical_handler
    from workflows import values
    from workflows.contracts import RUN_LOAD, RUN_STORE, failure_message
    from workflows.types import (
        ChainResume,
        ChainRunInput,
        LoadRequest,
        StoreAs,
        StoredRecord,
        StoreRequest,
    )

UNIT = "unit"
VALUE = "value"
# Units held in the workflow are written once they pass this many bytes of JSON.
FLUSH_BYTES = 128 * 1024
# Variables handed to the next run are stored (largest first, each over 1 KiB) until they fit.
CARRY_BYTES = 256 * 1024
CARRY_KEEP = 1024
# Values read back or stored, kept in the workflow for later tasks of the same run.
CACHE_BYTES = 4 << 20
# Continue as new before Temporal's warnings (10k events, 10 MB), whatever the server suggests.
HISTORY_EVENTS = 8000
HISTORY_BYTES = 8 << 20
# The records are infrastructure: a database outage pauses the run rather than failing it.
STORE_OPTIONS: dict[str, Any] = {
    "start_to_close_timeout": timedelta(seconds=60),
    "retry_policy": RetryPolicy(
        initial_interval=timedelta(seconds=1), maximum_interval=timedelta(seconds=30)
    ),
}
# A state unit's fields that may carry a large value; output first, so the others can share
# its record when they are the same value.
UNIT_FIELDS = ("output", "input", "transition", "print", "debug", "logs")


class RunStore:
    def __init__(self, params: ChainRunInput) -> None:
        opts = params.options
        resume = params.resume
        self.tenant_id = params.tenant_id
        self.workflow_id = workflow.info().workflow_id
        self.limit = opts.value_limit
        self.output_max = opts.output_max_bytes
        self.steps_per_run = opts.steps_per_run
        self.stored = resume.stored if resume else 0
        self.runs = resume.runs if resume else 1
        # Value record 0 is the run's input when the API stored it (core/runs.py).
        self._seq = resume.seq if resume else 0
        self.tail: list[dict[str, Any]] = []
        self._tail_bytes = 0
        self._pending: list[StoredRecord] = []
        self._cache = values.Cache(CACHE_BYTES)

    # ------------------------------------------------------------------ continue-as-new

    def should_continue(self, run_steps: int) -> bool:
        if run_steps == 0:
            return False
        info = workflow.info()
        return (
            run_steps >= self.steps_per_run
            or info.is_continue_as_new_suggested()
            or info.get_current_history_length() >= HISTORY_EVENTS
            or info.get_current_history_size() >= HISTORY_BYTES
        )

    async def carry(
        self, task_id: str, variables: dict[str, Any], previous: Any, steps: int
    ) -> ChainResume:
        """Write every unit, store every variable over the value limit (and more, largest
        first, until they fit CARRY_BYTES), and say where the next run starts."""
        kept = {name: self._keep(value, self.limit) for name, value in variables.items()}
        for name, value in variables.items():
            if previous is value:
                previous = kept[name]
        previous = self._keep(previous, self.limit)
        total = values.size_of(kept) + values.size_of(previous)
        for name in sorted(kept, key=lambda n: (-values.size_of(kept[n]), n)):
            if total <= CARRY_BYTES:
                break
            value = kept[name]
            before = values.size_of(value)
            if before <= CARRY_KEEP:
                break
            kept[name] = self._keep(value, CARRY_KEEP)
            if previous is value:
                previous = kept[name]
            total -= before - values.size_of(kept[name])
        if total > CARRY_BYTES:
            previous = self._keep(previous, CARRY_KEEP)
        await self.flush()
        same = next((name for name, value in kept.items() if value is previous), "")
        return ChainResume(
            task=task_id,
            variables=kept,
            previous=None if same else previous,
            previous_var=same,
            steps=steps,
            stored=self.stored,
            seq=self._seq,
            runs=self.runs + 1,
        )

    # ------------------------------------------------------------------ state units

    def extra(self) -> dict[str, Any]:
        """What a result, the progress query and failure details add to the units held."""
        return {"stateStored": self.stored} if self.stored else {}

    async def record(self, unit: dict[str, Any]) -> Any:
        """Keep a finished unit (its large fields stored); returns its output as the chain
        goes on with it. A unit shows in the progress query only once every record it
        refers to is written."""
        for key in UNIT_FIELDS:
            if key in unit:
                unit[key] = self._keep(unit[key], self.limit)
        size = values.size_of(unit)
        if self._tail_bytes + size > FLUSH_BYTES:
            await self._write([*self.tail, unit])
            self._moved()
            self.stored += 1
        else:
            await self._write([])
            self.tail.append(unit)
            self._tail_bytes += size
        return unit.get("output")

    async def flush(self) -> None:
        """Write every unit held and every value not written yet."""
        await self._write(self.tail)
        self._moved()

    def _moved(self) -> None:
        self.stored += len(self.tail)
        self.tail.clear()
        self._tail_bytes = 0

    async def _write(self, units: list[dict[str, Any]]) -> None:
        """Write the values not written yet and `units` (numbered from `stored`)."""
        records = self._pending + [
            part
            for i, unit in enumerate(units)
            for part in values.records_of(UNIT, self.stored + i, unit)
        ]
        if not records:
            return
        for batch in values.batches(records):
            await workflow.execute_activity(
                RUN_STORE,
                StoreRequest(self.tenant_id, self.workflow_id, batch),
                summary=f"store {len(batch)} records",
                **STORE_OPTIONS,
            )
        self._pending = []

    # ------------------------------------------------------------------ storing values

    def slot(self) -> StoreAs:
        """A record number an activity may store its own large result under."""
        return StoreAs(seq=self._next(), above=self.limit, max_bytes=self.output_max)

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def _keep(self, value: Any, above: int) -> Any:
        """`value` as the workflow keeps it: itself, a handle, or a compacted history."""
        if value is None or isinstance(value, bool | int | float) or values.is_handle(value):
            return value
        known = self._cache.ref_of(value)
        if known is not None:
            return known
        size = values.size_of(value)
        if size <= above:
            return value
        if engine.is_chat_history(value):
            return self._compact(value)
        seq = self._next()
        self._pending += values.records_of(VALUE, seq, value)
        ref = values.handle(self.workflow_id, seq, size, values.type_of(value))
        self._cache.put(ref, value, size)
        return ref

    def _compact(self, history: dict[str, Any]) -> dict[str, Any]:
        lead, middle, last = values.split_history(history)
        if all(values.is_placeholder(m) for m in middle):
            return history  # nothing new to store: the last message alone is that large
        seq = self._next()
        self._pending += values.records_of(VALUE, seq, middle)
        marker = values.placeholder(self.workflow_id, seq, middle)
        return {**history, "messages": [*lead, marker, *last]}

    # ------------------------------------------------------------------ reading values

    async def read(self, items: list[Any], labels: list[str]) -> list[Any]:
        """`items` with their handles and placeholders read back (through the cache)."""
        wanted: dict[tuple[str, int], dict[str, Any]] = {}
        got: dict[tuple[str, int], Any] = {}
        for item, label in zip(items, labels, strict=True):
            refs = [item] if values.is_handle(item) else values.placeholders(item)
            for ref in refs:
                size = values.ref_bytes(ref)
                if size > values.READ_LIMIT:
                    raise TaskFailure(
                        f"{label} is a stored value of {size} bytes; a chain reads stored "
                        f"values back into templates, branches and compose up to "
                        f"{values.READ_LIMIT} bytes. Hand it to a js task as its input instead"
                    )
                key = values.ref_key(ref)
                # Taken from the cache now: loading the others may push it out.
                cached, value = self._cache.get(key)
                if cached:
                    got[key] = value
                else:
                    wanted[key] = ref
        batch: list[dict[str, Any]] = []
        used = 0
        for ref in wanted.values():
            size = values.ref_bytes(ref)
            if batch and used + size > values.READ_LIMIT:
                got.update(await self._load(batch))
                batch, used = [], 0
            batch.append(ref)
            used += size
        if batch:
            got.update(await self._load(batch))
        return [self._rebuild(item, got) for item in items]

    async def _load(self, refs: list[dict[str, Any]]) -> dict[tuple[str, int], Any]:
        try:
            found: list[Any] = await workflow.execute_activity(
                RUN_LOAD,
                LoadRequest(self.tenant_id, refs, values.READ_LIMIT + 64 * 1024),
                result_type=list,
                summary=f"read {len(refs)} stored values",
                **STORE_OPTIONS,
            )
        except ActivityError as err:
            raise TaskFailure(failure_message(err)) from err
        out: dict[tuple[str, int], Any] = {}
        for ref, value in zip(refs, found, strict=True):
            out[values.ref_key(ref)] = value
            self._cache.put(ref, value, values.ref_bytes(ref))
        return out

    def _rebuild(self, item: Any, got: dict[tuple[str, int], Any]) -> Any:
        def value_of(ref: dict[str, Any]) -> Any:
            return got[values.ref_key(ref)]

        if values.is_handle(item):
            return value_of(item)
        if not values.placeholders(item):
            return item
        messages: list[Any] = []
        for message in item["messages"]:
            if values.is_placeholder(message):
                messages.extend(value_of(message))
            else:
                messages.append(message)
        return {**item, "messages": messages}

    # ------------------------------------------------------------------ around a task

    async def prepare(
        self, task: TaskDefinition, task_input: Any, variables: dict[str, Any], previous: Any
    ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """(input, scope, variables) to run `task` with: the stored values its templates,
        compose and handler read, read back; everything else as it is."""
        scope = {**variables, "previous_output": previous}
        wanted = [
            name
            for name in sorted(_template_names(task))
            if name in scope and values.has_stored(scope[name])
        ]
        with_var = task.compose.with_var if task.compose else ""
        if with_var and with_var not in wanted and values.is_handle(variables.get(with_var)):
            wanted.append(with_var)
        handler = canonical_handler(task.handler)
        whole_input = values.has_stored(task_input) and _reads_input(task, handler, task_input)
        if not wanted and not whole_input:
            return task_input, scope, variables
        items = [scope[name] for name in wanted]
        labels = [f"variable {name!r}" for name in wanted]
        if whole_input:
            items.append(task_input)
            labels.append(f"the input of task {task.id!r}")
        got = await self.read(items, labels)
        scope = dict(scope)
        variables = dict(variables)
        for name, value in zip(wanted, got, strict=False):
            scope[name] = value
            if name in variables:
                variables[name] = value
        return (got[-1] if whole_input else task_input), scope, variables

    async def settle(
        self, task: TaskDefinition, output: Any, transition: str
    ) -> tuple[Any, str, Any]:
        """After a task returned a stored output: (output, transition, transition shown).

        The value is read back only when compose or print uses it or a branch other than
        `default` must compare it; otherwise it goes on as a handle, and the unit shows the
        handle as its transition (readers show the text) where the text was the value."""
        if not values.is_handle(output):
            return output, transition, None
        handler = canonical_handler(task.handler)
        uses = bool(task.compose and task.compose.with_var) or _print_reads_output(task)
        branches = any(b.operator != "default" for b in task.transition.branches)
        if not uses and not branches:
            textual = handler == "noop" or values.type_of(output) == "string"
            return output, "" if handler == "noop" else transition, output if textual else None
        (value,) = await self.read([output], [f"the output of task {task.id!r}"])
        if branches:
            if handler == "noop":
                transition = engine.as_text(value)
            else:
                transition = value if isinstance(value, str) else "ok"
        return (value if uses else output), transition, None


def _template_names(task: TaskDefinition) -> set[str]:
    texts = [task.prompt_template, task.system_instruction, task.output_template, task.print]
    if task.hook is not None:
        texts += [v for v in task.hook.args.values() if isinstance(v, str)]
    names: set[str] = set()
    for text in texts:
        if text and ("{{" in text or "{%" in text):
            names |= _names(text)
    return names


def _names(template: str) -> set[str]:
    try:
        return templating.template_variables(template)
    except templating.TemplateError:
        return set()  # rendering reports it as the task's failure


def _print_reads_output(task: TaskDefinition) -> bool:
    return bool(task.print) and bool(_names(task.print) & {task.id, "previous_output"})


def _reads_input(task: TaskDefinition, handler: str, value: Any) -> bool:
    """Whether `handler` needs a stored input's content in the workflow; js reads handles
    itself, chat and tool-call tasks work on compacted histories, prompts ignore input."""
    whole = values.is_handle(value)
    if handler == "js":
        return False
    if handler == "noop":
        # output_template sees the input as `output`, and a mapping's keys as variables.
        if not task.output_template:
            return False
        used = _names(task.output_template)
        return "output" in used or values.type_of(value) in ("json", "chat_history")
    if handler == "convert_to_openai_chat_response":
        # It answers with the last assistant message, which compaction keeps after a chat.
        if whole:
            return True
        for message in reversed(value.get("messages") or []):
            if values.is_placeholder(message):
                return True
            if message.get("role") == "assistant":
                return False
        return True
    if handler in ("chat_completion", "execute_tool_calls", "parse_command", "parse_key_value"):
        return whole
    if handler == "text_to_embedding":
        return whole and not task.prompt_template
    if handler in LLM_PROMPT_HANDLERS or handler in ("hook", "approval", "raise_error"):
        return False
    return True
