"""Template limits (chains/template_sandbox.py): bombs stop early, with a clear error, before
they build anything big; the work count is deterministic; ordinary templates are untouched."""

import time
import tracemalloc
from typing import Any

import pytest

from chains import templating
from chains.templating import Allowance, Limits, TemplateLimitError, render

LIMITS = Limits(512 * 1024, 100_000)
BIG = "x" * 300_000

# Each of these would take seconds, gigabytes, or both, without limits.
BOMBS = {
    "output": "{{ 'a' * 5*10**7 }}",
    "nested loops": "{% for i in range(100000) %}{% for j in range(1000) %}{{ i }}{% endfor %}"
    "{% endfor %}",
    "length of a huge string": "{{ ('a' * 2*10**9)|length }}",
    "center": "{{ 'a'|center(2*10**9) }}",
    "ljust": "{{ 'a'.ljust(2*10**9) }}",
    "zfill": "{{ '1'.zfill(2*10**9) }}",
    "printf width": "{{ '%2000000000d' % 1 }}",
    "format filter width": "{{ '%2000000000s'|format('a') }}",
    "str.format width": "{{ '{:>2000000000}'.format(1) }}",
    "str.format fields": "{{ ('{0}' * 100000).format(big) }}",
    "replace": "{{ big|replace('x', big) }}",
    "str.replace": "{{ big.replace('x', big) }}",
    "join": "{{ ([big] * 100)|join }}",
    "str.join": "{{ ','.join([big] * 100) }}",
    "concat doubling": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
    "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "plus doubling": "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}"
    "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
    "shared list": "{% set ns = namespace(s=[big]) %}{% for i in range(64) %}"
    "{% set ns.s = [ns.s, ns.s] %}{% endfor %}{{ ns.s }}",
    "block set doubling": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
    "{% set block %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = block %}{% endfor %}",
    "macro doubling": "{% macro twice(s) %}{{ s }}{{ s }}{% endmacro %}"
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = twice(ns.s) %}"
    "{% endfor %}",
    "endless macro recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "deep nesting": "{% set ns = namespace(x=1) %}{% for i in range(1000) %}"
    "{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x == ns.x }}",
    "huge template": "{{ x }}" * 2000,
    "deep template": "{% if x %}" * 100 + "{% endif %}" * 100,
    "macro recursion": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
    "{% endmacro %}{{ f(40) }}",
    "big integer power": "{{ 10 ** (10 ** 6) }}",
    "big integer product": "{% set ns = namespace(n=2) %}{% for i in range(64) %}"
    "{% set ns.n = ns.n * ns.n %}{% endfor %}",
    "round": "{{ 5|round(-10**9, 'floor') }}",
    "list times": "{{ ([1] * 10**9)|length }}",
    "range": "{{ range(10**8)|list|length }}",
    "sum of lists": "{{ ([[1]] * 1000)|sum(start=[]) }}",
    "wordwrap": "{{ big|wordwrap(1, wrapstring=big) }}",
    "indent": "{{ (big ~ '\n' * 1000)|indent(big) }}",
    "batch fill": "{{ [1]|batch(10**9, 0)|list|length }}",
    "tojson indent": "{{ ([[[[1]]]] * 1000)|tojson(indent=10**6) }}",
    "compare in a loop": "{% for i in range(10**5) %}{% if big == big ~ 'y' %}{% endif %}"
    "{% endfor %}",
    "sort in a loop": "{% for i in range(10**5) %}{{ big|list|sort|length }}{% endfor %}",
    "recursive loop": "{% for i in range(10**5) %}{% for x in [[[[]]]] recursive %}"
    "{{ loop(x) }}{% endfor %}{% endfor %}",
    "filtered loop": "{% for i in range(10**5) %}{% for j in range(10**5) if j < 0 %}{% endfor %}"
    "{% endfor %}",
    "loop length": "{% for i in range(10**5) %}{% for j in range(10**5) %}{{ loop.length }}"
    "{% endfor %}{% endfor %}",
}


@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_stop_with_a_clear_error(name: str) -> None:
    started = time.process_time()
    with pytest.raises(TemplateLimitError) as info:
        render(BOMBS[name], {"big": BIG}, LIMITS)
    assert str(info.value).startswith("template over a limit: ")
    # CPU seconds of this process: generous, it is the order of magnitude that matters (the
    # SDK's deadlock detector fires at 2 s of wall time).
    assert time.process_time() - started < 1.0


def test_limit_messages_name_what_was_too_much() -> None:
    with pytest.raises(TemplateLimitError, match="would be 50000000 characters; a template may"):
        render(BOMBS["output"], {}, LIMITS)
    with pytest.raises(TemplateLimitError, match="more than 100000 operations"):
        render(BOMBS["nested loops"], {}, LIMITS)
    with pytest.raises(TemplateLimitError, match="output is over 1000 bytes"):
        render("{% for i in range(200) %}{{ i }}...{% endfor %}", {}, Limits(1000, 10**6))
    with pytest.raises(TemplateLimitError, match="integer of about 1000000 digits"):
        render(BOMBS["big integer power"], {}, LIMITS)


def test_huge_bomb_builds_nothing_big() -> None:
    """The 2e9 bomb is refused before its string exists: the peak of Python allocations
    during the render stays a few megabytes (it would be 2 GB)."""
    render("warm {{ input }}", {"input": "up"}, LIMITS)
    tracemalloc.start()
    try:
        for _ in range(3):
            with pytest.raises(TemplateLimitError):
                render(BOMBS["length of a huge string"], {}, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, peak


def _operations(template: str, variables: dict[str, Any]) -> int:
    allowance = Allowance(10**9)
    render(template, variables, LIMITS, allowance)
    return int(10**9 - allowance.remaining)


def test_work_is_counted_deterministically() -> None:
    template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content|trim }}\n{% endfor %}"
        "{{ messages|map(attribute='content')|join(', ')|length }}"
    )
    messages = [{"role": "user", "content": f" message {i} "} for i in range(200)]
    counts = {_operations(template, {"messages": messages}) for _ in range(5)}
    assert len(counts) == 1
    # More items, more work; the same items, the same work.
    assert _operations(template, {"messages": messages * 2}) > counts.pop()


def test_allowance_is_shared_between_renders() -> None:
    template = "{% for i in range(20000) %}{% endfor %}"
    allowance = Allowance(100_000)
    render(template, {}, LIMITS, allowance)
    spent = 100_000 - allowance.remaining
    assert 20_000 < spent < 50_000
    with pytest.raises(TemplateLimitError, match="since the run last waited used up"):
        for _ in range(5):
            render(template, {}, LIMITS, allowance)


def test_ordinary_templates_render_as_before() -> None:
    variables = {
        "input": "Ada",
        "doc": "word " * 60_000,
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        "obj": {"a": 1, "b": [True, None]},
    }
    cases = {
        "Hello {{ input }}!": "Hello Ada!",
        "{{ messages|length }} {{ messages[-1].content|upper }}": "2 YO",
        "{% for m in messages %}{{ m.role }}={{ m.content }};{% endfor %}": "user=hi;assistant=yo;",
        "{{ obj }} {{ obj|tojson(indent=1)|length }}": '{"a": 1, "b": [true, null]} 38',
        "{{ 'x' * 3 }}{{ [1] * 2 }}{{ 2 ** 10 }}{{ 'a' ~ 1 }}": "xxx[1, 1]1024a1",
        "{{ '%05.1f|%s' % (3.14159, 'z') }}": "003.1|z",
        "{{ '{:>5}|{}'.format('a', 2) }}": "    a|2",
        "{{ 'a-b'.replace('-', '+').center(7) }}": "  a+b  ",
        "{{ range(3)|list }} {{ [3, 1, 2]|sort|join(',') }}": "[0, 1, 2] 1,2,3",
        "{{ doc|wordcount }} {{ doc|truncate(9) }}": "60000 word...",
        "{% if input == 'Ada' and 'd' in input %}yes{% endif %}": "yes",
    }
    for template, expected in cases.items():
        assert render(template, variables, LIMITS) == expected, template
    # A document of 300 kB goes through whole.
    assert len(render("{{ doc }}", variables, LIMITS)) == 300_000


def test_reading_big_values_is_fine_building_them_is_not() -> None:
    huge = "y" * 2_000_000  # bigger than the output limit: an input may be
    assert render("{{ doc|length }} {{ doc[:3] }} {{ doc|truncate(6) }}", {"doc": huge}) == (
        "2000000 yyy yyy..."
    )
    with pytest.raises(TemplateLimitError):
        render("{{ doc }}", {"doc": huge})


def test_unlimited_renders_match_limited_ones() -> None:
    """Runs recorded before the limits replay with UNLIMITED: same output, same errors."""
    for template in (
        "{% for i in range(5) %}{{ i ~ '-' }}{% endfor %}",
        "{{ {'a': [1, 2]} }}|{{ none }}|{{ true }}",
        "{{ range(3)|list }}{{ 1 / 0 }}",
    ):
        try:
            limited = render(template, {}, LIMITS)
        except templating.TemplateError as err:
            limited = repr(err)
        try:
            unlimited = render(template, {}, templating.UNLIMITED)
        except templating.TemplateError as err:
            unlimited = repr(err)
        assert limited == unlimited
