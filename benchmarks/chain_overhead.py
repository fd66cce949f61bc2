"""What chainloom costs on top of Temporal, measured against a hand-written workflow.

One process starts the Temporal dev server (raised poll rates), a zero-latency scripted LLM,
a SQLite database holding one openai-type backend that points at it, chainloom's worker, and a
second worker running :mod:`benchmarks.baseline` on its own task queue. Then, in the same run
and with interleaved rounds so that machine drift hits both sides alike:

1. LLM steps: a chain of N ``prompt_to_string`` tasks against the baseline workflow making
   the same N openai chat completions (same prompts, same client settings, same activity
   options). Also at N=1, which splits the overhead into a per-run and a per-step part.
2. Deterministic steps: one LLM step followed by K deterministic tasks (noop, noop with an
   output template, parse_key_value) against the same chain with K=0.
3. Throughput: C concurrent 3-step chains against C concurrent 3-call baseline workflows.

Only ratios and differences mean anything: absolute times depend on the machine.

Run it without pytest::

    python -m benchmarks.chain_overhead [--rounds 30] [--json results.json]
"""

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Worker

from benchmarks.baseline import BASELINE_WORKFLOW, BaselineInput, BaselineWorkflow, ChatCall
from core.config import Settings
from core.db import Database
from core.devserver import free_port, start_dev_server, stop_process
from core.models import BackendRow
from core.temporal import connect
from tests.scripted_llm import ScriptedLLM
from worker import build_worker
from workflows.types import ChainRunInput

MODEL = "bench-model"
ANSWER = "ok"
KV_INPUT = "name=bench\ncount=3\nmode: fast"

LLM_STEPS = 5
DETERMINISTIC_STEPS = 50
CONCURRENCY = 30
THROUGHPUT_STEPS = 3

# Targets from the issue.
TARGET_LLM_RATIO = 1.2
TARGET_DETERMINISTIC_MS = 2.0


# --------------------------------------------------------------------------- the baseline


class BaselineActivities:
    """The baseline's only activity: the same openai call chainloom makes, nothing around it."""

    def __init__(self, base_url: str) -> None:
        # Built like chainloom's ProviderClients builds it: one reused client, no SDK retries.
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key="not-needed", max_retries=0, timeout=300.0
        )

    @activity.defn(name="baseline_chat")
    async def chat(self, call: ChatCall) -> str:
        completion = await self._client.chat.completions.create(
            model=call.model,
            messages=call.messages,  # type: ignore[arg-type]
        )
        return completion.choices[0].message.content or ""

    async def close(self) -> None:
        await self._client.close()


# --------------------------------------------------------------------------- chains


def _goto(target: str | None) -> dict[str, Any]:
    if target is None:
        return {}
    return {"branches": [{"operator": "default", "goto": target}]}


def llm_chain(steps: int) -> dict[str, Any]:
    """N prompt_to_string tasks, each prompting with the previous answer (as the baseline)."""
    ids = [f"step{i}" for i in range(1, steps + 1)]
    return {
        "id": f"bench-llm-{steps}",
        "tasks": [
            {
                "id": task_id,
                "handler": "prompt_to_string",
                "prompt_template": f"step {i}: {{{{ previous_output }}}}",
                "execute_config": {"model": MODEL},
                "transition": _goto(ids[i] if i < steps else None),
            }
            for i, task_id in enumerate(ids, start=1)
        ],
    }


def _deterministic_task(i: int, next_id: str | None) -> dict[str, Any]:
    task: dict[str, Any] = {"id": f"det{i}", "transition": _goto(next_id)}
    kind = i % 3
    if kind == 0:
        task["handler"] = "noop"
    elif kind == 1:
        task["handler"] = "noop"
        task["output_template"] = f"{{{{ ask }}}} #{i}"
    else:
        task["handler"] = "parse_key_value"
        task["input_var"] = "input"
    return task


def deterministic_chain(steps: int) -> dict[str, Any]:
    """One LLM task, then K deterministic tasks rotating noop / templated noop / parse_key_value."""
    ids = [f"det{i}" for i in range(1, steps + 1)]
    tasks: list[dict[str, Any]] = [
        {
            "id": "ask",
            "handler": "prompt_to_string",
            "prompt_template": "step 1: {{ previous_output }}",
            "execute_config": {"model": MODEL},
            "transition": _goto(ids[0] if ids else None),
        }
    ]
    tasks += [_deterministic_task(i, ids[i] if i < steps else None) for i in range(1, steps + 1)]
    return {"id": f"bench-det-{steps}", "max_steps": steps + 10, "tasks": tasks}


# --------------------------------------------------------------------------- environment


@dataclass
class BenchEnv:
    # The baseline's client is the SDK's default; chainloom's is what `chainloom api` and
    # `chainloom worker` connect with (core.temporal.connect: its payload converter).
    client: Client
    chain_client: Client
    llm: ScriptedLLM
    chain_queue: str
    baseline_queue: str

    async def baseline(self, steps: int) -> float:
        """One baseline run, start to result, in seconds."""
        started = time.perf_counter()
        result = await self.client.execute_workflow(
            BASELINE_WORKFLOW,
            BaselineInput(model=MODEL, steps=steps),
            id=f"bench-base-{uuid.uuid4().hex}",
            task_queue=self.baseline_queue,
            result_type=str,
        )
        elapsed = time.perf_counter() - started
        if result != ANSWER:
            raise AssertionError(f"baseline answered {result!r}")
        return elapsed

    async def chain(self, chain: dict[str, Any], input_: str = "go") -> float:
        """One ChainWorkflow run, start to result, in seconds."""
        started = time.perf_counter()
        result = await self.chain_client.execute_workflow(
            "ChainWorkflow",
            ChainRunInput(chain=chain, input=input_),
            id=f"bench-chain-{uuid.uuid4().hex}",
            task_queue=self.chain_queue,
            result_type=dict,
        )
        elapsed = time.perf_counter() - started
        if len(result["state"]) != len(chain["tasks"]):
            raise AssertionError(f"chain ran {len(result['state'])} of {len(chain['tasks'])} tasks")
        return elapsed

    def chat_messages(self) -> list[Any]:
        """Messages of every chat completion the scripted LLM saw so far."""
        return [
            r.body.get("messages")
            for r in self.llm.requests
            if r.path.endswith("/chat/completions") and isinstance(r.body, dict)
        ]


@contextlib.asynccontextmanager
async def bench_env(workdir: Path) -> AsyncIterator[BenchEnv]:
    """Dev server, scripted LLM, database with one backend, and both workers, all local."""
    port = free_port()
    server = await asyncio.to_thread(start_dev_server, None, port)
    llm = ScriptedLLM(models=[MODEL]).start()
    llm.reply(None, ANSWER)
    db = Database(f"sqlite:///{workdir / 'bench.db'}")
    baseline_activities = BaselineActivities(llm.openai_base)
    try:
        await asyncio.to_thread(db.migrate)
        with db.session() as session:
            session.add(
                BackendRow(
                    tenant_id="default", name="scripted", base_url=llm.openai_base, type="openai"
                )
            )
            session.commit()
        settings = Settings(
            TEMPORAL_ADDRESS=f"127.0.0.1:{port}",
            DATABASE_URL=db.url,
            CHAINLOOM_TASK_QUEUE="bench-chain-" + uuid.uuid4().hex[:8],
            CHAINLOOM_BACKEND_MODELS_TTL=30,
            CHAINLOOM_BACKEND_ALLOWLIST="127.0.0.1",  # the scripted LLM
        )
        client = await Client.connect(settings.temporal_address)
        chain_client = await connect(settings)
        baseline_queue = "bench-base-" + uuid.uuid4().hex[:8]
        chain_worker = build_worker(chain_client, settings, db)
        baseline_worker = Worker(
            client,
            task_queue=baseline_queue,
            workflows=[BaselineWorkflow],
            activities=[baseline_activities.chat],
        )
        async with chain_worker, baseline_worker:
            yield BenchEnv(client, chain_client, llm, settings.task_queue, baseline_queue)
    finally:
        await baseline_activities.close()
        db.dispose()
        llm.stop()
        await asyncio.to_thread(stop_process, server)


# --------------------------------------------------------------------------- statistics


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def p90_ms(samples: list[float]) -> float:
    if len(samples) < 2:
        return samples[0] * 1000
    return statistics.quantiles(samples, n=10, method="inclusive")[8] * 1000


@dataclass
class Pair:
    """Two variants timed alternately: ``a`` is the reference, ``b`` the one under test."""

    a: str
    b: str
    a_samples: list[float] = field(default_factory=list)
    b_samples: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return median_ms(self.b_samples) / median_ms(self.a_samples)

    @property
    def paired_ratio(self) -> float:
        """Median of the per-round ratios (robust to drift between rounds)."""
        return statistics.median(b / a for a, b in zip(self.a_samples, self.b_samples, strict=True))

    @property
    def diff_ms(self) -> float:
        """Difference of the medians."""
        return median_ms(self.b_samples) - median_ms(self.a_samples)

    @property
    def paired_diff_ms(self) -> float:
        """Median of the per-round differences (robust to drift between rounds)."""
        diffs = [b - a for a, b in zip(self.a_samples, self.b_samples, strict=True)]
        return statistics.median(diffs) * 1000

    def as_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "a_ms": [round(s * 1000, 3) for s in self.a_samples],
            "b_ms": [round(s * 1000, 3) for s in self.b_samples],
            "a_median_ms": round(median_ms(self.a_samples), 3),
            "a_p90_ms": round(p90_ms(self.a_samples), 3),
            "b_median_ms": round(median_ms(self.b_samples), 3),
            "b_p90_ms": round(p90_ms(self.b_samples), 3),
            "ratio": round(self.ratio, 4),
            "paired_ratio": round(self.paired_ratio, 4),
            "diff_ms": round(self.diff_ms, 3),
            "paired_diff_ms": round(self.paired_diff_ms, 3),
        }


Timed = Callable[[], Awaitable[float]]


async def interleave(pairs: list[tuple[Pair, Timed, Timed]], rounds: int, warmup: int) -> None:
    """Run every variant once per round, reversing the order every other round."""
    for _ in range(warmup):
        for _, run_a, run_b in pairs:
            await run_a()
            await run_b()
    for i in range(rounds):
        order = pairs if i % 2 == 0 else list(reversed(pairs))
        for pair, run_a, run_b in order:
            if i % 2 == 0:
                pair.a_samples.append(await run_a())
                pair.b_samples.append(await run_b())
            else:
                pair.b_samples.append(await run_b())
                pair.a_samples.append(await run_a())


# --------------------------------------------------------------------------- measurements


@dataclass
class LLMOverhead:
    steps: int
    n: Pair
    one: Pair

    @property
    def per_step_ms(self) -> float:
        """(chainloom - baseline) / N at N steps: the figure the target is about."""
        return self.n.diff_ms / self.steps

    @property
    def marginal_step_ms(self) -> float:
        """Slope between N=1 and N: what one more LLM step costs, per-run costs excluded."""
        return (self.n.paired_diff_ms - self.one.paired_diff_ms) / (self.steps - 1)

    @property
    def per_run_ms(self) -> float:
        """Intercept: the overhead a run pays once, whatever its length."""
        return self.one.paired_diff_ms - self.marginal_step_ms

    def as_json(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            f"n{self.steps}": self.n.as_json(),
            "n1": self.one.as_json(),
            "per_step_overhead_ms": round(self.per_step_ms, 3),
            "marginal_step_overhead_ms": round(self.marginal_step_ms, 3),
            "per_run_overhead_ms": round(self.per_run_ms, 3),
        }


async def measure_llm_overhead(
    env: BenchEnv, steps: int = LLM_STEPS, rounds: int = 30, warmup: int = 5
) -> LLMOverhead:
    chain_n, chain_1 = llm_chain(steps), llm_chain(1)
    n = Pair(f"baseline, {steps} calls", f"chainloom, {steps} LLM steps")
    one = Pair("baseline, 1 call", "chainloom, 1 LLM step")
    await interleave(
        [
            (n, lambda: env.baseline(steps), lambda: env.chain(chain_n)),
            (one, lambda: env.baseline(1), lambda: env.chain(chain_1)),
        ],
        rounds,
        warmup,
    )
    return LLMOverhead(steps, n, one)


@dataclass
class DeterministicCost:
    steps: int
    pair: Pair

    @property
    def per_step_ms(self) -> float:
        return self.pair.diff_ms / self.steps

    @property
    def paired_per_step_ms(self) -> float:
        return self.pair.paired_diff_ms / self.steps

    def as_json(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "pair": self.pair.as_json(),
            "per_step_ms": round(self.per_step_ms, 4),
            "paired_per_step_ms": round(self.paired_per_step_ms, 4),
        }


async def measure_deterministic(
    env: BenchEnv, steps: int = DETERMINISTIC_STEPS, rounds: int = 30, warmup: int = 5
) -> DeterministicCost:
    short, long = deterministic_chain(0), deterministic_chain(steps)
    pair = Pair("1 LLM step", f"1 LLM step + {steps} deterministic")
    await interleave(
        [(pair, lambda: env.chain(short, KV_INPUT), lambda: env.chain(long, KV_INPUT))],
        rounds,
        warmup,
    )
    return DeterministicCost(steps, pair)


@dataclass
class Throughput:
    concurrency: int
    steps: int
    pair: Pair

    def per_second(self, samples: list[float]) -> float:
        return self.concurrency / statistics.median(samples)

    def as_json(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "steps": self.steps,
            "pair": self.pair.as_json(),
            "baseline_workflows_per_s": round(self.per_second(self.pair.a_samples), 2),
            "chainloom_workflows_per_s": round(self.per_second(self.pair.b_samples), 2),
        }


async def measure_throughput(
    env: BenchEnv,
    concurrency: int = CONCURRENCY,
    steps: int = THROUGHPUT_STEPS,
    rounds: int = 6,
    warmup: int = 1,
) -> Throughput:
    chain = llm_chain(steps)

    async def burst(one: Callable[[], Awaitable[float]]) -> float:
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        return time.perf_counter() - started

    pair = Pair(f"baseline x{concurrency}", f"chainloom x{concurrency}")
    await interleave(
        [
            (
                pair,
                lambda: burst(lambda: env.baseline(steps)),
                lambda: burst(lambda: env.chain(chain)),
            )
        ],
        rounds,
        warmup,
    )
    return Throughput(concurrency, steps, pair)


# --------------------------------------------------------------------------- report


def machine() -> str:
    return f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {sys.platform}"


def _row(label: str, *cells: str) -> str:
    return f"{label:<44}" + "".join(f"{c:>13}" for c in cells)


def _ms(value: float) -> str:
    return f"{value:.2f} ms"


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def format_llm(result: LLMOverhead) -> str:
    lines = [_row("LLM steps (zero-latency backend)", "median", "p90")]
    for pair in (result.n, result.one):
        lines.append(_row(pair.a, _ms(median_ms(pair.a_samples)), _ms(p90_ms(pair.a_samples))))
        lines.append(_row(pair.b, _ms(median_ms(pair.b_samples)), _ms(p90_ms(pair.b_samples))))
    ok = result.n.ratio <= TARGET_LLM_RATIO
    lines += [
        _row(f"ratio chainloom/baseline at N={result.steps}", f"{result.n.ratio:.2f}x"),
        _row("  (median of per-round ratios)", f"{result.n.paired_ratio:.2f}x"),
        _row("ratio chainloom/baseline at N=1", f"{result.one.ratio:.2f}x"),
        _row(f"overhead per LLM step ((c-b)/{result.steps})", _ms(result.per_step_ms)),
        _row("  of which per run (intercept)", _ms(result.per_run_ms)),
        _row("  of which per extra step (slope)", _ms(result.marginal_step_ms)),
        _row(f"target <= {TARGET_LLM_RATIO}x", _verdict(ok)),
    ]
    return "\n".join(lines)


def format_deterministic(result: DeterministicCost) -> str:
    pair = result.pair
    ok = result.per_step_ms <= TARGET_DETERMINISTIC_MS
    return "\n".join(
        [
            _row("deterministic steps", "median", "p90"),
            _row(pair.a, _ms(median_ms(pair.a_samples)), _ms(p90_ms(pair.a_samples))),
            _row(pair.b, _ms(median_ms(pair.b_samples)), _ms(p90_ms(pair.b_samples))),
            _row("cost per deterministic step", f"{result.per_step_ms:.3f} ms"),
            _row("  (median of paired differences)", f"{result.paired_per_step_ms:.3f} ms"),
            _row(f"target <= {TARGET_DETERMINISTIC_MS} ms", _verdict(ok)),
        ]
    )


def format_throughput(result: Throughput) -> str:
    pair = result.pair
    title = f"throughput, {result.concurrency} concurrent x {result.steps} steps"
    rows = [
        _row(label, _ms(median_ms(samples)), f"{result.per_second(samples):.1f}")
        for label, samples in ((pair.a, pair.a_samples), (pair.b, pair.b_samples))
    ]
    return "\n".join(
        [
            _row(title, "median", "wf/s"),
            *rows,
            _row("ratio chainloom/baseline (wall time)", f"{pair.ratio:.2f}x"),
            _row("  (median of per-round ratios)", f"{pair.paired_ratio:.2f}x"),
        ]
    )


# --------------------------------------------------------------------------- script


async def run_all(rounds: int, throughput: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="chainloom-bench-") as tmp:
        async with bench_env(Path(tmp)) as env:
            llm = await measure_llm_overhead(env, rounds=rounds)
            print(format_llm(llm), end="\n\n", flush=True)
            det = await measure_deterministic(env, rounds=rounds)
            print(format_deterministic(det), end="\n\n", flush=True)
            results: dict[str, Any] = {
                "machine": machine(),
                "rounds": rounds,
                "llm": llm.as_json(),
                "deterministic": det.as_json(),
            }
            if throughput:
                tp = await measure_throughput(env)
                print(format_throughput(tp), end="\n\n", flush=True)
                results["throughput"] = tp.as_json()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=30, help="timed runs of each variant")
    parser.add_argument("--no-throughput", action="store_true", help="skip the concurrency run")
    parser.add_argument("--json", type=Path, help="write the raw numbers to this file")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    results = asyncio.run(run_all(args.rounds, not args.no_throughput))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"raw numbers: {args.json}")


if __name__ == "__main__":
    main()
