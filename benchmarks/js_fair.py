"""JS fairness: tenant A's latency while tenant B floods the pool with infinite loops.

Tenant B keeps `--flood` calls of ``while (true) {}`` in flight the whole time (each one that
ends at the JS time limit is replaced at once); tenant A calls a trivial function `--calls`
times, one after the other with `--spacing` seconds between (so the calls span several of B's
time slices, hosts killed and replaced included), and each call's latency is recorded.

- pool: ``JSRunner.run`` directly, with the settings' defaults (pool of 2 kept warm, at most 8,
  2 calls per tenant).
- js_run: ``FunctionActivities.run`` as the ``js_run`` activity runs it (scripts in SQLite),
  without Temporal.

The same file runs against older code (a ``JSRunner.run`` without ``tenant``): every call then
shares one first-come-first-served pool, which is the "before" figure.

    python -m benchmarks.js_fair [--path pool|js_run] [--timeout 5] [--flood 20] [--calls 20]
                                 [--spacing 0.5] [--json out.json]
"""

import argparse
import asyncio
import inspect
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from core.config import Settings
from core.db import Database
from core.models import FunctionRow
from core.sandbox.pool import JSRunner, runner_for

LOOP = "function main() { while (true) {} }"
TRIVIAL = "function main(x) { return {n: x + 1}; }"


def _stats(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    return {
        "calls": len(ms),
        "median_ms": round(statistics.median(ms), 1),
        "p95_ms": round(ms[max(0, math.ceil(len(ms) * 0.95) - 1)], 1),
        "max_ms": round(ms[-1], 1),
    }


Call = Callable[[str, str, Any], Awaitable[Any]]


async def _flood_and_measure(call: Call, flood: int, calls: int, spacing: float) -> dict[str, Any]:
    stop = asyncio.Event()
    ended: dict[str, int] = {}

    async def tenant_b() -> None:
        while not stop.is_set():
            try:
                await call("b", "loop", None)
                kind = "ok"
            except Exception as err:  # the time limit, as expected
                kind = getattr(err, "kind", None) or type(err).__name__
                if "time limit" in str(err):
                    kind = "timeout"
            ended[kind] = ended.get(kind, 0) + 1

    b = [asyncio.create_task(tenant_b()) for _ in range(flood)]
    await asyncio.sleep(1.0)  # B's calls are all in: two running, the rest queued
    samples = []
    for i in range(calls):
        began = time.perf_counter()
        await call("a", "trivial", i)
        samples.append(time.perf_counter() - began)
        print(f"  A call {i + 1}: {samples[-1] * 1000:.1f} ms", file=sys.stderr, flush=True)
        await asyncio.sleep(spacing)
    stop.set()
    for task in b:
        task.cancel()  # B's calls in flight are stopped (a running one's host is killed)
    await asyncio.gather(*b, return_exceptions=True)
    return {**_stats(samples), "b_calls_ended": ended}


async def measure(
    path: str, js_timeout: float, flood: int, calls: int, spacing: float = 0.5
) -> dict[str, Any]:
    fair = "tenant" in inspect.signature(JSRunner.run).parameters
    with tempfile.TemporaryDirectory(prefix="chainloom-js-fair-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        settings = Settings(
            DATABASE_URL=url, CHAINLOOM_DATA_DIR=tmp, CHAINLOOM_JS_TIMEOUT=js_timeout
        )
        if path == "pool":
            runner = runner_for(settings)
            await runner.warm()
            scripts = {"loop": LOOP, "trivial": TRIVIAL}

            async def call(tenant: str, name: str, value: Any) -> Any:
                extra = {"tenant": tenant} if fair else {}
                return await runner.run(scripts[name], value, **extra)

            figures = await _flood_and_measure(call, flood, calls, spacing)
            await runner.close()
        else:
            figures = await _through_js_run(settings, url, flood, calls, spacing)
    return {"path": path, "fair_pool": fair, "timeout_s": js_timeout, "flood": flood, **figures}


async def _through_js_run(
    settings: Settings, url: str, flood: int, calls: int, spacing: float
) -> dict[str, Any]:
    from activities.functions import FunctionActivities
    from activities.hooks import HookActivities
    from activities.llm import LLMActivities
    from core.backends.providers import ProviderClients
    from core.secrets import SecretBox
    from workflows.types import FunctionRunInput

    db = Database(url)
    db.migrate()
    with db.session() as session:
        session.add(FunctionRow(tenant_id="a", name="trivial", script=TRIVIAL))
        session.add(FunctionRow(tenant_id="b", name="loop", script=LOOP))
        session.commit()
    box = SecretBox.from_settings(settings)
    functions = FunctionActivities(
        db,
        settings,
        llm=LLMActivities(db, ProviderClients(), secrets=box),
        hooks=HookActivities(db, box, settings),
    )
    await functions.runner().warm()

    async def call(tenant: str, name: str, value: Any) -> Any:
        return await functions.run(FunctionRunInput(tenant, name, value))

    figures = await _flood_and_measure(call, flood, calls, spacing)
    await functions.runner().close()
    db.dispose()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--path", choices=("pool", "js_run"), default="pool")
    parser.add_argument("--timeout", type=float, default=5.0, help="CHAINLOOM_JS_TIMEOUT")
    parser.add_argument("--flood", type=int, default=20)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--spacing", type=float, default=0.5, help="seconds between A's calls")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    figures = asyncio.run(measure(args.path, args.timeout, args.flood, args.calls, args.spacing))
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
