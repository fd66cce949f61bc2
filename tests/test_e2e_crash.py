"""SIGKILL the worker process in the middle of a 5-step chain: nothing is lost, no paid call
is repeated except the one that was in flight. A hook call lost with its worker is retried
after the heartbeat timeout, not the start-to-close one. SIGTERM stops a worker gracefully:
the call in flight finishes (or, past the grace period, is retried elsewhere at once) and no
new task is taken."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.hook_service import ALLOWLIST, HookService
from tests.scripted_llm import ScriptedLLM
from tests.stack import ApiThread, Stack

ROOT = Path(__file__).parent.parent

CHAIN = {
    "id": "five-steps",
    "tasks": [
        {
            "id": f"step{i}",
            "handler": "prompt_to_string",
            "prompt_template": f"step {i} of five: {{{{ previous_output }}}}",
            "execute_config": {"model": "gpt-4o-mini"},
            "transition": {"branches": [{"operator": "default", "goto": f"step{i + 1}"}]}
            if i < 5
            else {},
        }
        for i in range(1, 6)
    ],
}


def start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "worker"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def slow_llm() -> Iterator[ScriptedLLM]:
    server = ScriptedLLM(models=["gpt-4o-mini"]).start()
    server.reply(None, "done", delay=1.0)
    yield server
    server.stop()


@pytest.mark.slow
def test_sigkill_mid_chain_loses_nothing(
    temporal_address: str, tmp_path: Path, slow_llm: ScriptedLLM
) -> None:
    database_url = f"sqlite:///{tmp_path / 'crash.db'}"
    settings = Stack.settings_for(temporal_address, database_url, CHAINLOOM_LLM_HEARTBEAT_TIMEOUT=2)
    env = {**os.environ, **Stack.env_for(settings)}
    api = ApiThread(settings).start()
    http = httpx.Client(base_url=api.url, headers={"X-API-Key": settings.api_key}, timeout=60)
    first = start_worker(env)
    second: subprocess.Popen[bytes] | None = None
    try:
        resp = http.post(
            "/backends",
            json={"name": "slow", "baseUrl": slow_llm.openai_base, "type": "openai"},
        )
        assert resp.status_code == 201, resp.text
        run = http.post("/runs", json={"chain": CHAIN, "input": "go"}).json()
        deadline = time.monotonic() + 60
        while slow_llm.count("/v1/chat/completions") < 3:
            assert time.monotonic() < deadline, "the chain never reached step 3"
            assert first.poll() is None, "the worker died on its own"
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        second = start_worker(env)
        deadline = time.monotonic() + 90
        while True:
            view = http.get(f"/runs/{run['id']}").json()
            if view["status"] in ("completed", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, f"run did not finish: {view}"
            time.sleep(0.25)
        assert view["status"] == "completed", view
        assert [u["taskID"] for u in view["state"]] == [f"step{i}" for i in range(1, 6)]
        prompts = [
            r.body["messages"][-1]["content"]
            for r in slow_llm.requests
            if r.path == "/v1/chat/completions"
        ]
        # At most the call that was in flight (step 3) is made twice.
        assert len(prompts) <= 6, prompts
        for step in (1, 2, 4, 5):
            assert sum(p.startswith(f"step {step} ") for p in prompts) == 1, prompts
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        http.close()
        api.stop()


# --------------------------------------------------------------------------- helpers


CHAT = "/v1/chat/completions"


def two_steps(timeout: str = "") -> dict[str, object]:
    tasks: list[dict[str, object]] = [
        {
            "id": f"step{i}",
            "handler": "prompt_to_string",
            "prompt_template": f"step {i}: {{{{ previous_output }}}}",
            "execute_config": {"model": "gpt-4o-mini"},
        }
        for i in (1, 2)
    ]
    tasks[0]["transition"] = {"branches": [{"operator": "default", "goto": "step2"}]}
    if timeout:
        tasks[0]["timeout"] = timeout
    return {"id": "two-steps", "tasks": tasks}


class Crash:
    """API in a thread, workers as subprocesses, on a database and task queue of their own."""

    def __init__(self, temporal_address: str, tmp_path: Path, **overrides: object) -> None:
        database_url = f"sqlite:///{tmp_path / 'crash.db'}"
        settings = Stack.settings_for(temporal_address, database_url, **overrides)
        self.env = {**os.environ, **Stack.env_for(settings)}
        self.api = ApiThread(settings).start()
        self.http = httpx.Client(
            base_url=self.api.url, headers={"X-API-Key": settings.api_key}, timeout=60
        )
        self.workers: list[subprocess.Popen[bytes]] = []

    def worker(self) -> subprocess.Popen[bytes]:
        proc = start_worker(self.env)
        self.workers.append(proc)
        return proc

    def finish(self, run_id: str, timeout: float = 90) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while True:
            view: dict[str, object] = self.http.get(f"/runs/{run_id}").json()
            if view["status"] in ("completed", "failed", "cancelled"):
                return view
            assert time.monotonic() < deadline, f"run did not finish: {view}"
            time.sleep(0.25)

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.http.close()
        self.api.stop()


def wait_for(condition: object, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture
def hook_service() -> Iterator[HookService]:
    svc = HookService().start()
    yield svc
    svc.stop()


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_a_hook_call_lost_with_its_worker_is_retried_at_the_heartbeat_timeout(
    temporal_address: str, tmp_path: Path, hook_service: HookService
) -> None:
    """The hook task may run 120 s (start-to-close), but the worker beats while it waits on
    the service: a killed worker's call is retried on the new worker after the heartbeat
    timeout, with the same Idempotency-Key."""
    hook_service.slow_seconds = 3.0
    crash = Crash(temporal_address, tmp_path, CHAINLOOM_OUTBOUND_ALLOWLIST=ALLOWLIST)
    try:
        first = crash.worker()
        url = f"{hook_service.url}/slow/crash"
        chain = {
            "id": "hook-crash",
            "tasks": [
                {
                    "id": "post",
                    "handler": "hook",
                    "timeout": "120s",
                    "hook": {"name": "webhook", "args": {"url": url}},
                }
            ],
        }
        run = crash.http.post("/runs", json={"chain": chain, "input": "go"}).json()
        wait_for(lambda: hook_service.calls("/slow/crash"), "the hook was never called")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        crash.worker()
        view = crash.finish(run["id"])
        assert view["status"] == "completed", view
        calls = hook_service.calls("/slow/crash")
        assert len(calls) == 2, calls
        assert calls[0]["headers"]["idempotency-key"] == calls[1]["headers"]["idempotency-key"]
        # Well before the start-to-close timeout could have brought it back.
        assert calls[1]["at"] - calls[0]["at"] < 120
    finally:
        crash.close()


@pytest.mark.slow
def test_sigterm_lets_the_call_in_flight_finish_and_takes_nothing_new(
    temporal_address: str, tmp_path: Path
) -> None:
    llm = ScriptedLLM(models=["gpt-4o-mini"]).start()
    llm.reply("step 1", "one", delay=3.0)
    llm.reply(None, "two")
    crash = Crash(temporal_address, tmp_path, CHAINLOOM_WORKER_SHUTDOWN_GRACE=30)
    try:
        resp = crash.http.post(
            "/backends", json={"name": "llm", "baseUrl": llm.openai_base, "type": "openai"}
        )
        assert resp.status_code == 201, resp.text
        first = crash.worker()
        run = crash.http.post("/runs", json={"chain": two_steps(), "input": "go"}).json()
        wait_for(lambda: llm.count(CHAT) == 1, "step 1 was never asked")
        asked = llm.requests[-1].time
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0
        # It stayed for the answer (3 s after the question) and then took no new task.
        assert time.time() - asked >= 3.0
        assert llm.count(CHAT) == 1
        crash.worker()
        view = crash.finish(run["id"])
        assert view["status"] == "completed", view
        assert view["output"] == "two"
        # Step 1 was answered once, on the worker that was stopping.
        assert llm.count(CHAT) == 2
    finally:
        crash.close()
        llm.stop()


@pytest.mark.slow
def test_a_call_outliving_the_shutdown_grace_is_retried_at_once(
    temporal_address: str, tmp_path: Path
) -> None:
    """Past CHAINLOOM_WORKER_SHUTDOWN_GRACE the call is cut short and fails retryably, so the
    next worker retries it at once: not after the (here 60 s) heartbeat timeout."""
    llm = ScriptedLLM(models=["gpt-4o-mini"]).start()
    llm.reply("step 1", "slow", delay=8.0, times=1)
    llm.reply(None, "done")
    crash = Crash(
        temporal_address,
        tmp_path,
        CHAINLOOM_WORKER_SHUTDOWN_GRACE=1,
        CHAINLOOM_LLM_HEARTBEAT_TIMEOUT=60,
    )
    try:
        resp = crash.http.post(
            "/backends", json={"name": "llm", "baseUrl": llm.openai_base, "type": "openai"}
        )
        assert resp.status_code == 201, resp.text
        first = crash.worker()
        run = crash.http.post("/runs", json={"chain": two_steps(), "input": "go"}).json()
        wait_for(lambda: llm.count(CHAT) == 1, "step 1 was never asked")
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0
        crash.worker()
        view = crash.finish(run["id"])
        assert view["status"] == "completed", view
        steps = [r for r in llm.requests if r.path == CHAT]
        assert [r.body["messages"][-1]["content"] for r in steps[:2]] == ["step 1: go"] * 2
        assert steps[1].time - steps[0].time < 60
    finally:
        crash.close()
        llm.stop()
