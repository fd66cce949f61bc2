"""Counting what a template render does, deterministically (see chains/template_sandbox.py).

A Meter counts one render's operations against its Limits and checks the size of the values
it is about to build; an Allowance is shared by the renders of one workflow task. Nothing
here reads a clock: a replay counts exactly what the original run counted.
"""

import contextvars
import math
from collections.abc import Iterator, Mapping
from typing import Any

# One operation per this many characters of text handled.
CHARS_PER_OP = 64
# Integers a template builds must stay printable: Python refuses str() past 4300 digits.
MAX_INT_BITS = 14_000
# round() to more digits means nothing for a float, and costs 10**n for an int.
MAX_ROUND_DIGITS = 100
# Values nested deeper cannot be written out or compared (see measure); nor can macros and
# recursive loops call each other deeper.
MAX_DEPTH = 100
# All renders between two waits of a run share this many times one render's operations.
ALLOWANCE_FACTOR = 4
# Compiling costs about 30 us per token of a template's tags here (~100 operations); renders
# pay half that, so that two of the largest templates still fit in one workflow task and a
# cold worker compiles at most ~3 of them in one (~0.3 s here).
COMPILE_OPS_PER_TOKEN = 50


class LimitExceeded(Exception):
    """A template hit a limit; chains.templating turns it into a TemplateLimitError."""


class Limits:
    """What one render may produce (characters) and do (operations)."""

    __slots__ = ("max_chars", "max_operations")

    def __init__(self, max_chars: float, max_operations: float) -> None:
        self.max_chars = max_chars
        self.max_operations = max_operations


class Allowance:
    """Operations shared by several renders: those a run does between two waits.

    Each render also pays here for compiling its template, `COMPILE_OPS_PER_TOKEN` per token
    of its tags, whether or not this worker has it compiled already: a worker meeting many
    big templates for the first time in one workflow task compiles them all in it.
    """

    __slots__ = ("limit", "remaining")

    def __init__(self, operations: float) -> None:
        self.limit = operations
        self.remaining = operations

    def pay_compile(self, tokens: int) -> None:
        self.remaining -= tokens * COMPILE_OPS_PER_TOKEN
        if self.remaining < 0:
            raise LimitExceeded(
                "the templates rendered since the run last waited are too big together: "
                f"they used up their {self.limit:.0f} operations"
            )


class Meter:
    """Counts one render's operations and checks the size of what it builds."""

    __slots__ = ("allowance", "budget", "depth", "limits", "max_chars", "used")

    def __init__(self, limits: Limits, allowance: Allowance | None = None) -> None:
        self.limits = limits
        self.max_chars = limits.max_chars
        self.allowance = allowance
        self.budget = limits.max_operations
        if allowance is not None:
            self.budget = min(self.budget, allowance.remaining)
        self.used = 0
        self.depth = 0

    def charge(self, operations: int) -> None:
        self.used += operations
        if self.used > self.budget:
            if self.allowance is not None and self.budget < self.limits.max_operations:
                raise LimitExceeded(
                    "the templates rendered since the run last waited used up their "
                    f"{self.allowance.limit:.0f} operations"
                )
            raise LimitExceeded(
                f"template did more than {self.limits.max_operations:.0f} operations "
                "(loop iterations, calls, text handled)"
            )

    def check_size(self, size: float, what: str) -> None:
        if size > self.max_chars:
            raise LimitExceeded(
                f"{what} would be {size:.0f} characters; a template may build at most "
                f"{self.max_chars:.0f}"
            )

    def settle(self) -> None:
        if self.allowance is not None:
            self.allowance.remaining -= min(self.used, self.budget)


_CURRENT: contextvars.ContextVar[Meter | None] = contextvars.ContextVar(
    "chainloom_template_meter", default=None
)
# Used only if something renders outside chains.templating.render.
_FALLBACK = Limits(1 << 20, 100_000)


def current() -> Meter:
    meter = _CURRENT.get()
    return meter if meter is not None else Meter(_FALLBACK)


def activate(meter: Meter) -> contextvars.Token[Meter | None]:
    return _CURRENT.set(meter)


def deactivate(token: contextvars.Token[Meter | None]) -> None:
    _CURRENT.reset(token)


# --------------------------------------------------------------------------- measuring

CONTAINERS = (list, tuple, dict, range, set, frozenset)


def measure(value: Any, meter: Meter) -> int:
    """Characters `value` stands for once written out, charging for what was looked at.

    Containers are walked (an operation per item); the walk stops as soon as the total
    passes the size limit, so a list holding one big string a million times costs no more
    than the limit to find out about (the total returned is then only a lower bound).
    Reading a big value is fine; callers check the size of what they are about to build.
    """
    if isinstance(value, str | bytes):
        size = len(value)
        meter.charge(1 + size // CHARS_PER_OP)
        return size
    if not isinstance(value, CONTAINERS):
        meter.charge(1)
        return 8
    limit = meter.max_chars
    spare = meter.budget - meter.used
    total = 0
    items = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack and total <= limit and items <= spare:
        item, depth = stack.pop()
        items += 1
        if isinstance(item, str | bytes):
            total += len(item) + 2
            continue
        if depth >= MAX_DEPTH and isinstance(item, CONTAINERS):
            # Writing, comparing or sorting it would recurse as deep as Python's stack
            # allows, which depends on where the render runs, not on the template.
            raise LimitExceeded(f"a value nests lists or objects more than {MAX_DEPTH} deep")
        if isinstance(item, Mapping):
            total += 2
            stack.extend((child, depth + 1) for child in item.keys())
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            total += 2
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, range):
            total += 8 * len(item)
            items += len(item)
        else:
            total += 8
    meter.charge(items + total // CHARS_PER_OP)
    return total


def shallow(value: Any) -> int:
    """What an O(1) look at a value costs (`length`, `first`, `is defined`, ...)."""
    if isinstance(value, str):
        return 1 + len(value) // CHARS_PER_OP
    return 1


def measure_args(meter: Meter, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    size = 0
    for arg in args:
        size += measure(arg, meter)
    for arg in kwargs.values():
        size += measure(arg, meter)
    return size


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(meter: Meter, value: Any, what: str) -> None:
    if is_int(value) and value.bit_length() > MAX_INT_BITS and meter.max_chars != math.inf:
        raise LimitExceeded(f"{what} is an integer of more than 4000 digits")


def as_int(value: Any) -> int:
    try:
        return abs(int(value))
    except (TypeError, ValueError, OverflowError):
        return 0


class Counted:
    """An iterator that charges `cost` operations for every item taken from it."""

    __slots__ = ("_it", "_meter", "_source", "cost")

    def __init__(self, iterable: Any, cost: int, meter: Meter) -> None:
        self._source = iterable
        self._it = iter(iterable)
        self._meter = meter
        self.cost = cost

    def __iter__(self) -> "Counted":
        return self

    def __next__(self) -> Any:
        item = next(self._it)
        self._meter.charge(self.cost)
        return item

    def __len__(self) -> int:
        return len(self._source)


def checked_result(meter: Meter, result: Any, what: str, inputs: tuple[Any, ...]) -> Any:
    if isinstance(result, Iterator) and not isinstance(result, Counted):
        return Counted(result, 1, meter)
    if any(result is value for value in inputs):
        return result  # handed back, not built (`default`, `first`, a short `truncate`)
    if isinstance(result, str | list | tuple | dict):
        meter.check_size(measure(result, meter), what)
    check_int(meter, result, what)
    return result
