"""Reading chain files: text → dict → ChainDefinition, with every problem as a JSON pointer.

Loading is strict on purpose: a chain that loads is schema-valid and free of lint errors, so
the workflow engine never has to discover a typo halfway through a durable run.
"""

import difflib
import json
import os
import re
import types
from collections.abc import Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from chains.lint import Problem, lint_chain
from chains.spec import ChainDefinition

__all__ = [
    "ChainError",
    "Problem",
    "check_chain",
    "load_chain",
    "load_chain_file",
    "parse_chain_text",
    "validate_chain",
]

ChainSource = Mapping[str, Any] | str | os.PathLike[str] | ChainDefinition


class ChainError(Exception):
    """A chain that cannot be loaded; ``problems`` holds the errors (warnings are separate)."""

    def __init__(
        self, problems: Iterable[Problem], warnings: Iterable[Problem] = (), source: str = ""
    ) -> None:
        self.problems: list[Problem] = list(problems)
        self.warnings: list[Problem] = list(warnings)
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(problem) for problem in self.problems)


def _escape(part: object) -> str:
    return str(part).replace("~", "~0").replace("/", "~1")


def json_pointer(loc: Iterable[object]) -> str:
    """A pydantic ``loc`` tuple (or any path) as an RFC 6901 JSON pointer."""
    return "".join("/" + _escape(part) for part in loc)


# --- text ----------------------------------------------------------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"


class _ChainYamlLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans, no timestamps and no duplicate keys.

    YAML 1.1 reads `when: yes` as a boolean (which the model then spells "true") and
    `when: 2024-01-01` as a date; in a chain both are meant as text. Duplicate keys are
    rejected because the last one silently winning hides typos.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"duplicate key {key!r}",
                    key_node.start_mark,
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


_ChainYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _TIMESTAMP_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ChainYamlLoader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _where(filename: str) -> str:
    return f"{filename}: " if filename else ""


def _yaml_problem(exc: yaml.YAMLError, filename: str) -> Problem:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        position = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        detail = exc.problem or "syntax error"
        if exc.context:
            context_mark = exc.context_mark
            since = f" started at line {context_mark.line + 1}" if context_mark else ""
            detail += f" ({exc.context}{since})"
        return Problem("", f"{_where(filename)}{position}invalid YAML: {detail}")
    return Problem("", f"{_where(filename)}invalid YAML: {exc}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_json(text: str, filename: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        message = f"line {exc.lineno}, column {exc.colno}: invalid JSON: {exc.msg}"
        raise ChainError([Problem("", _where(filename) + message)], source=filename) from None
    except ValueError as exc:
        raise ChainError(
            [Problem("", f"{_where(filename)}invalid JSON: {exc}")], source=filename
        ) from None


def _parse_yaml(text: str, filename: str) -> Any:
    try:
        return yaml.load(text, Loader=_ChainYamlLoader)
    except yaml.YAMLError as exc:
        raise ChainError([_yaml_problem(exc, filename)], source=filename) from None


def parse_chain_text(text: str, filename: str = "") -> dict[str, Any]:
    """Parse a chain document (YAML, or JSON by ``.json`` extension / leading brace)."""
    text = text.removeprefix("\ufeff")
    suffix = Path(filename).suffix.lower() if filename else ""
    stripped = text.lstrip()
    if suffix == ".json":
        data = _parse_json(text, filename)
    elif suffix in (".yaml", ".yml") or not stripped.startswith(("{", "[")):
        data = _parse_yaml(text, filename)
    else:
        # No extension and a leading brace: JSON most likely, but a YAML flow mapping is
        # legal too; report the JSON error only when neither reading works.
        try:
            data = _parse_json(text, filename)
        except ChainError as json_error:
            try:
                data = _parse_yaml(text, filename)
            except ChainError:
                raise json_error from None
    if data is None:
        raise ChainError([Problem("", f"{_where(filename)}the chain document is empty")])
    if not isinstance(data, dict):
        kind = type(data).__name__
        hint = ""
        if isinstance(data, str) and re.search(r"\.(ya?ml|json)$", data.strip(), re.IGNORECASE):
            hint = "; to load a file pass a pathlib.Path (or use load_chain_file)"
        raise ChainError(
            [Problem("", f"{_where(filename)}a chain must be a mapping/object, got {kind}{hint}")],
            source=filename,
        )
    return data


# --- schema --------------------------------------------------------------------------------


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _fields_at(loc: tuple[int | str, ...]) -> list[str]:
    """Field names of the model found at ``loc`` (for "did you mean" on unknown keys)."""
    current: Any = ChainDefinition
    for part in loc:
        current = _strip_optional(current)
        if isinstance(part, int):
            if get_origin(current) is not list:
                return []
            current = get_args(current)[0]
        elif (
            isinstance(current, type)
            and issubclass(current, BaseModel)
            and part in current.model_fields
        ):
            current = current.model_fields[part].annotation
        else:
            return []
    current = _strip_optional(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _shown(value: Any) -> str:
    if isinstance(value, str | int | float | bool) or value is None:
        text = json.dumps(value, ensure_ascii=False)
        return f" (got {text})" if len(text) <= 80 else f" (got {text[:77]}...)"
    return f" (got {'an object' if isinstance(value, dict) else 'a list'})" if value else ""


def _validation_problems(exc: ValidationError) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        pointer = json_pointer(loc)
        kind = error["type"]
        if kind == "missing":
            message = f"missing required field '{loc[-1]}'"
        elif kind == "extra_forbidden":
            allowed = _fields_at(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            message = f"unknown field '{loc[-1]}'{hint}"
        else:
            message = error["msg"] + _shown(error.get("input"))
        problems.append(Problem(pointer, message))
    return problems


def validate_chain(data: Mapping[str, Any]) -> ChainDefinition:
    """Schema validation only (no lint); raises ChainError with pointer problems."""
    try:
        return ChainDefinition.model_validate(dict(data))
    except ValidationError as exc:
        raise ChainError(_validation_problems(exc)) from None


# --- loading -------------------------------------------------------------------------------


def _read(path: os.PathLike[str] | str) -> tuple[str, str]:
    name = os.fspath(path)
    try:
        return Path(name).read_text(encoding="utf-8"), name
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ChainError([Problem("", f"cannot read {name}: {reason}")], source=name) from None


def check_chain(
    data: ChainSource,
    known_hooks: set[str] | None = None,
    known_models: set[str] | None = None,
) -> tuple[ChainDefinition | None, list[Problem]]:
    """Every problem of a chain (errors and warnings) without raising; for `chains lint`.

    The chain is None when it could not be parsed or is not schema-valid. A ``str`` is chain
    text; pass a ``Path`` to read a file.
    """
    try:
        if isinstance(data, ChainDefinition):
            chain = data
        else:
            if isinstance(data, str):
                mapping: Mapping[str, Any] = parse_chain_text(data)
            elif isinstance(data, os.PathLike):
                text, name = _read(data)
                mapping = parse_chain_text(text, name)
            else:
                mapping = data
            chain = validate_chain(mapping)
    except ChainError as exc:
        return None, exc.problems
    return chain, lint_chain(chain, known_hooks=known_hooks, known_models=known_models)


def load_chain(
    data: ChainSource,
    known_hooks: set[str] | None = None,
    known_models: set[str] | None = None,
) -> ChainDefinition:
    """A valid, lint-clean chain from a dict, chain text (``str``) or a file (``Path``).

    Raises ChainError listing every error; lint warnings do not block and are dropped here
    (use ``check_chain`` to see them).
    """
    chain, problems = check_chain(data, known_hooks=known_hooks, known_models=known_models)
    errors = [problem for problem in problems if problem.is_error]
    if chain is None or errors:
        warnings = [problem for problem in problems if not problem.is_error]
        source = os.fspath(data) if isinstance(data, os.PathLike) else ""
        raise ChainError(errors, warnings, source=source)
    return chain


def load_chain_file(
    path: os.PathLike[str] | str,
    known_hooks: set[str] | None = None,
    known_models: set[str] | None = None,
) -> ChainDefinition:
    """Load a chain file (``.json`` as JSON, anything else as YAML)."""
    return load_chain(Path(path), known_hooks=known_hooks, known_models=known_models)
