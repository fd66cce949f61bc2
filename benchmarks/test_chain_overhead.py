"""chainloom's overhead over a hand-written Temporal workflow (run with `make bench`).

Machines are noisy, so nothing here asserts a time: the tests check that both sides did the
same work and report ratios at the end of the run. Set CHAINLOOM_BENCH_ENFORCE=1 to turn the
issue's targets into assertions, CHAINLOOM_BENCH_ROUNDS to change the number of samples.
"""

import os

import pytest

from benchmarks.chain_overhead import (
    DETERMINISTIC_STEPS,
    KV_INPUT,
    LLM_STEPS,
    TARGET_DETERMINISTIC_MS,
    TARGET_LLM_RATIO,
    BenchEnv,
    deterministic_chain,
    format_deterministic,
    format_llm,
    format_throughput,
    llm_chain,
    measure_deterministic,
    measure_llm_overhead,
    measure_throughput,
)
from benchmarks.conftest import BenchThread, Report

pytestmark = pytest.mark.bench

ROUNDS = int(os.environ.get("CHAINLOOM_BENCH_ROUNDS", "30"))
ENFORCE = os.environ.get("CHAINLOOM_BENCH_ENFORCE", "") not in ("", "0")


def test_baseline_makes_the_same_model_calls(bench: BenchThread) -> None:
    """The comparison is fair only if both sides send the same requests to the model."""

    async def both(env: BenchEnv) -> tuple[list[object], list[object]]:
        before = len(env.chat_messages())
        await env.baseline(LLM_STEPS)
        middle = len(env.chat_messages())
        await env.chain(llm_chain(LLM_STEPS))
        calls = env.chat_messages()
        return calls[before:middle], calls[middle:]

    baseline, chain = bench.run(both)
    assert len(baseline) == LLM_STEPS
    assert chain == baseline


def test_deterministic_chain_runs_every_step(bench: BenchThread) -> None:
    async def run(env: BenchEnv) -> float:
        return await env.chain(deterministic_chain(DETERMINISTIC_STEPS), KV_INPUT)

    assert bench.run(run) > 0


def test_llm_step_overhead(bench: BenchThread, report: Report) -> None:
    result = bench.run(lambda env: measure_llm_overhead(env, rounds=ROUNDS))
    report.add("llm", format_llm(result), result.as_json())
    assert len(result.n.b_samples) == len(result.n.a_samples) == ROUNDS
    if ENFORCE:
        assert result.n.ratio <= TARGET_LLM_RATIO, format_llm(result)


def test_deterministic_step_cost(bench: BenchThread, report: Report) -> None:
    result = bench.run(lambda env: measure_deterministic(env, rounds=ROUNDS))
    report.add("deterministic", format_deterministic(result), result.as_json())
    assert len(result.pair.b_samples) == ROUNDS
    if ENFORCE:
        assert result.per_step_ms <= TARGET_DETERMINISTIC_MS, format_deterministic(result)


def test_throughput(bench: BenchThread, report: Report) -> None:
    result = bench.run(measure_throughput)
    report.add("throughput", format_throughput(result), result.as_json())
    assert result.pair.ratio > 0
