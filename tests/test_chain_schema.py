"""The chain language's shipped examples, JSON Schema and templating."""

import json
from pathlib import Path

import jinja2
import jsonschema
import pytest

from chains import schema as chain_schema
from chains.loader import (
    check_chain,
    load_chain_file,
    parse_chain_text,
)
from chains.templating import (
    TemplateCompileError,
    TemplateError,
    TemplateSecurityError,
    UndefinedVariableError,
    compile_template,
    go_to_jinja,
    render,
    template_variables,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "chains" / "examples"
MODELS = {"gpt-4o-mini"}

# --- shipped examples -----------------------------------------------------------------------


def example_files() -> list[Path]:
    return sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".yaml", ".yml", ".json"))


def test_expected_examples_ship() -> None:
    names = {p.name for p in example_files()}
    assert {
        "sentiment-router.yaml",
        "summarize-and-score.yaml",
        "approval-gate.yaml",
        "chat-assistant.yaml",
        "key-value-extract.json",
    } <= names


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_examples_load_and_lint_clean(path: Path) -> None:
    chain = load_chain_file(path, known_models=MODELS, known_hooks=set())
    assert chain.id == path.stem
    _, problems = check_chain(path, known_models=MODELS, known_hooks=set())
    assert problems == []


def test_sentiment_router_shape() -> None:
    chain = load_chain_file(EXAMPLES / "sentiment-router.yaml")
    classify = chain.tasks[0]
    assert classify.handler == "prompt_to_condition"
    assert set(classify.valid_conditions.values()) == {True, False}
    assert classify.execute_config is not None and classify.execute_config.model == "gpt-4o-mini"
    targets = {b.when: b.goto for b in classify.transition.branches}
    assert {chain.task(t).handler for t in targets.values()} == {"prompt_to_string"}  # type: ignore[union-attr]


def test_approval_gate_shape() -> None:
    chain = load_chain_file(EXAMPLES / "approval-gate.yaml")
    review = next(t for t in chain.tasks if t.handler == "approval")
    assert {b.when: b.goto for b in review.transition.branches} == {
        "approved": "publish",
        "rejected": "revise",
    }


# --- JSON Schema ----------------------------------------------------------------------------


def test_schema_file_is_up_to_date() -> None:
    assert chain_schema.SCHEMA_PATH.read_text(encoding="utf-8") == chain_schema.render_schema()


def test_schema_metadata() -> None:
    schema = chain_schema.chain_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == "https://chainloom.dev/schema/chain.json"
    assert schema["title"]
    jsonschema.Draft202012Validator.check_schema(schema)


def schema_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(chain_schema.SCHEMA_PATH.read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_schema_validates_examples(path: Path) -> None:
    data = parse_chain_text(path.read_text(encoding="utf-8"), path.name)
    schema_validator().validate(data)


def test_schema_accepts_seed_style_and_rejects_typos() -> None:
    validator = schema_validator()
    seed_style = {
        "id": "s",
        "tasks": [
            {
                "id": "a",
                "handler": "condition_key",
                "valid_conditions": '{"yes": true}',
                "execute_config": {"models": '["a", "b"]', "hooks": "[]"},
                "transition": {"branches": {"operator": "gt", "when": 5, "goto": "end"}},
            }
        ],
    }
    validator.validate(seed_style)
    typo = {"id": "s", "tasks": [{"id": "a", "handler": "noop", "promt_template": "x"}]}
    assert not validator.is_valid(typo)


def test_schema_check_command(tmp_path: Path) -> None:
    target = tmp_path / "schema.json"
    assert chain_schema.main(["--check", "--path", str(target)]) == 1
    assert chain_schema.main(["--path", str(target)]) == 0
    assert chain_schema.main(["--check", "--path", str(target)]) == 0
    target.write_text(target.read_text().replace("chainloom chain", "stale"))
    assert chain_schema.main(["--check", "--path", str(target)]) == 1


# --- templating -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("go", "jinja"),
    [
        ("{{.name}}", "{{ name }}"),
        ("{{ .a.b }}", "{{ a.b }}"),
        ("{{.}}", "{{ previous_output }}"),
        ("{{- .x -}}", "{{- x -}}"),
        ("{{ .name | upper }}", "{{ name | upper }}"),
        ("{{ name }} {% if x %}.{% endif %}", "{{ name }} {% if x %}.{% endif %}"),
        ("{{ '.x' }}", "{{ '.x' }}"),
    ],
)
def test_go_to_jinja(go: str, jinja: str) -> None:
    assert go_to_jinja(go) == jinja


def test_render_go_style_and_jinja() -> None:
    variables = {"input": "Ada", "previous_output": "prev", "user": {"name": "Lovelace"}}
    assert render("Hi {{.input}} {{ .user.name }} / {{.}}", variables) == "Hi Ada Lovelace / prev"
    assert render("{% for c in input %}{{ c | upper }}{% endfor %}", variables) == "ADA"
    assert render("{{ input }}\n", variables) == "Ada\n"


def test_render_values_as_json_text() -> None:
    variables = {"obj": {"a": 1, "é": [True, None]}, "items": [1, 2], "flag": False, "none": None}
    assert render("{{ obj }}", variables) == '{"a": 1, "é": [true, null]}'
    assert render("{{ items }}|{{ flag }}|{{ none }}", variables) == "[1, 2]|false|"
    assert render("{{ obj.a }} {{ obj | tojson }}", variables) == '1 {"a": 1, "é": [true, null]}'
    assert render("{{ '<b>' | tojson }}", {}) == '"<b>"'


def test_undefined_variable_is_a_readable_error() -> None:
    with pytest.raises(UndefinedVariableError) as info:
        render("Hello {{ usr }}", {"user": "x", "input": "y"})
    assert info.value.variable == "usr"
    assert "template variable 'usr' is undefined" in str(info.value)
    assert "available: input, user" in str(info.value)
    assert isinstance(info.value, TemplateError)
    assert isinstance(info.value, jinja2.TemplateError)
    with pytest.raises(UndefinedVariableError, match="has no attribute 'missing'"):
        render("{{ review.missing }}", {"review": {}})


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ input.__init__.__globals__ }}",
        "{{ items.append(3) }}",
    ],
)
def test_sandbox_blocks_unsafe_access(template: str) -> None:
    items = [1]
    with pytest.raises(TemplateSecurityError):
        render(template, {"input": "x", "items": items})
    assert items == [1]


def test_render_errors_are_template_errors() -> None:
    with pytest.raises(TemplateCompileError) as info:
        render("a\n{{ x ", {"x": 1})
    assert info.value.lineno == 2
    with pytest.raises(TemplateError, match="ZeroDivisionError"):
        render("{{ 1 / 0 }}", {})
    # Non-deterministic helpers are removed: the module runs inside workflows.
    with pytest.raises(TemplateCompileError):
        compile_template("{{ [1, 2] | random }}")
    with pytest.raises(UndefinedVariableError):
        render("{{ lipsum() }}", {})


def test_compile_template_is_cached() -> None:
    assert compile_template("cached {{ x }}") is compile_template("cached {{ x }}")
    assert compile_template.cache_info().maxsize == 512


def test_template_variables() -> None:
    assert template_variables("{{.input}} {{ a.b }} {% set c = 1 %}{{ c }}") == {"input", "a"}
    with pytest.raises(TemplateCompileError):
        template_variables("{{ }")
