"""Recovery after a worker crash: how long runs stand still when their worker is SIGKILLed.

Set-up: a Temporal dev server, the scripted LLM (``tests/scripted_llm.py``) answering every
chat completion with ``echo: <prompt>`` after ``--delay`` seconds, the API in a thread, and
chainloom's worker as a subprocess (``python -m cli.main worker``), as in production.

The soak: R concurrent runs of an S-step chain (each step a ``prompt_to_string`` task whose
prompt holds the previous answer, so every run's prompts and output are its own). The worker
is SIGKILLed K times while runs are in flight, and a new worker is started right after each
kill. A kill comes once every unfinished run has asked for a step it had not asked before the
last (re)start, plus a random pause shorter than half a model answer: so the kill catches
calls in flight and every step is killed at most once.

For each kill, from the new worker's start (its ``Popen``) to:

- worker ready: it logged that it polls the task queue (interpreter start, imports,
  migrations, connecting: the floor of any recovery figure);
- first call: the next chat completion landing at the scripted server (the figure the target
  is about);
- every run called: each run in flight at the kill made a model call again;
- every run on: each run in flight asked for its next step (this includes one model answer,
  ``--delay``, for the runs whose call was lost with the worker).

Checks: every run completes with the output its prompts predict, and no model call is
repeated unless a kill fell between the two requests (each kill may repeat each call once):
a repeat without a kill is a heartbeat timeout that fired on a live worker.

Run it without pytest (``--ladder`` measures what each setting contributes, from the
settings of the code before this change to the current defaults)::

    .venv/bin/python -m benchmarks.recovery [--runs 8] [--steps 6] [--kills 6] [--delay 2]
        [--set CHAINLOOM_STICKY_TIMEOUT=10 ...] [--ladder] [--json out.json]

``tests/test_recovery_soak.py`` runs the soak with the defaults and asserts the checks.
"""

import argparse
import itertools
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.fernet import Fernet

from core.config import Settings
from core.db import Database
from core.devserver import free_port, start_dev_server, stop_process
from tests.scripted_llm import ScriptedLLM
from tests.stack import ApiThread, Stack

ROOT = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
READY_LINE = "worker polling task queue"
# How long the soak waits for runs to move again after a kill before it gives up.
STALL_LIMIT = 180.0
# How much later than it was sent the scripted server may stamp a request.
RECORD_LAG = 0.5

# The settings of the code before this change, then each change on its own, then together.
BEFORE = {
    "CHAINLOOM_LLM_HEARTBEAT_TIMEOUT": "20",
    "CHAINLOOM_STICKY_TIMEOUT": "10",
    "CHAINLOOM_WORKFLOW_TASK_TIMEOUT": "10",
    "CHAINLOOM_RETRY_INITIAL_INTERVAL": "1",
}
LADDER: list[tuple[str, dict[str, str]]] = [
    ("before: heartbeat 20 s, sticky 10 s, task 10 s", BEFORE),
    ("heartbeat 3 s", {**BEFORE, "CHAINLOOM_LLM_HEARTBEAT_TIMEOUT": "3"}),
    (
        "heartbeat 3 s, sticky 2 s",
        {**BEFORE, "CHAINLOOM_LLM_HEARTBEAT_TIMEOUT": "3", "CHAINLOOM_STICKY_TIMEOUT": "2"},
    ),
    ("defaults: heartbeat 3 s, sticky 2 s, task 5 s", {}),
]


def soak_chain(steps: int) -> dict[str, Any]:
    return {
        "id": "soak",
        "tasks": [
            {
                "id": f"step{i}",
                "handler": "prompt_to_string",
                "prompt_template": f"step {i}: {{{{ previous_output }}}}",
                "execute_config": {"model": MODEL},
                "transition": {"branches": [{"operator": "default", "goto": f"step{i + 1}"}]}
                if i < steps
                else {},
            }
            for i in range(1, steps + 1)
        ],
    }


def expected_output(tag: str, steps: int) -> str:
    """What the scripted LLM's echo makes of the chain: each answer quotes its prompt."""
    previous = tag
    for i in range(1, steps + 1):
        previous = f"echo: step {i}: {previous}"
    return previous


_STEP = re.compile(r"^step (\d+): ")
_TAG = re.compile(r"\brun-\d+\b")


@dataclass
class Call:
    at: float
    prompt: str

    @property
    def step(self) -> int:
        found = _STEP.match(self.prompt)
        return int(found.group(1)) if found else 0

    @property
    def run(self) -> str:
        found = _TAG.search(self.prompt)
        return found.group(0) if found else ""


@dataclass
class Kill:
    number: int
    killed_at: float
    started_at: float
    # Runs whose work was not done at the kill, and the highest step each had asked for.
    in_flight: dict[str, int]
    ready_at: float | None = None
    first_call_at: float | None = None
    all_called_at: float | None = None
    all_on_at: float | None = None

    def after_start(self, at: float | None) -> float | None:
        return None if at is None else at - self.started_at


@dataclass
class SoakResult:
    settings: dict[str, str]
    runs: int
    steps: int
    delay: float
    kills: list[Kill]
    calls: list[Call]
    outputs: dict[str, Any]
    statuses: dict[str, str]
    elapsed: float
    # The exit code of the last worker, stopped with SIGTERM (graceful: 0).
    last_worker_exit: int | None = None

    def wrong_outputs(self) -> list[str]:
        wrong = []
        for tag, output in sorted(self.outputs.items()):
            status = self.statuses.get(tag)
            if status != "completed" or output != expected_output(tag, self.steps):
                wrong.append(f"{tag}: {status}, output {output!r}")
        return wrong

    def unexplained_repeats(self) -> list[str]:
        """Repeated requests for one call with no kill between them. The scripted server
        stamps a request once it has read its body, so a request sent just before a kill can
        be stamped just after it (measured: 2-7 ms): a kill up to RECORD_LAG before the first
        request still counts as between."""
        kill_times = [k.killed_at for k in self.kills]
        by_prompt: dict[str, list[float]] = {}
        for call in self.calls:
            by_prompt.setdefault(call.prompt, []).append(call.at)
        problems = []
        for prompt, times in by_prompt.items():
            times.sort()
            for before, after in itertools.pairwise(times):
                if not any(before - RECORD_LAG < k < after for k in kill_times):
                    problems.append(
                        f"{prompt[:60]!r} asked at {before:.2f} and again at {after:.2f} "
                        "with no kill between"
                    )
        return problems

    def repeats(self) -> int:
        return len(self.calls) - len({c.prompt for c in self.calls})

    def figures(self) -> dict[str, dict[str, float | None]]:
        out: dict[str, dict[str, float | None]] = {}
        for name in ("ready_at", "first_call_at", "all_called_at", "all_on_at"):
            values = [k.after_start(getattr(k, name)) for k in self.kills]
            known = [v for v in values if v is not None]
            out[name] = {
                "median": statistics.median(known) if known else None,
                "max": max(known) if known else None,
                "missing": float(len(values) - len(known)),
            }
        return out

    def table(self) -> str:
        lines = [
            "| kill | runs in flight | worker ready | first call | every run called "
            f"| every run on (incl. {self.delay:g} s answer) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for k in self.kills:
            cells = [
                _s(k.after_start(x))
                for x in (k.ready_at, k.first_call_at, k.all_called_at, k.all_on_at)
            ]
            lines.append(f"| {k.number} | {len(k.in_flight)} | " + " | ".join(cells) + " |")
        figures = self.figures()
        for stat in ("median", "max"):
            cells = [
                _s(figures[n][stat])
                for n in ("ready_at", "first_call_at", "all_called_at", "all_on_at")
            ]
            lines.append(f"| **{stat}** | | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def summary_row(self, label: str) -> str:
        f = self.figures()
        return (
            f"| {label} | {_s(f['first_call_at']['median'])} / {_s(f['first_call_at']['max'])} "
            f"| {_s(f['all_called_at']['median'])} / {_s(f['all_called_at']['max'])} "
            f"| {_s(f['all_on_at']['median'])} / {_s(f['all_on_at']['max'])} "
            f"| {self.repeats()} | {self.elapsed:.0f} s |"
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["figures"] = self.figures()
        return data


SUMMARY_HEADER = (
    "| settings | first call, median / max | every run called | every run on | "
    "repeated calls | soak took |\n|---|---:|---:|---:|---:|---:|"
)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


class WorkerProcess:
    """`chainloom worker` as a subprocess; its log goes to a file, and the moment it logs that
    it polls is kept."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self.started_at = time.time()
        self.ready_at: float | None = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.log_path.open("ab") as log:
            for line in self.proc.stderr:
                if self.ready_at is None and READY_LINE.encode() in line:
                    self.ready_at = time.time()
                log.write(line)
                log.flush()

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self.ready_at is None:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"the worker exited with {code}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not start polling; see {self.log_path}")
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(5)

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM (graceful) and wait; SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode


def settings_for(
    temporal_address: str, workdir: Path, overrides: dict[str, str] | None = None
) -> Settings:
    """chainloom's own defaults, except what the soak needs (its database, queue, keys)."""
    database_url = f"sqlite:///{workdir / 'soak.db'}"
    Database(database_url).migrate()
    values: dict[str, Any] = {
        "TEMPORAL_ADDRESS": temporal_address,
        "DATABASE_URL": database_url,
        "CHAINLOOM_DATA_DIR": str(workdir),
        "CHAINLOOM_API_KEY": "soak-" + uuid.uuid4().hex,
        "CHAINLOOM_SECRET_KEY": Fernet.generate_key().decode(),
        "CHAINLOOM_TASK_QUEUE": "soak-" + uuid.uuid4().hex[:12],
        "CHAINLOOM_RATE_LIMIT": "1000000/minute",
        "CHAINLOOM_TENANT_RATE_LIMIT": "1000000/minute",
        # The scripted model server listens on loopback, as `chainloom dev` allows.
        "CHAINLOOM_BACKEND_ALLOWLIST": "127.0.0.1",
        **(overrides or {}),
    }
    return Settings(**values)


def _calls(llm: ScriptedLLM) -> list[Call]:
    out = []
    for rec in list(llm.requests):
        if rec.path != CHAT or not isinstance(rec.body, dict):
            continue
        messages = rec.body.get("messages") or []
        prompt = str(messages[-1].get("content") or "") if messages else ""
        out.append(Call(rec.time, prompt))
    return out


def _highest(calls: list[Call], before: float | None = None) -> dict[str, int]:
    top: dict[str, int] = {}
    for call in calls:
        if before is None or call.at < before:
            top[call.run] = max(top.get(call.run, 0), call.step)
    return top


@contextmanager
def _stack(
    temporal_address: str, workdir: Path, overrides: dict[str, str] | None, delay: float
) -> Iterator[tuple[Settings, ScriptedLLM, httpx.Client, dict[str, str]]]:
    settings = settings_for(temporal_address, workdir, overrides)
    llm = ScriptedLLM(models=[MODEL]).start()
    llm.default_delay = delay
    api = ApiThread(settings).start()
    http = httpx.Client(base_url=api.url, headers={"X-API-Key": settings.api_key}, timeout=60)
    try:
        resp = http.post(
            "/backends", json={"name": "scripted", "baseUrl": llm.openai_base, "type": "openai"}
        )
        resp.raise_for_status()
        env = {**os.environ, **Stack.env_for(settings)}
        yield settings, llm, http, env
    finally:
        http.close()
        api.stop()
        llm.stop()


def soak(
    temporal_address: str,
    workdir: Path,
    *,
    runs: int = 8,
    steps: int = 6,
    kills: int = 6,
    delay: float = 2.0,
    overrides: dict[str, str] | None = None,
    seed: int = 1,
    kill_at: str = "call",
    log: Any = None,
) -> SoakResult:
    """`kill_at`: "call" kills while the runs' calls are in flight (lost calls wait for their
    heartbeat timeout); "answer" kills just as the answers come in (workflow tasks are in
    flight or queued on the dead worker's sticky queue: the sticky and workflow task
    timeouts)."""
    say = log or (lambda _msg: None)
    rng = random.Random(seed)
    began = time.time()
    with _stack(temporal_address, workdir, overrides, delay) as (_, llm, http, env):
        tags = [f"run-{n}" for n in range(runs)]
        run_ids: dict[str, str] = {}
        record: list[Kill] = []
        workers: list[WorkerProcess] = []
        restarted = began
        worker = WorkerProcess(env, workdir / "worker-0.log")
        try:
            worker.wait_ready()
            chain = soak_chain(steps)
            for tag in tags:
                resp = http.post("/runs", json={"chain": chain, "input": tag})
                resp.raise_for_status()
                run_ids[tag] = resp.json()["id"]
            for number in range(1, kills + 1):
                last = _wait_until_all_moved(llm, tags, steps, restarted, delay)
                if kill_at == "answer":
                    # Just after the last run's answer left the scripted server.
                    time.sleep(max(0.0, last + delay + rng.uniform(0.0, 0.15) - time.time()))
                else:
                    # A pause shorter than half an answer: the kill catches calls in flight.
                    time.sleep(rng.uniform(0.05, 0.5) * delay)
                calls = _calls(llm)
                killed_at = time.time()
                in_flight = _in_flight(calls, tags, steps, killed_at, delay)
                worker.kill()
                worker = WorkerProcess(env, workdir / f"worker-{number}.log")
                record.append(Kill(number, killed_at, worker.started_at, in_flight))
                workers.append(worker)
                restarted = worker.started_at
                say(f"kill {number}: {len(in_flight)} runs in flight")
            statuses, outputs = _wait_for_runs(http, run_ids)
        finally:
            stopped = worker.stop()
        calls = _calls(llm)
    for kill, started in zip(record, workers, strict=True):
        kill.ready_at = started.ready_at
    _measure(record, calls, steps)
    return SoakResult(
        settings={**(overrides or {}), "kill at": kill_at},
        runs=runs,
        steps=steps,
        delay=delay,
        kills=record,
        calls=calls,
        outputs=outputs,
        statuses=statuses,
        elapsed=time.time() - began,
        last_worker_exit=stopped,
    )


def _in_flight(
    calls: list[Call], tags: list[str], steps: int, now: float, delay: float
) -> dict[str, int]:
    """Runs with work left at `now`: not yet at their last step, or its answer not yet in."""
    top = _highest(calls)
    last_asked = {c.run: c.at for c in calls if c.step == steps}
    return {
        tag: top.get(tag, 0)
        for tag in tags
        if top.get(tag, 0) < steps or now - last_asked.get(tag, now) < delay
    }


def _wait_until_all_moved(
    llm: ScriptedLLM, tags: list[str], steps: int, since: float, delay: float
) -> float:
    """Until every unfinished run has asked for a step it had not asked before `since`;
    returns when the last of them asked."""
    deadline = time.monotonic() + STALL_LIMIT
    while True:
        calls = _calls(llm)
        before = _highest(calls, since)
        after = _highest([c for c in calls if c.at >= since])
        waiting = [
            tag
            for tag in tags
            if before.get(tag, 0) < steps and after.get(tag, 0) <= before.get(tag, 0)
        ]
        if not waiting:
            return max((c.at for c in calls if c.at >= since), default=time.time())
        if time.monotonic() > deadline:
            raise TimeoutError(f"runs {waiting} did not move for {STALL_LIMIT:.0f} s")
        time.sleep(0.02)


def _wait_for_runs(
    http: httpx.Client, run_ids: dict[str, str], timeout: float = 300
) -> tuple[dict[str, str], dict[str, Any]]:
    statuses: dict[str, str] = {}
    outputs: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    for tag, run_id in run_ids.items():
        while True:
            view = http.get(f"/runs/{run_id}").json()
            if view.get("status") in ("completed", "failed", "cancelled"):
                statuses[tag] = view["status"]
                outputs[tag] = view.get("output")
                break
            if time.monotonic() > deadline:
                statuses[tag] = str(view.get("status"))
                outputs[tag] = None
                break
            time.sleep(0.5)
    return statuses, outputs


def _measure(record: list[Kill], calls: list[Call], steps: int) -> None:
    for i, kill in enumerate(record):
        end = record[i + 1].killed_at if i + 1 < len(record) else float("inf")
        window = [c for c in calls if kill.started_at <= c.at < end]
        if window:
            kill.first_call_at = min(c.at for c in window)
        called: list[float] = []
        moved: list[float] = []
        complete = True
        for tag, top in kill.in_flight.items():
            mine = [c for c in window if c.run == tag]
            if not mine:
                # Its last answer arrived before the kill: nothing left to ask.
                continue
            called.append(min(c.at for c in mine))
            on = [c.at for c in mine if c.step > top]
            if on:
                moved.append(min(on))
            elif top < steps:
                complete = False
        kill.all_called_at = max(called) if called else None
        kill.all_on_at = max(moved) if moved and complete else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--delay", type=float, default=2.0, help="seconds per model answer")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--kill-at",
        choices=["call", "answer"],
        default="call",
        help="kill while calls are in flight, or just as their answers come in",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="VAR=VALUE", help="a chainloom setting"
    )
    parser.add_argument(
        "--ladder", action="store_true", help="the settings before this change, step by step"
    )
    parser.add_argument("--json", type=Path, help="write the raw numbers to this file")
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.set)
    variants = (
        [(label, {**values, **overrides}) for label, values in LADDER]
        if args.ladder
        else [(", ".join(args.set) or "defaults of this version", overrides)]
    )
    print(f"machine: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {sys.platform}")
    print(
        f"{args.runs} runs x {args.steps} steps, {args.kills} kills (at the {args.kill_at}), "
        f"model answers after {args.delay:g} s",
        flush=True,
    )
    port = free_port()
    server = start_dev_server(None, port)
    results: list[tuple[str, SoakResult]] = []
    try:
        for label, values in variants:
            with tempfile.TemporaryDirectory(prefix="chainloom-soak-") as tmp:
                print(f"\n## {label}\n", flush=True)
                result = soak(
                    f"127.0.0.1:{port}",
                    Path(tmp),
                    runs=args.runs,
                    steps=args.steps,
                    kills=args.kills,
                    delay=args.delay,
                    overrides=values,
                    seed=args.seed,
                    kill_at=args.kill_at,
                    log=lambda msg: print(f"  {msg}", flush=True),
                )
            print(result.table())
            problems = result.wrong_outputs() + result.unexplained_repeats()
            print(
                f"\nrepeated calls: {result.repeats()}; problems: {problems or 'none'}; "
                f"the last worker exited with {result.last_worker_exit} on SIGTERM"
            )
            results.append((label, result))
    finally:
        stop_process(server)
    print("\n" + SUMMARY_HEADER)
    for label, result in results:
        print(result.summary_row(label))
    if args.json:
        args.json.write_text(
            json.dumps({label: r.to_json() for label, r in results}, indent=2, default=str)
        )
        print(f"raw numbers: {args.json}")


if __name__ == "__main__":
    main()
