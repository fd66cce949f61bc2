"""The sandbox templates render in, with deterministic limits on size and work.

Templates render inside Temporal workflows: a template that runs for seconds trips the SDK's
deadlock detector (2 s) and one that builds gigabytes takes the worker down; either way the
workflow task fails and is retried forever. Wall-clock limits cannot be used in workflow code
(a replay must take the same decisions), so work is *counted*, in operations:

- each item a ``for`` loop takes costs the size of the loop body in template nodes, each run
  of a macro or ``caller()`` the size of its body, and the whole template its size once;
- each call, filter and test costs 1 plus what it is handed: 1 per item of a list or dict
  and 1 per 64 characters of text; values written out or compared are measured the same way.

Values that could blow up are checked *before* they are built: ``*``, ``**``, ``+``, ``%``,
``~``, ``range``, ``join``, ``replace``, ``center``, ``format``, ``indent``, ``wordwrap``,
``batch``, ``slice``, ``round``, ``tojson(indent)``, ``urlize``, string methods such as
``ljust``, ``zfill`` or ``replace``, and ``str.format`` fields. No value may be larger than a
render's output may be, and integers stay under about 4000 digits (Python prints up to 4300).

Compiling is bounded too: a template is refused before parsing past a size and nesting that
Jinja compiles in about 0.1 s (check_source). Counts depend only on the templates and their
variables, so a replay counts the same. The renders of one workflow task share a budget (see
chains.template_meter.Allowance): they all run before the worker reports back.
"""

import functools
import inspect
import math
import re
import types
from collections.abc import Callable, Mapping
from typing import Any, cast

import jinja2
from jinja2 import nodes
from jinja2.runtime import LoopContext, Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter, safe_range
from jinja2.utils import _PassArg, pass_context
from jinja2.visitor import NodeTransformer

from chains.template_meter import (
    CHARS_PER_OP,
    CONTAINERS,
    MAX_DEPTH,
    MAX_INT_BITS,
    MAX_ROUND_DIGITS,
    Counted,
    LimitExceeded,
    Meter,
    as_int,
    checked_result,
    current,
    is_int,
    measure,
    measure_args,
    shallow,
)

__all__ = ["LimitedEnvironment", "check_source", "environment"]


# --------------------------------------------------------------------------- operators


def _check_binop(meter: Meter, operator: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would be too big, before computing it."""
    if is_int(left) and is_int(right):
        if operator == "*":
            bits = left.bit_length() + right.bit_length()
        elif operator == "+":
            bits = max(left.bit_length(), right.bit_length()) + 1
        elif operator == "**":
            big = abs(left) > 1 and right > 0
            bits = int(min(right, 1 << 40) * math.log2(abs(left))) + 1 if big else 1
        else:
            bits = 1
        if bits > MAX_INT_BITS and meter.max_chars != math.inf:
            raise LimitExceeded(
                f"{operator!r} would build an integer of about {bits * 0.30103:.0f} digits; "
                "templates keep integers under 4000 digits"
            )
        meter.charge(1 + bits // 512)
        return
    if operator == "*":
        seq, times = (left, right) if is_int(right) else (right, left)
        if is_int(times) and isinstance(seq, str | list | tuple):
            size = measure(seq, meter) * max(times, 0)
            meter.check_size(size, f"'*' of a {type(seq).__name__}")
            meter.charge(size // CHARS_PER_OP)
            return
    elif operator == "+" and isinstance(left, str | list | tuple):
        size = measure(left, meter) + measure(right, meter)
        meter.check_size(size, "'+'")
        return
    elif operator == "%" and isinstance(left, str):
        meter.check_size(printf_size(meter, left, right), "'%' formatting")
        return
    meter.charge(1)


_PRINTF = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")


def printf_size(meter: Meter, fmt: str, args: Any) -> int:
    """An upper bound for `fmt % args` (and the `format` filter): every width and precision
    counts in full, `*` as the largest number among the arguments."""
    values: tuple[Any, ...] = args if isinstance(args, tuple) else (args,)
    size = measure(fmt, meter) + 2 * sum(measure(v, meter) for v in values)
    star = max((abs(v) for v in values if is_int(v)), default=0)
    for match in _PRINTF.finditer(fmt):
        for number in match.groups():
            if number == "*":
                size += star
            elif number:
                size += int(number)
    return size


class _LimitedFormatter(SandboxedFormatter):
    """``str.format`` with each field's width and the running total checked first."""

    def __init__(self, env: jinja2.Environment) -> None:
        super().__init__(env)
        self._written = 0

    def format_field(self, value: Any, format_spec: str) -> Any:
        meter = current()
        width = max((int(n) for n in re.findall(r"\d+", format_spec)), default=0)
        self._written += max(width, 2 * measure(value, meter))
        meter.check_size(self._written, "str.format()")
        return super().format_field(value, format_spec)


def _string_method_size(meter: Meter, method: str, text: str, args: tuple[Any, ...]) -> int:
    """The size of `text.<method>(*args)`, for the methods that can grow a string."""
    if method in ("center", "ljust", "rjust", "zfill"):
        return max(len(text), as_int(args[0]) if args else 0)
    if method == "expandtabs":
        return len(text) + text.count("\t") * (as_int(args[0]) if args else 8)
    if method == "replace" and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        count = text.count(old) if old else len(text) + 1
        if len(args) > 2 and is_int(args[2]) and args[2] >= 0:
            count = min(count, args[2])
        return len(text) + count * max(len(new) - len(old), 0)
    if method == "join" and args and isinstance(args[0], list | tuple):
        return measure(args[0], meter) + len(text) * max(len(args[0]) - 1, 0)
    if method == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        return len(text) * max(longest, 1)
    if method == "encode":
        return 4 * len(text)
    return len(text)


def _materialise(value: Any, meter: Meter) -> Any:
    # join() may be handed a generator: take it (counted) into a list to measure it first.
    if isinstance(value, list | tuple | str):
        return value
    return list(Counted(value, 1, meter))


# --------------------------------------------------------------------------- filters


def _structure(value: Any, meter: Meter) -> tuple[int, int]:
    """(items, depth) of a nested value, for bounding indented JSON."""
    items = depth = 0
    level = [value]
    while level and depth < 1000:
        below: list[Any] = []
        for item in level:
            if isinstance(item, Mapping):
                below.extend(item.values())
            elif isinstance(item, list | tuple):
                below.extend(item)
        meter.charge(len(below))
        if not below:
            break
        items += len(below)
        depth += 1
        level = below
    return items, depth


def _filter_size(meter: Meter, name: str, bound: Mapping[str, Any]) -> float:
    """An upper bound of the output of a filter that can grow its input."""
    value = bound.get("s", bound.get("value"))
    text = value if isinstance(value, str) else ""
    if name == "center":
        return max(len(text), as_int(bound.get("width", 80)))
    if name == "indent":
        width = bound.get("width", 4)
        pad = len(width) if isinstance(width, str) else as_int(width)
        return len(text) + (text.count("\n") + 1) * pad
    if name == "replace":
        count = bound.get("count")
        replace = (bound.get("old", ""), bound.get("new", ""), -1 if count is None else count)
        return _string_method_size(meter, "replace", text, replace)
    if name == "format":
        return printf_size(meter, text, bound.get("kwargs") or bound.get("args", ()))
    if name == "join":
        items = value if isinstance(value, list | tuple) else ()
        return measure(items, meter) + len(str(bound.get("d", ""))) * max(len(items) - 1, 0)
    if name == "wordwrap":
        # textwrap works word by word in Python: as slow per character as a loop iteration.
        meter.charge(len(text))
        width = max(as_int(bound.get("width", 79)), 1)
        wrap = str(bound.get("wrapstring") or "\n")
        return len(text) + (len(text) // width + text.count("\n") + 1) * len(wrap)
    if name == "urlize":
        extra = sum(len(str(bound.get(key) or "")) for key in ("target", "rel"))
        return 6 * len(text) + (len(text) // 4 + 1) * (64 + extra)
    if name in ("batch", "slice"):
        return as_int(bound.get("linecount", bound.get("slices", 1)))
    if name == "round":
        if as_int(bound.get("precision", 0)) > MAX_ROUND_DIGITS:
            raise LimitExceeded(f"round() to more than {MAX_ROUND_DIGITS} digits")
    elif name == "tojson" and bound.get("indent"):
        count, depth = _structure(value, meter)
        size = measure(value, meter)
        return size + count * (2 + depth * as_int(bound.get("indent")))
    elif name == "sum" and not isinstance(bound.get("start", 0), int | float):
        # sum() of lists copies the running total for every item: quadratic.
        raise LimitExceeded("sum() only adds numbers in templates")
    return 0


# Filters whose output can be much larger than their input or that cost more than their
# input's size: bounded by _filter_size before they run.
_GROWING = frozenset(
    {"batch", "center", "format", "indent", "join", "replace", "round", "slice", "sum"}
    | {"tojson", "urlize", "wordwrap"}
)
# Filters that look at their input in O(1) or only at its top level.
_SHALLOW = frozenset(
    {"abs", "attr", "batch", "count", "d", "default", "first", "float", "int", "items"}
    | {"last", "length", "list", "map", "reject", "rejectattr", "reverse", "round"}
    | {"safe", "select", "selectattr", "slice"}
)


# Filters that work word by word or character by character in Python: one more operation
# per this many characters of input.
_PER_CHAR = {"indent": 4, "pprint": 2, "title": 8, "urlencode": 8, "urlize": 2, "wordcount": 8}
# Filters that call a key or test function for every item: two more operations per item.
_PER_ITEM = frozenset(
    {"dictsort", "groupby", "map", "max", "min", "reject", "rejectattr", "select"}
    | {"selectattr", "sort", "sum", "unique"}
)


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    passes = _PassArg.from_obj(func) is not None
    bind = inspect.signature(func).bind if name in _GROWING else None
    cheap = name in _SHALLOW

    per_char = _PER_CHAR.get(name, 0)
    per_item = 2 if name in _PER_ITEM else 0

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        meter = current()
        meter.charge(5)
        head, values = (args[:1], args[1:]) if passes else ((), args)
        if name == "join" and values:
            values = (_materialise(values[0], meter), *values[1:])
        if cheap:
            meter.charge(sum(shallow(v) for v in values) + len(kwargs))
            if values and isinstance(values[0], list | tuple | dict | range):
                meter.charge(len(values[0]) * (1 + per_item))
        else:
            size = measure_args(meter, values, kwargs)
            if per_char:
                meter.charge(size // per_char)
            if per_item and values and isinstance(values[0], list | tuple | dict | range):
                meter.charge(len(values[0]) * per_item)
        if bind is not None:
            bound = bind(*head, *values, **kwargs)
            bound.apply_defaults()
            meter.check_size(_filter_size(meter, name, bound.arguments), f"{name}()")
        result = func(*head, *values, **kwargs)
        return checked_result(meter, result, f"the result of {name}()", values)

    return guarded


# Tests that compare their arguments, which costs as much as reading them.
_COMPARING_TESTS = frozenset(
    {"in", "==", "eq", "equalto", "!=", "ne", ">", "gt", "greaterthan", ">=", "ge"}
    | {"<", "lt", "lessthan", "<=", "le"}
)


def _guard_test(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    passes = _PassArg.from_obj(func) is not None
    deep = name in _COMPARING_TESTS

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        meter = current()
        values = args[1:] if passes else args
        if deep:
            meter.charge(1)
            measure_args(meter, values, kwargs)
        else:
            meter.charge(sum(shallow(v) for v in values))
        return func(*args, **kwargs)

    return guarded


def limited_range(*args: int) -> range:
    meter = current()
    meter.charge(1)
    count = len(range(*args))
    if count > meter.limits.max_operations:
        raise LimitExceeded(
            f"range() of {count} numbers is longer than the "
            f"{meter.limits.max_operations:.0f} operations a template may do"
        )
    return safe_range(*args)


# --------------------------------------------------------------------------- source

# Compiling is not metered and Jinja's compiler slows down more than linearly with template
# size (about 0.2 ms per tag here for a few hundred tags), and parses and generates code by
# recursion: a template is refused before parsing past these bounds, so that compiling stays
# fast and never depends on how deep the Python stack already is (which a replay need not share).
MAX_TOKENS = 3000
MAX_TAG_TOKENS = 256
MAX_NESTING = 32
_OPENERS = frozenset("([{")
_CLOSERS = frozenset(")]}")
_BLOCKS = frozenset({"if", "for", "macro", "call", "filter", "with", "block", "autoescape"})
_SKIP = frozenset({"data", "whitespace", "comment", "linecomment"})


def check_source(env: jinja2.Environment, source: str) -> int:
    """Refuse a template too big or too deeply nested to compile quickly (see above);
    answer what compiling it weighs, in tokens (literal text weighs one per 256 characters)."""
    tokens = tag_tokens = brackets = blocks = text = 0
    first = ""
    assigns = False
    for _, kind, value in env.lex(source):
        if kind in _SKIP:
            text += len(value)
            continue
        tokens += 1
        if kind in ("block_begin", "variable_begin"):
            tag_tokens, first, assigns = 0, "" if kind == "block_begin" else "-", False
            continue
        if kind == "block_end":
            # `{% set x %}` (no `=`) opens a block that `{% endset %}` closes.
            if first in _BLOCKS or (first == "set" and not assigns):
                blocks += 1
            elif first.startswith("end"):
                blocks -= 1
            if blocks > MAX_NESTING:
                raise LimitExceeded(f"template nests blocks more than {MAX_NESTING} deep")
            continue
        tag_tokens += 1
        if first == "" and kind == "name":
            first = value
        assigns = assigns or (kind == "operator" and value == "=")
        if kind == "operator" and value in _OPENERS:
            brackets += 1
            if brackets > MAX_NESTING:
                raise LimitExceeded(f"template nests brackets more than {MAX_NESTING} deep")
        elif kind == "operator" and value in _CLOSERS:
            brackets -= 1
        if tag_tokens > MAX_TAG_TOKENS:
            raise LimitExceeded(f"a template tag holds more than {MAX_TAG_TOKENS} tokens")
    if tokens > MAX_TOKENS:
        raise LimitExceeded(
            f"template has {tokens} tokens in its tags; split it below {MAX_TOKENS}"
        )
    return tokens + text // 256


# --------------------------------------------------------------------------- instrumenting

# Hooks the instrumented code calls, as filters (direct calls, unlike sandboxed calls).
# `pass_context` keeps Jinja from evaluating them at compile time.
_EMIT = "_chainloom_emit"
_LOOP = "_chainloom_loop"
_CHARGE = "_chainloom_charge"
_SCAN = "_chainloom_scan"
_CONCAT = "_chainloom_concat"


@pass_context
def _hook_charge(context: Any, operations: int) -> str:
    current().charge(operations)
    return ""


@pass_context
def _hook_loop(context: Any, iterable: Any, cost: int) -> Counted:
    meter = current()
    meter.charge(1)
    return Counted(iterable, cost, meter)


@pass_context
def _hook_scan(context: Any, value: Any) -> Any:
    measure(value, current())
    return value


@pass_context
def _hook_concat(context: Any, values: list[Any]) -> str:
    meter = current()
    size = sum(measure(v, meter) for v in values)
    meter.check_size(size, "'~'")
    return "".join(str(v) for v in values)


def _hook(name: str, node: nodes.Expr, *args: nodes.Expr) -> nodes.Filter:
    return nodes.Filter(node, name, list(args), [], None, None)


# What running one node costs, in operations (about half a microsecond each): attribute and
# item lookups, filters and calls go through the sandbox's checks and cost several.
_NODE_COST: dict[type[nodes.Node], int] = {
    nodes.Call: 10,
    nodes.Getattr: 5,
    nodes.Getitem: 5,
    nodes.Filter: 5,
    nodes.Test: 3,
    nodes.Output: 3,
}


def _cost(node: nodes.Node) -> int:
    if isinstance(node, nodes.TemplateData):
        return 1 + len(node.data) // CHARS_PER_OP
    return _NODE_COST.get(type(node), 1)


def _size(node: nodes.Node) -> int:
    return _cost(node) + sum(_cost(child) for child in node.find_all(nodes.Node))


def _charge(cost: int) -> nodes.ExprStmt:
    return nodes.ExprStmt(_hook(_CHARGE, nodes.Const(cost)))


class _Instrument(NodeTransformer):
    """Rewrites a parsed template so that it pays for its work as it runs."""

    def visit_Template(self, node: nodes.Template) -> nodes.Node:
        cost = _size(node)
        self.generic_visit(node)
        node.body.insert(0, _charge(cost))
        return node

    def visit_For(self, node: nodes.For) -> nodes.Node:
        cost = 1 + sum(_size(n) for n in node.body) + (_size(node.test) if node.test else 0)
        self.generic_visit(node)
        node.iter = _hook(_LOOP, cast(nodes.Expr, node.iter), nodes.Const(cost))
        return node

    def _body(self, node: nodes.Macro | nodes.CallBlock) -> nodes.Node:
        cost = 1 + sum(_size(n) for n in node.body)
        self.generic_visit(node)
        node.body.insert(0, _charge(cost))
        return node

    visit_Macro = _body
    visit_CallBlock = _body

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        # Literal text is paid for by the size of the block it stands in (see _cost).
        self.generic_visit(node)
        node.nodes = [
            child if isinstance(child, nodes.TemplateData) else _hook(_EMIT, child)
            for child in node.nodes
        ]
        return node

    def visit_Compare(self, node: nodes.Compare) -> nodes.Node:
        self.generic_visit(node)
        if not isinstance(node.expr, nodes.Const):
            node.expr = _hook(_SCAN, node.expr)
        for operand in node.ops:
            if not isinstance(operand.expr, nodes.Const):
                operand.expr = _hook(_SCAN, operand.expr)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _hook(_CONCAT, nodes.List(node.nodes))


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox, instrumented so that every render is metered."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def _generate(
        self,
        source: nodes.Template,
        name: str | None,
        filename: str | None,
        defer_init: bool = False,
    ) -> str:
        _Instrument().visit(source)
        return super()._generate(source, name, filename, defer_init)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(current(), operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        meter = current()
        meter.charge(1)
        if isinstance(__obj, LoopContext):
            # A recursive loop's `loop(children)` iterates outside the loop's wrapper.
            inner = getattr(__obj, "_iterator", None)
            cost = inner.cost if isinstance(inner, Counted) else 1
            if args:
                args = (Counted(args[0], cost, meter), *args[1:])
        else:
            owner = getattr(__obj, "__self__", None)
            if isinstance(owner, str):
                method = getattr(__obj, "__name__", "")
                if method == "join" and args:
                    args = (_materialise(args[0], meter), *args[1:])
                measure(owner, meter)
                measure_args(meter, args, kwargs)
                size = _string_method_size(meter, method, owner, args)
                meter.check_size(size, f"str.{method}()")
            else:
                measure_args(meter, args, kwargs)
        nests = isinstance(__obj, LoopContext | Macro)
        if nests:
            # Python's own recursion limit would stop it at a depth that depends on the
            # stack the render started from: stop it first, at the same depth every time.
            meter.depth += 1
            if meter.depth > MAX_DEPTH // 2:
                raise LimitExceeded(
                    f"macros or loops call themselves more than {MAX_DEPTH // 2} deep"
                )
        try:
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            if nests:
                meter.depth -= 1
        return checked_result(meter, result, "a call's result", args)

    def getitem(self, obj: Any, argument: Any) -> Any:
        result = super().getitem(obj, argument)
        if isinstance(argument, slice):
            meter = current()
            meter.check_size(measure(result, meter), "a slice")
        return result

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if not (
            isinstance(value, types.MethodType | types.BuiltinMethodType)
            and value.__name__ in ("format", "format_map")
            and isinstance(value.__self__, str)
        ):
            return None
        text: str = value.__self__
        is_map = value.__name__ == "format_map"

        def limited(*args: Any, **kwargs: Any) -> str:
            meter = current()
            measure(text, meter)
            # Each field goes through the sandbox's attribute checks and a size check.
            meter.charge(8 * text.count("{"))
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                kwargs, args = args[0], ()
            return str(_LimitedFormatter(self).vformat(text, args, kwargs))

        return limited


def environment(finalize: Callable[[Any], Any], tojson: Callable[..., str]) -> LimitedEnvironment:
    """The one environment chains.templating renders with."""
    env = LimitedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        finalize=finalize,
        keep_trailing_newline=True,
        auto_reload=False,
        cache_size=0,
        # No compile-time evaluation of constant expressions: it would run unmetered.
        optimized=False,
    )
    env.filters.pop("random", None)
    env.globals.pop("lipsum", None)
    env.filters["tojson"] = tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    tests = cast(dict[str, Callable[..., Any]], env.tests)
    env.tests = {name: _guard_test(name, f) for name, f in tests.items()}
    env.globals["range"] = limited_range

    @pass_context
    def emit(context: Any, value: Any) -> str:
        meter = current()
        if isinstance(value, CONTAINERS):
            meter.check_size(measure(value, meter), "one output of the template")
        text = finalize(value)
        text = text if isinstance(text, str) else str(text)
        meter.check_size(len(text), "one output of the template")
        meter.charge(1 + len(text) // CHARS_PER_OP)
        return text

    env.filters.update(
        {
            _EMIT: emit,
            _LOOP: _hook_loop,
            _CHARGE: _hook_charge,
            _SCAN: _hook_scan,
            _CONCAT: _hook_concat,
        }
    )
    return env
