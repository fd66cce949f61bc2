"""Template rendering for chain prompts, ``print`` and ``output_template``.

This module is imported inside Temporal workflows, so everything here must be deterministic and
free of I/O: no loaders (templates only come from strings), no clock, no randomness. Jinja's
``random`` filter and ``lipsum`` global are removed for that reason.

contenox chains use Go ``text/template`` syntax (``{{.input}}``); the common subset of it, a dot
path at the start of an action, is rewritten to Jinja before compiling.
"""

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "TEMPLATE_BUILTINS",
    "TemplateCompileError",
    "TemplateError",
    "TemplateRenderError",
    "TemplateSecurityError",
    "UndefinedVariableError",
    "compile_template",
    "go_to_jinja",
    "render",
    "template_variables",
]


class TemplateError(jinja2.TemplateError):
    """Base of every error this module raises (a ``jinja2.TemplateError`` too)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.text = message

    def __str__(self) -> str:
        return self.text


class TemplateCompileError(TemplateError):
    """The template has a syntax error."""

    def __init__(self, message: str, lineno: int | None = None) -> None:
        super().__init__(message)
        self.lineno = lineno


class UndefinedVariableError(TemplateError):
    """The template used a variable (or key) that the render did not provide."""

    def __init__(self, message: str, variable: str | None = None) -> None:
        super().__init__(message)
        self.variable = variable


class TemplateSecurityError(TemplateError):
    """The sandbox refused an operation (dunder access, mutating a value, ...)."""


class TemplateRenderError(TemplateError):
    """Any other failure while rendering (a type error in an expression, ...)."""


def _to_text(value: Any) -> Any:
    # Outputs of earlier tasks are often dicts/lists (chat histories, parsed key/values); a
    # prompt wants them as JSON, not as Python reprs. Booleans follow JSON/Go spelling so that
    # `{{ previous_output }}` after a condition task reads "true", like the transition value.
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, ensure_ascii=False, default=str)
    return value


def _tojson(value: Any, indent: int | None = None) -> str:
    # Jinja's own tojson HTML-escapes <, >, & and ' which corrupts prompts.
    return json.dumps(value, ensure_ascii=False, indent=indent, default=str)


def _make_environment() -> ImmutableSandboxedEnvironment:
    # The immutable sandbox also stops templates from mutating workflow state through
    # methods such as `list.append` on a variable.
    env = ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        finalize=_to_text,
        keep_trailing_newline=True,
        auto_reload=False,
        cache_size=0,
    )
    env.filters.pop("random", None)
    env.globals.pop("lipsum", None)
    env.filters["tojson"] = _tojson
    return env


_ENV = _make_environment()

# Names a template may use without any chain variable defining them.
TEMPLATE_BUILTINS: frozenset[str] = frozenset(_ENV.globals)

_PATH = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
# A whole Go action that is only a dot path: {{.}}, {{ .a.b }}, {{- .x -}}.
_GO_SIMPLE = re.compile(r"\{\{(-?)\s*\.(" + _PATH + r")?\s*(-?)\}\}")
# A Go dot path at the start of a longer action, e.g. {{ .name | upper }}.
_GO_LEADING = re.compile(r"\{\{(-?)\s*\.(" + _PATH + r")(?=[\s|(\[])")


def _simple_action(match: re.Match[str]) -> str:
    left, path, right = match.group(1), match.group(2), match.group(3)
    return "{{" + left + " " + (path or "previous_output") + " " + right + "}}"


def _leading_action(match: re.Match[str]) -> str:
    return "{{" + match.group(1) + " " + match.group(2)


def go_to_jinja(template: str) -> str:
    """Rewrite Go-style dot actions to Jinja; Jinja syntax passes through untouched.

    ``{{.name}}`` → ``{{ name }}``, ``{{ .a.b }}`` → ``{{ a.b }}``, ``{{.}}`` →
    ``{{ previous_output }}``. An action starting with ``.`` is never valid Jinja, so the
    rewrite cannot change the meaning of a Jinja template.
    """
    if "{{" not in template:
        return template
    template = _GO_SIMPLE.sub(_simple_action, template)
    return _GO_LEADING.sub(_leading_action, template)


def _compile_error(exc: jinja2.TemplateSyntaxError) -> TemplateCompileError:
    where = f"line {exc.lineno}: " if exc.lineno else ""
    return TemplateCompileError(f"template syntax error at {where}{exc.message}", exc.lineno)


@functools.lru_cache(maxsize=512)
def compile_template(template: str) -> jinja2.Template:
    """Compile (and cache) a template; raises TemplateCompileError on a syntax error."""
    try:
        return _ENV.from_string(go_to_jinja(template))
    except jinja2.TemplateSyntaxError as exc:
        raise _compile_error(exc) from None


@functools.lru_cache(maxsize=512)
def _variables(template: str) -> frozenset[str]:
    try:
        ast = _ENV.parse(go_to_jinja(template))
    except jinja2.TemplateSyntaxError as exc:
        raise _compile_error(exc) from None
    return frozenset(meta.find_undeclared_variables(ast))


def template_variables(template: str) -> set[str]:
    """Top-level variables a template reads (after the Go-style rewrite)."""
    return set(_variables(template))


_UNDEFINED_NAME = re.compile(r"^'([^']+)' is undefined$")


def _undefined_error(exc: jinja2.UndefinedError, variables: Mapping[str, Any]) -> TemplateError:
    message = exc.message or "undefined value"
    match = _UNDEFINED_NAME.match(message)
    if match:
        name = match.group(1)
        known = ", ".join(sorted(variables)) or "none"
        return UndefinedVariableError(
            f"template variable '{name}' is undefined (available: {known})", name
        )
    return UndefinedVariableError(f"template uses an undefined value: {message}")


def render(template: str, variables: Mapping[str, Any]) -> str:
    """Render ``template`` with ``variables``; every failure is a ``TemplateError``."""
    compiled = compile_template(template)
    try:
        return compiled.render(dict(variables))
    except jinja2.UndefinedError as exc:
        raise _undefined_error(exc, variables) from None
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateSecurityError(f"template blocked by the sandbox: {exc}") from None
    except TemplateError:
        raise
    except Exception as exc:
        # Expression errors (1 + 'a', division by zero, ...) surface as one error type so the
        # workflow can fail the task with a readable message instead of crashing.
        raise TemplateRenderError(f"template failed: {type(exc).__name__}: {exc}") from None
