"""The chain language: loading, schema errors, lint rules, examples, JSON Schema, templates."""

import json
from pathlib import Path
from typing import Any

import pytest

from chains.lint import Problem, lint_chain
from chains.loader import (
    ChainError,
    check_chain,
    json_pointer,
    load_chain,
    load_chain_file,
    parse_chain_text,
    validate_chain,
)
from chains.spec import ChainDefinition

EXAMPLES = Path(__file__).resolve().parent.parent / "chains" / "examples"
MODELS = {"gpt-4o-mini"}

YAML_CHAIN = """
id: hello
description: greet
tasks:
  - id: greet
    handler: prompt_to_string
    prompt_template: "Say hello to {{ input }}"
    execute_config:
      model: gpt-4o-mini
      models: [gpt-4o, llama3]
    transition:
      branches:
        - operator: default
          goto: end
"""


def end_branch() -> dict[str, Any]:
    return {"operator": "default", "goto": "end"}


def task(task_id: str, handler: str = "noop", *branches: dict[str, Any], **fields: Any) -> dict:
    data: dict[str, Any] = {"id": task_id, "handler": handler, **fields}
    if branches:
        data.setdefault("transition", {})["branches"] = list(branches)
    return data


def goto(target: str, operator: str = "default", when: str = "") -> dict[str, Any]:
    return {"operator": operator, "when": when, "goto": target}


def make_chain(*tasks: dict[str, Any], **fields: Any) -> ChainDefinition:
    return ChainDefinition.model_validate({"id": "test", "tasks": list(tasks), **fields})


def lint(*tasks: dict[str, Any], **kwargs: Any) -> list[Problem]:
    return lint_chain(make_chain(*tasks), **kwargs)


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def at(problems: list[Problem], pointer: str) -> list[Problem]:
    return [p for p in problems if p.pointer == pointer]


# --- parsing and loading --------------------------------------------------------------------


def test_load_yaml_text() -> None:
    chain = load_chain(YAML_CHAIN)
    assert chain.id == "hello"
    assert chain.tasks[0].execute_config is not None
    assert chain.tasks[0].execute_config.models == ["gpt-4o", "llama3"]
    assert chain.tasks[0].transition.branches[0].operator == "default"


def test_load_json_text_and_dict() -> None:
    data = parse_chain_text(YAML_CHAIN)
    text = json.dumps(data)
    assert load_chain(text) == load_chain(data) == load_chain(YAML_CHAIN)


def test_load_file_by_extension(tmp_path: Path) -> None:
    yaml_file = tmp_path / "chain.yml"
    yaml_file.write_text(YAML_CHAIN)
    json_file = tmp_path / "chain.json"
    json_file.write_text(json.dumps(parse_chain_text(YAML_CHAIN), indent=2))
    assert load_chain_file(yaml_file) == load_chain_file(json_file) == load_chain(json_file)


def test_brace_without_extension_falls_back_to_yaml_flow_mapping() -> None:
    data = parse_chain_text("{id: flow, tasks: [{id: a, handler: noop}]}")
    assert data["id"] == "flow"


def test_seed_style_json_strings_and_single_branch_object() -> None:
    # The example task of seed 003 (taskengine_TaskDefinition), verbatim in shape.
    seed_task = {
        "compose": {"strategy": "override", "with_var": "input"},
        "description": "Validates user input meets quality requirements",
        "execute_config": {
            "hide_tools": '["tool1", "hook_name1.tool1"]',
            "hooks": '["slack_notification", "email_notification"]',
            "model": "mistral:instruct",
            "models": '["gpt-4", "gpt-3.5-turbo"]',
            "pass_clients_tools": True,
            "provider": "ollama",
            "providers": '["ollama", "openai"]',
            "temperature": 0.7,
        },
        "handler": "condition_key",
        "hook": {
            "args": '{"channel": "#alerts", "message": "Task completed successfully"}',
            "name": "slack",
            "tool_name": "send_slack_notification",
        },
        "id": "validate_input",
        "input_var": "input",
        "output_template": "Hook result: {{.status}}",
        "print": "Validation result: {{.validate_input}}",
        "prompt_template": "Is this input valid? {{.input}}",
        "retry_on_failure": 2,
        "system_instruction": "You are a quality control assistant.",
        "timeout": "30s",
        "transition": {
            "branches": {"goto": "positive_response", "operator": "equals", "when": "yes"},
            "on_failure": "error_handler",
        },
        "valid_conditions": '{"valid": true, "invalid": true}',
    }
    chain = load_chain(
        json.dumps(
            {
                "id": "seed",
                "debug": True,
                "token_limit": 0,
                "tasks": [seed_task, task("positive_response"), task("error_handler")],
            }
        )
    )
    first = chain.tasks[0]
    assert first.execute_config is not None
    assert first.execute_config.hooks == ["slack_notification", "email_notification"]
    assert first.execute_config.models == ["gpt-4", "gpt-3.5-turbo"]
    assert first.execute_config.hide_tools == ["tool1", "hook_name1.tool1"]
    assert first.hook is not None and first.hook.args["channel"] == "#alerts"
    assert first.valid_conditions == {"valid": True, "invalid": True}
    assert [b.goto for b in first.transition.branches] == ["positive_response"]


def test_yaml_scalars_stay_text() -> None:
    data = parse_chain_text(
        "a: yes\nb: no\nc: on\nd: true\ne: False\nf: 2024-01-01\ng: 5\nh: 0.5\n"
    )
    assert data == {
        "a": "yes",
        "b": "no",
        "c": "on",
        "d": True,
        "e": False,
        "f": "2024-01-01",
        "g": 5,
        "h": 0.5,
    }
    chain = load_chain(
        """
id: when-values
tasks:
  - id: a
    handler: noop
    transition:
      branches:
        - {operator: equals, when: yes, goto: end}
        - {operator: equals, when: true, goto: end}
        - {operator: gt, when: 5, goto: end}
"""
    )
    assert [b.when for b in chain.tasks[0].transition.branches] == ["yes", "true", "5"]


@pytest.mark.parametrize(
    ("text", "filename", "expected"),
    [
        ("id: a\ntasks: [\n  {id: x\n", "bad.yaml", "line "),
        ("id: a\n  tasks: 1\n", "", "line 2, column 8: invalid YAML"),
        ('{"id": "a",\n "tasks": [}', "bad.json", "bad.json: line 2, column 12: invalid JSON"),
        ('{"id": "a" "tasks": []}', "", "line 1, column 12: invalid JSON: Expecting ','"),
    ],
)
def test_syntax_errors_carry_line_numbers(text: str, filename: str, expected: str) -> None:
    with pytest.raises(ChainError) as info:
        parse_chain_text(text, filename)
    assert expected in str(info.value)
    assert info.value.problems[0].pointer == ""


@pytest.mark.parametrize(
    ("text", "filename"), [("id: a\nid: b\n", "x.yaml"), ('{"id": "a", "id": "b"}', "x.json")]
)
def test_duplicate_keys_are_rejected(text: str, filename: str) -> None:
    with pytest.raises(ChainError, match="duplicate key 'id'"):
        parse_chain_text(text, filename)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("# only a comment\n", "empty"),
        ("- a\n- b\n", "got list"),
        ("chains/examples/sentiment-router.yaml", "pass a pathlib.Path"),
    ],
)
def test_non_mapping_documents(text: str, message: str) -> None:
    with pytest.raises(ChainError, match=message):
        load_chain(text)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ChainError, match="cannot read"):
        load_chain_file(tmp_path / "missing.yaml")


# --- schema errors as pointers --------------------------------------------------------------


def test_json_pointer_escaping() -> None:
    assert json_pointer(("tasks", 0, "transition")) == "/tasks/0/transition"
    assert json_pointer(("a/b", "c~d")) == "/a~1b/c~0d"
    assert json_pointer(()) == ""


def test_schema_errors_have_pointers_and_messages() -> None:
    data = {
        "id": "bad",
        "tasks": [
            {
                "id": "a",
                "handler": "noop",
                "promt_template": "x",
                "timeout": "soon",
                "transition": {"branches": [{"operator": "bigger", "goto": "end"}]},
            },
            {"id": "b"},
            {"id": "bad id", "handler": "noop", "execute_config": {"temperature": 3}},
        ],
    }
    with pytest.raises(ChainError) as info:
        load_chain(data)
    problems = {p.pointer: p.message for p in info.value.problems}
    assert "did you mean 'prompt_template'" in problems["/tasks/0/promt_template"]
    assert problems["/tasks/0/promt_template"].startswith("unknown field 'promt_template'")
    assert '"soon"' in problems["/tasks/0/timeout"]
    assert "'equals'" in problems["/tasks/0/transition/branches/0/operator"]
    assert '"bigger"' in problems["/tasks/0/transition/branches/0/operator"]
    assert problems["/tasks/1/handler"] == "missing required field 'handler'"
    assert "/tasks/2/id" in problems
    assert "/tasks/2/execute_config/temperature" in problems
    text = str(info.value)
    assert "/tasks/1/handler: missing required field 'handler'" in text.splitlines()


def test_single_branch_object_error_pointer() -> None:
    data = {
        "id": "x",
        "tasks": [{"id": "a", "handler": "noop", "transition": {"branches": {"got": "end"}}}],
    }
    with pytest.raises(ChainError) as info:
        validate_chain(data)
    [problem] = info.value.problems
    assert problem.pointer == "/tasks/0/transition/branches/0/got"
    assert "did you mean 'goto'" in problem.message


def test_missing_tasks() -> None:
    with pytest.raises(ChainError) as info:
        load_chain({"id": "x"})
    assert [p.pointer for p in info.value.problems] == ["/tasks"]


# --- lint rules -----------------------------------------------------------------------------


def test_clean_chain_has_no_problems() -> None:
    assert lint(task("a", "noop", goto("b")), task("b", "noop")) == []


def test_duplicate_task_ids() -> None:
    problems = lint(task("a", "noop", goto("a2")), task("a2"), task("a2"))
    [problem] = at(problems, "/tasks/2/id")
    assert "duplicate task id 'a2'" in problem.message and problem.severity == "error"
    assert not at(lint(task("a", "noop", goto("b")), task("b")), "/tasks/1/id")


def test_unknown_handler_suggests() -> None:
    [problem] = lint(task("a", "promt_to_string", prompt_template="x"))
    assert problem.pointer == "/tasks/0/handler"
    assert "unknown handler 'promt_to_string'; did you mean 'prompt_to_string'?" in problem.message
    [other] = lint(task("a", "frobnicate"))
    assert "did you mean" not in other.message
    # Older contenox names are handlers too.
    assert lint(task("a", "raw_string", prompt_template="x")) == []


def test_unknown_goto_target() -> None:
    problems = lint(task("a", "noop", goto("b", "equals", "x"), goto("nowhere")), task("b"))
    [problem] = problems
    assert problem.pointer == "/tasks/0/transition/branches/1/goto"
    assert "goto target 'nowhere' is not a task of this chain (nor 'end')" in problem.message
    assert lint(task("a", "noop", goto("end", "equals", "x"), goto(""))) == []


def test_unknown_on_failure_target() -> None:
    problems = lint(task("a", "noop", transition={"on_failure": "handler"}), task("handle"))
    [problem] = at(problems, "/tasks/0/transition/on_failure")
    assert "goto target 'handler' is not a task of this chain (nor 'end')" in problem.message
    assert "did you mean 'handle'" in problem.message


def test_unreachable_tasks() -> None:
    # A task with no branches ends the chain: there is no fall-through to the next task.
    problems = lint(task("a"), task("b"))
    [problem] = problems
    assert problem.pointer == "/tasks/1" and "'b' is unreachable" in problem.message
    # Reachable through on_failure and branch gotos.
    assert (
        lint(
            task("a", "noop", goto("b"), transition={"on_failure": "c"}),
            task("b"),
            task("c"),
        )
        == []
    )


def test_loop_without_exit() -> None:
    problems = lint(
        task("start", "noop", goto("ask")),
        task("ask", "noop", goto("check")),
        task("check", "noop", goto("ask", "equals", "again"), goto("ask")),
    )
    [problem] = problems
    assert problem.severity == "error"
    assert problem.pointer == "/tasks/1/transition"
    assert "loop with no exit" in problem.message
    assert "'ask', 'check'" in problem.message and "'start'" not in problem.message


def test_self_loop_without_exit() -> None:
    [problem] = lint(task("a", "noop", goto("a")))
    assert "loop with no exit" in problem.message and "'a'" in problem.message


@pytest.mark.parametrize(
    "tasks",
    [
        # exit through a branch to end
        [
            task("ask", "noop", goto("check")),
            task("check", "noop", goto("ask", "equals", "again"), goto("end")),
        ],
        # exit through on_failure: end
        [
            task("ask", "noop", goto("check")),
            task("check", "noop", goto("ask"), transition={"on_failure": "end"}),
        ],
        # exit through a task with no branches
        [
            task("ask", "noop", goto("check")),
            task("check", "noop", goto("ask", "equals", "again"), goto("done")),
            task("done"),
        ],
    ],
)
def test_loop_with_an_exit_is_fine(tasks: list[dict[str, Any]]) -> None:
    assert lint(*tasks) == []


def test_condition_needs_valid_conditions() -> None:
    for handler in ("prompt_to_condition", "condition_key"):
        [problem] = lint(task("a", handler, prompt_template="ok?"))
        assert problem.pointer == "/tasks/0/valid_conditions" and problem.severity == "error"
    assert (
        lint(task("a", "condition_key", prompt_template="ok?", valid_conditions={"yes": True}))
        == []
    )


def test_prompt_handlers_need_prompt_template() -> None:
    for handler in ("prompt_to_string", "prompt_to_int", "parse_number", "prompt_to_range"):
        [problem] = lint(task("a", handler))
        assert problem.pointer == "/tasks/0/prompt_template"
        assert f"handler '{handler}' needs a prompt_template" in problem.message
    # Chat and embedding handlers work on their input.
    for handler in ("chat_completion", "model_execution", "text_to_embedding", "embedding"):
        assert lint(task("a", handler)) == []


def test_hook_and_js_need_hook_name() -> None:
    for handler in ("hook", "js"):
        [problem] = lint(task("a", handler))
        assert problem.pointer == "/tasks/0/hook" and "needs hook.name" in problem.message
        assert lint(task("a", handler, hook={"name": "fn"})) == []


def test_known_hooks() -> None:
    chain = (
        task("a", "hook", goto("b"), hook={"name": "slak"}),
        task("b", "chat_completion", execute_config={"hooks": ["search", "mail"]}),
    )
    assert lint(*chain) == []  # no registry: nothing to check against
    problems = lint(*chain, known_hooks={"slack", "search"})
    assert {p.pointer for p in problems} == {
        "/tasks/0/hook/name",
        "/tasks/1/execute_config/hooks/1",
    }
    assert all(p.severity == "error" for p in problems)
    assert "did you mean 'slack'" in at(problems, "/tasks/0/hook/name")[0].message
    assert lint(*chain, known_hooks={"slak", "search", "mail"}) == []


def test_known_models_warn() -> None:
    chain = task(
        "a", "chat_completion", execute_config={"model": "gpt-4o-mni", "models": ["llama3"]}
    )
    assert lint(chain) == []
    problems = lint(chain, known_models={"gpt-4o-mini"})
    assert [p.pointer for p in problems] == [
        "/tasks/0/execute_config/model",
        "/tasks/0/execute_config/models/0",
    ]
    assert all(p.severity == "warning" for p in problems)
    assert "did you mean 'gpt-4o-mini'" in problems[0].message
    assert lint(chain, known_models={"gpt-4o-mni", "llama3"}) == []
    # Warnings do not block loading.
    load_chain({"id": "x", "tasks": [chain]}, known_models={"gpt-4o-mini"})


@pytest.mark.parametrize(
    ("operator", "when", "ok"),
    [
        ("gt", "5", True),
        ("lt", "-2.5", True),
        ("gt", "five", False),
        ("lt", "", False),
        ("in_range", "1-5", True),
        ("in_range", "-3--1", True),
        ("in_range", "5", False),
        ("in_range", "low-high", False),
        ("equals", "anything", True),
    ],
)
def test_numeric_operators_need_numbers(operator: str, when: str, ok: bool) -> None:
    problems = lint(task("a", "noop", goto("end", operator, when), goto("end")))
    if ok:
        assert problems == []
    else:
        [problem] = problems
        assert problem.pointer == "/tasks/0/transition/branches/0/when"
        assert problem.severity == "error" and operator in problem.message


def test_default_branches() -> None:
    problems = lint(task("a", "noop", goto("end"), goto("end", "equals", "x"), goto("end")))
    assert [(p.pointer, p.severity) for p in problems] == [
        ("/tasks/0/transition/branches/1", "warning"),
        ("/tasks/0/transition/branches/2/operator", "error"),
    ]
    assert "unreachable branch" in problems[0].message
    assert "more than one 'default' branch" in problems[1].message


def test_compose_with_var_and_input_var() -> None:
    problems = lint(
        task("a", "noop", goto("b"), input_var="inptu"),
        task("b", "noop", compose={"with_var": "c", "strategy": "override"}),
    )
    assert {p.pointer for p in errors(problems)} == {
        "/tasks/0/input_var",
        "/tasks/1/compose/with_var",
    }
    assert "did you mean 'input'" in at(problems, "/tasks/0/input_var")[0].message
    assert (
        lint(
            task("a", "noop", goto("b"), input_var="input"),
            task("b", "noop", input_var="a", compose={"with_var": "input"}),
        )
        == []
    )


def test_template_compile_errors() -> None:
    problems = lint(task("a", "prompt_to_string", prompt_template="Hello {{ input "))
    [problem] = problems
    assert problem.pointer == "/tasks/0/prompt_template" and problem.severity == "error"
    assert "does not compile" in problem.message and "line 1" in problem.message
    [bad_print] = lint(task("a", "noop", print="{% if input %}x"))
    assert bad_print.pointer == "/tasks/0/print"


def test_template_unknown_variables_warn() -> None:
    problems = lint(
        task(
            "first",
            "prompt_to_string",
            goto("second"),
            prompt_template="{{ input }} {{ inptu }} {{ range(3) | list }}",
        ),
        task(
            "second",
            "prompt_to_string",
            prompt_template="{{.first}} {{ previous_output }} {{ error }} {% for x in [1] %}"
            "{{ loop.index }}{{ x }}{% endfor %}",
            print="{{ second }}",
            output_template="{{ status }}",  # hook output fields: not checked
        ),
    )
    [problem] = problems
    assert problem.severity == "warning" and problem.pointer == "/tasks/0/prompt_template"
    assert "'inptu'" in problem.message and "did you mean 'input'" in problem.message


def test_load_chain_raises_only_for_errors() -> None:
    bad = {"id": "x", "tasks": [task("a", "noop", goto("missing"), print="{{ nope }}")]}
    with pytest.raises(ChainError) as info:
        load_chain(bad)
    assert [p.pointer for p in info.value.problems] == ["/tasks/0/transition/branches/0/goto"]
    assert [p.pointer for p in info.value.warnings] == ["/tasks/0/print"]
    assert str(info.value) == (
        "/tasks/0/transition/branches/0/goto: "
        "goto target 'missing' is not a task of this chain (nor 'end')"
    )
    chain, problems = check_chain(bad)
    assert chain is not None and len(problems) == 2
    warn_only = {"id": "x", "tasks": [task("a", print="{{ nope }}")]}
    assert load_chain(warn_only).id == "x"
