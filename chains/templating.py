"""Template rendering for chain prompts, ``print`` and ``output_template``.

This module is imported inside Temporal workflows, so everything here must be deterministic and
free of I/O: no loaders (templates only come from strings), no clock, no randomness. Jinja's
``random`` filter and ``lipsum`` global are removed for that reason. Renders are limited in
output size and in work, counted deterministically (chains/template_sandbox.py); a template
over a limit fails with TemplateLimitError.

contenox chains use Go ``text/template`` syntax (``{{.input}}``); the common subset of it, a dot
path at the start of an action, is rewritten to Jinja before compiling.
"""

import functools
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2 import meta

from chains import template_meter, template_sandbox
from chains.template_meter import ALLOWANCE_FACTOR, Allowance, LimitExceeded, Limits, Meter

__all__ = [
    "ALLOWANCE_FACTOR",
    "DEFAULT_LIMITS",
    "TEMPLATE_BUILTINS",
    "UNLIMITED",
    "Allowance",
    "Limits",
    "TemplateCompileError",
    "TemplateError",
    "TemplateLimitError",
    "TemplateRenderError",
    "TemplateSecurityError",
    "UndefinedVariableError",
    "compile_template",
    "go_to_jinja",
    "render",
    "template_variables",
]

# The defaults of CHAINLOOM_TEMPLATE_MAX_OUTPUT_BYTES and CHAINLOOM_TEMPLATE_MAX_OPERATIONS.
DEFAULT_LIMITS = Limits(512 * 1024, 100_000)
# For runs recorded before templates had limits: they must replay as they ran.
UNLIMITED = Limits(math.inf, math.inf)


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


class TemplateLimitError(TemplateError):
    """The template built too much or did too much work (chains/template_sandbox.py)."""


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


def _make_environment() -> jinja2.Environment:
    # The immutable sandbox also stops templates from mutating workflow state through
    # methods such as `list.append` on a variable.
    return template_sandbox.environment(finalize=_to_text, tojson=_tojson)


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
    """Compile (and cache) a template; raises TemplateCompileError on a syntax error and
    TemplateLimitError for a template too big to compile quickly."""
    source = go_to_jinja(template)
    try:
        tokens = template_sandbox.check_source(_ENV, source)
        compiled = _ENV.from_string(source)
        compiled.chainloom_tokens = tokens  # type: ignore[attr-defined]
        return compiled
    except jinja2.TemplateSyntaxError as exc:
        raise _compile_error(exc) from None
    except LimitExceeded as exc:
        raise TemplateLimitError(f"template over a limit: {exc}") from None


@functools.lru_cache(maxsize=512)
def _variables(template: str) -> frozenset[str]:
    source = go_to_jinja(template)
    try:
        # A template a run could not compile is refused here already (lint, the API).
        template_sandbox.check_source(_ENV, source)
        ast = _ENV.parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise _compile_error(exc) from None
    except LimitExceeded as exc:
        raise TemplateCompileError(f"template over a limit: {exc}") from None
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


def render(
    template: str,
    variables: Mapping[str, Any],
    limits: Limits = DEFAULT_LIMITS,
    allowance: Allowance | None = None,
) -> str:
    """Render ``template`` with ``variables``; every failure is a ``TemplateError``.

    The output may hold at most ``limits.max_chars`` bytes (UTF-8) and the render may do at
    most ``limits.max_operations`` operations, and no more than ``allowance`` has left when
    one is given (several renders sharing one budget).
    """
    meter = Meter(limits, allowance)
    token = template_meter.activate(meter)
    try:
        compiled = compile_template(template)
        if allowance is not None:
            allowance.pay_compile(compiled.chainloom_tokens)  # type: ignore[attr-defined]
            meter.budget = min(limits.max_operations, allowance.remaining)
        return _generate(compiled, variables, limits.max_chars)
    except LimitExceeded as exc:
        raise TemplateLimitError(f"template over a limit: {exc}") from None
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
    finally:
        template_meter.deactivate(token)
        meter.settle()


def _generate(compiled: jinja2.Template, variables: Mapping[str, Any], limit: float) -> str:
    # Rendering chunk by chunk stops a template as soon as its output passes the limit,
    # instead of after it has built all of it.
    parts: list[str] = []
    size = 0
    for chunk in compiled.generate(dict(variables)):
        size += len(chunk) if chunk.isascii() else len(chunk.encode("utf-8", "replace"))
        if size > limit:
            raise LimitExceeded(
                f"template output is over {limit:.0f} bytes (CHAINLOOM_TEMPLATE_MAX_OUTPUT_BYTES)"
            )
        parts.append(chunk)
    return "".join(parts)
