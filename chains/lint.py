"""Static checks on a schema-valid chain: the mistakes pydantic cannot see.

Everything here works on the chain alone (plus optional registries of hook and model names), so
it runs the same in the CLI, the API and before a workflow starts. Problems carry JSON pointers
into the chain document so an editor or the CLI can point at the offending field.
"""

import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass

from chains.engine import parse_bounds
from chains.spec import (
    CHAT_HANDLERS,
    EMBED_HANDLERS,
    HANDLERS,
    LLM_PROMPT_HANDLERS,
    TERM_END,
    ChainDefinition,
    TaskDefinition,
    canonical_handler,
)
from chains.templating import TEMPLATE_BUILTINS, TemplateCompileError, template_variables

__all__ = ["LLM_HANDLERS", "TEMPLATE_FIELDS", "TEMPLATE_VARIABLES", "Problem", "lint_chain"]

LLM_HANDLERS = LLM_PROMPT_HANDLERS | CHAT_HANDLERS | EMBED_HANDLERS

# Task fields rendered as templates.
TEMPLATE_FIELDS = ("system_instruction", "prompt_template", "print", "output_template")

# Variables every template may read besides task ids; `error` only exists after an on_failure
# jump but is still a legitimate name to mention.
TEMPLATE_VARIABLES = frozenset({"input", "previous_output", "error"})

_HOOK_NAME_HANDLERS = frozenset({"hook", "js"})


@dataclass(frozen=True)
class Problem:
    """One finding; ``pointer`` is a JSON pointer into the chain document ("" = the root)."""

    pointer: str
    message: str
    severity: str = "error"  # "error" blocks loading, "warning" does not

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def __str__(self) -> str:
        return f"{self.pointer or '(root)'}: {self.message}"


def _suggest(name: str, candidates: Iterable[str]) -> str:
    matches = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{matches[0]}'?" if matches else ""


def _is_end(target: str) -> bool:
    return target in ("", TERM_END)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class _Linter:
    def __init__(
        self,
        chain: ChainDefinition,
        known_hooks: set[str] | None,
        known_models: set[str] | None,
    ) -> None:
        self.chain = chain
        self.known_hooks = known_hooks
        self.known_models = known_models
        self.problems: list[Problem] = []
        # First occurrence wins, as in ChainDefinition.task().
        self.index: dict[str, int] = {}
        for i, task in enumerate(chain.tasks):
            self.index.setdefault(task.id, i)

    def error(self, pointer: str, message: str) -> None:
        self.problems.append(Problem(pointer, message, "error"))

    def warning(self, pointer: str, message: str) -> None:
        self.problems.append(Problem(pointer, message, "warning"))

    def run(self) -> list[Problem]:
        for i, task in enumerate(self.chain.tasks):
            base = f"/tasks/{i}"
            first = self.index[task.id]
            if first != i:
                self.error(f"{base}/id", f"duplicate task id '{task.id}' (first at /tasks/{first})")
            self.check_handler(base, task)
            self.check_transition(base, task)
            self.check_variables(base, task)
            self.check_templates(base, task)
            self.check_registries(base, task)
        self.check_graph()
        return self.problems

    def check_handler(self, base: str, task: TaskDefinition) -> None:
        handler = task.handler
        if handler not in HANDLERS:
            self.error(
                f"{base}/handler", f"unknown handler '{handler}'{_suggest(handler, HANDLERS)}"
            )
            return
        if canonical_handler(handler) == "prompt_to_condition" and not task.valid_conditions:
            self.error(
                f"{base}/valid_conditions",
                f"handler '{handler}' needs valid_conditions: the answers the model may give "
                'and the boolean each stands for, e.g. {"yes": true, "no": false}',
            )
        # Chat and embedding handlers work on the task input; only prompt handlers have no
        # text to send without a prompt_template.
        if handler in LLM_PROMPT_HANDLERS and not task.prompt_template.strip():
            self.error(f"{base}/prompt_template", f"handler '{handler}' needs a prompt_template")
        if handler in _HOOK_NAME_HANDLERS and task.hook is None:
            what = "hook" if handler == "hook" else "JS function"
            self.error(f"{base}/hook", f"handler '{handler}' needs hook.name (the {what} to run)")

    def check_target(self, pointer: str, target: str, label: str) -> None:
        if _is_end(target) or target in self.index:
            return
        self.error(
            pointer,
            f"{label}goto target '{target}' is not a task of this chain (nor '{TERM_END}')"
            f"{_suggest(target, self.index)}",
        )

    def check_transition(self, base: str, task: TaskDefinition) -> None:
        transition = task.transition
        if transition.on_failure:
            self.check_target(
                f"{base}/transition/on_failure", transition.on_failure, "on_failure: "
            )
        first_default: int | None = None
        for j, branch in enumerate(transition.branches):
            at = f"{base}/transition/branches/{j}"
            self.check_target(f"{at}/goto", branch.goto, "")
            if branch.operator == "default":
                if first_default is None:
                    first_default = j
                else:
                    self.error(
                        f"{at}/operator",
                        f"more than one 'default' branch (the first is branches/{first_default})",
                    )
                continue
            if first_default is not None:
                self.warning(
                    at,
                    f"branch after the 'default' branch (branches/{first_default}) reads like an "
                    "unreachable branch; it is not ('default' is tried last wherever it stands) "
                    "but put 'default' last",
                )
            if branch.operator in ("gt", "lt") and _number(branch.when) is None:
                self.error(
                    f"{at}/when",
                    f"operator '{branch.operator}' compares numbers, but when is "
                    f"'{branch.when}' (not a number)",
                )
            elif branch.operator == "in_range":
                try:
                    parse_bounds(branch.when)
                except ValueError:
                    self.error(
                        f"{at}/when",
                        f'operator \'in_range\' needs when as "lo-hi" numbers (e.g. "1-5"), '
                        f"got '{branch.when}'",
                    )

    def check_variables(self, base: str, task: TaskDefinition) -> None:
        names = set(self.index) | {"input"}
        if task.input_var and task.input_var not in names:
            self.error(
                f"{base}/input_var",
                f"input_var '{task.input_var}' names neither 'input' nor a task of this chain"
                f"{_suggest(task.input_var, names)}",
            )
        if task.compose is not None and task.compose.with_var:
            with_var = task.compose.with_var
            if with_var not in names:
                self.error(
                    f"{base}/compose/with_var",
                    f"compose.with_var '{with_var}' names neither 'input' nor a task of this "
                    f"chain{_suggest(with_var, names)}",
                )

    def check_templates(self, base: str, task: TaskDefinition) -> None:
        allowed = TEMPLATE_VARIABLES | TEMPLATE_BUILTINS | set(self.index)
        for field in TEMPLATE_FIELDS:
            text: str = getattr(task, field)
            if not text:
                continue
            try:
                used = template_variables(text)
            except TemplateCompileError as exc:
                self.error(f"{base}/{field}", f"{field} does not compile: {exc}")
                continue
            # output_template reads the fields of the hook's JSON output, which lint cannot know.
            if field == "output_template":
                continue
            for name in sorted(used - allowed):
                self.warning(
                    f"{base}/{field}",
                    f"template variable '{name}' is neither input, previous_output, error nor a "
                    f"task id{_suggest(name, allowed)}; rendering fails unless it is defined",
                )

    def check_registries(self, base: str, task: TaskDefinition) -> None:
        hooks = self.known_hooks
        if hooks is not None:
            if task.handler == "hook" and task.hook is not None and task.hook.name not in hooks:
                self.error(
                    f"{base}/hook/name",
                    f"unknown hook '{task.hook.name}'{_suggest(task.hook.name, hooks)}",
                )
            if task.execute_config is not None:
                for k, name in enumerate(task.execute_config.hooks):
                    if name not in hooks:
                        self.error(
                            f"{base}/execute_config/hooks/{k}",
                            f"unknown hook '{name}'{_suggest(name, hooks)}",
                        )
        models = self.known_models
        if models is not None and task.execute_config is not None:
            config = task.execute_config
            named = [("model", config.model)] + [
                (f"models/{k}", name) for k, name in enumerate(config.models)
            ]
            for where, name in named:
                if name and name not in models:
                    self.warning(
                        f"{base}/execute_config/{where}",
                        f"model '{name}' is not served by any known backend"
                        f"{_suggest(name, models)}",
                    )

    def successors(self, task: TaskDefinition) -> tuple[list[str], bool]:
        """Task ids a task can move to, and whether it can end the chain directly."""
        transition = task.transition
        # No branches: the chain ends after this task (there is no fall-through).
        can_end = not transition.branches
        targets: list[str] = [b.goto for b in transition.branches]
        if transition.on_failure:  # empty means "no failure handler", not "end"
            targets.append(transition.on_failure)
        known: list[str] = []
        for target in targets:
            if _is_end(target) or target not in self.index:
                # Unknown targets are reported already; counting them as exits avoids a
                # second, misleading "loop with no exit" for the same typo.
                can_end = True
            else:
                known.append(target)
        return known, can_end

    def check_graph(self) -> None:
        tasks = self.chain.tasks
        order = list(self.index)
        edges: dict[str, list[str]] = {}
        exits: set[str] = set()
        for task_id, i in self.index.items():
            edges[task_id], ends = self.successors(tasks[i])
            if ends:
                exits.add(task_id)

        reached = {tasks[0].id}
        stack = [tasks[0].id]
        while stack:
            for target in edges[stack.pop()]:
                if target not in reached:
                    reached.add(target)
                    stack.append(target)
        for task_id in order:
            if task_id not in reached:
                self.error(
                    f"/tasks/{self.index[task_id]}",
                    f"task '{task_id}' is unreachable: no goto or on_failure leads to it from "
                    f"the first task '{tasks[0].id}'",
                )

        # Walk backwards from the tasks that can end the chain; what is left can never end.
        reverse: dict[str, list[str]] = {task_id: [] for task_id in order}
        for source, targets in edges.items():
            for target in targets:
                reverse[target].append(source)
        finishable = set(exits)
        stack = list(exits)
        while stack:
            for source in reverse[stack.pop()]:
                if source not in finishable:
                    finishable.add(source)
                    stack.append(source)
        stuck = [task_id for task_id in order if task_id not in finishable]
        for component in _cycles(stuck, edges):
            ids = sorted(component, key=self.index.__getitem__)
            names = ", ".join(f"'{task_id}'" for task_id in ids)
            self.error(
                f"/tasks/{self.index[ids[0]]}/transition",
                f"loop with no exit: tasks {names} can never reach '{TERM_END}'; add a branch "
                "that leaves the loop",
            )


def _cycles(nodes: list[str], edges: dict[str, list[str]]) -> list[set[str]]:
    """Strongly connected components of ``nodes`` that contain a cycle (iterative Tarjan)."""
    members = set(nodes)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[set[str]] = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, child = work.pop()
            if child == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            targets = [t for t in edges[node] if t in members]
            if child < len(targets):
                work.append((node, child + 1))
                target = targets[child]
                if target not in index:
                    work.append((target, 0))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges[node]:
                    found.append(component)
    return found


def lint_chain(
    chain: ChainDefinition,
    known_hooks: set[str] | None = None,
    known_models: set[str] | None = None,
) -> list[Problem]:
    """All problems of a schema-valid chain, errors and warnings, in document order per task.

    ``known_hooks``/``known_models`` enable the registry checks; None skips them (e.g. when
    linting offline).
    """
    return _Linter(chain, known_hooks, known_models).run()
